"""The studio's framework-free core: decisions written concurrently under the reviews lock (threads and a
render_review running between them), the specs check's whole-file refusals, the dated backup."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from shoe_lora_pipeline.core.config import load_config
from shoe_lora_pipeline.core.renders.decisions import (
    CandidateGoneError,
    approve_top,
    record_decision,
    review_state,
)
from shoe_lora_pipeline.core.renders.review import read_reviews, review_renders
from shoe_lora_pipeline.core.studio import (
    backup_dir,
    check_specs_upload,
    launch_command,
    render_asset_keys,
    resolve_inside,
    save_specs,
)
from shoe_lora_pipeline_tests.support.studio import FakeSku, write_candidates, write_project


def test_concurrent_decisions_and_a_review_run_lose_nothing(tmp_path: Path) -> None:
    paths = write_candidates(tmp_path / "renders", [FakeSku(f"S-{i}", [True] * 4) for i in range(5)])
    wanted = {}
    jobs = []
    for n in range(5):
        for c in json.loads(paths.render_json(f"S-{n}").read_text())["candidates"]:
            decision = "approve" if (n + c["index"]) % 2 else "reject"
            wanted[(f"S-{n}", c["file"])] = decision
            jobs.append((f"S-{n}", str(c["seed"]), c["image_sha256"], decision))
    barrier = threading.Barrier(len(jobs) + 1)

    def decide(job: tuple[str, str, str, str]) -> None:
        barrier.wait()
        record_decision(paths, *job, note=f"by {job[1]}")

    def review() -> None:
        barrier.wait()
        review_renders(paths, auto_approve=True, require_qa_pass=False)

    threads = [threading.Thread(target=decide, args=(job,)) for job in jobs] + [
        threading.Thread(target=review)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = {(r.sku, r.file): r.decision for r in read_reviews(paths.reviews_csv)}
    assert got == wanted
    assert all(r.note == f"by {r.seed}" for r in read_reviews(paths.reviews_csv))


def test_later_decision_wins_and_state_shows_what_publishes(tmp_path: Path) -> None:
    paths = write_candidates(tmp_path / "renders", [FakeSku("A", [False, True, True], count=1)])
    cands = json.loads(paths.render_json("A").read_text())["candidates"]
    record_decision(paths, "A", str(cands[0]["seed"]), cands[0]["image_sha256"], "approve")
    record_decision(paths, "A", str(cands[0]["seed"]), cands[0]["image_sha256"], "Rejected")
    (sku,) = review_state(paths, auto_approve=True, require_qa_pass=True)
    assert [(c.decision, c.publishes) for c in sku.candidates] == [("reject", ""), ("", "auto"), ("", "")]
    assert sku.qa_failures == 1 and not sku.undecided
    assert [r.file for r in approve_top(paths, "A", 5)] == ["001-k000.png", "002-k000.png"]
    with pytest.raises(CandidateGoneError, match="reload the page"):
        record_decision(paths, "A", "999", "nope", "approve")
    with pytest.raises(ValueError, match="use approve, reject"):
        record_decision(paths, "A", str(cands[1]["seed"]), cands[1]["image_sha256"], "yes")


def test_specs_check_and_dated_backup(tmp_path: Path) -> None:
    cfg = load_config(write_project(tmp_path), check_paths=False)
    latin1 = "sku,colour,type,characteristics,count\nA,black,casual,,1\nB,café,casual,,1\n".encode("latin-1")
    (problem,) = check_specs_upload(latin1, cfg).problems
    assert problem.line == 3 and "not UTF-8 (byte 0xe9)" in problem.reason
    tabs = check_specs_upload(b"sku\tcolour\ttype\tcharacteristics\tcount\nA\tblack\tcasual\t\t1\n", cfg)
    assert "separated by tabs" in tabs.problems[0].reason
    ok = check_specs_upload(
        "\ufeffsku,colour,type,characteristics,count\nÜ-1,black,casual,,1\n".encode(), cfg
    )
    assert ok.ok and [r.sku for r in ok.rows] == ["Ü-1"]
    sheet = tmp_path / "specs.csv"
    before = sheet.read_text()
    when = datetime(2026, 12, 3, 21, 0, 0, tzinfo=timezone.utc)
    backup = save_specs(sheet, ok.text, now=when)
    assert backup == backup_dir(sheet) / "specs-20261203T210000000000Z.csv"
    assert backup.read_text() == before and sheet.read_text() == ok.text
    assert save_specs(tmp_path / "new.csv", "sku\n") is None


def test_resolve_inside_and_launch_command(tmp_path: Path) -> None:
    (tmp_path / "root" / "a").mkdir(parents=True)
    (tmp_path / "root" / "a" / "x.png").write_bytes(b"x")
    (tmp_path / "out.png").write_bytes(b"o")
    (tmp_path / "root" / "link.png").symlink_to(tmp_path / "out.png")
    (tmp_path / "root" / "inner.png").symlink_to(tmp_path / "root" / "a" / "x.png")
    root = tmp_path / "root"
    assert resolve_inside(root, "a/x.png") == (root / "a" / "x.png").resolve()
    assert resolve_inside(root, "inner.png") == (root / "a" / "x.png").resolve()  # a link that stays inside
    for bad in (
        "../out.png",
        "a/../../out.png",
        str(tmp_path / "out.png"),
        "link.png",
        "a",
        "a\\x.png",
        "a/x.png\x00",
    ):
        assert resolve_inside(root, bad) is None, bad
    cfg = load_config(write_project(tmp_path / "p"), check_paths=False)
    assert render_asset_keys(cfg, "casual_shoes", ["product_renders"]) == [["product_renders"]]
    assert render_asset_keys(cfg, "boots", ["product_renders"]) == [["boots", "product_renders"]]
    command = launch_command(
        [["boots", "product_renders"], ["boots", "render_review"]], cfg.source_path, "/h"
    )
    assert command.endswith("launch --assets boots/product_renders,boots/render_review")
    assert "DAGSTER_HOME=/h SHOE_LORA_CONFIG=" in command
