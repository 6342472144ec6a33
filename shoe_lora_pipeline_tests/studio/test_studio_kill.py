"""Killing the studio while it writes reviews.csv leaves the previous file whole; the next studio decides
again at once (the reviews lock died with the process)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from shoe_lora_pipeline.core.renders.review import read_reviews
from shoe_lora_pipeline.studio.app import CSRF_HEADER
from shoe_lora_pipeline_tests.support.dagster_server import free_loopback_port
from shoe_lora_pipeline_tests.support.paths import REPO_ROOT
from shoe_lora_pipeline_tests.support.studio import FakeSku, settings_for, write_candidates, write_project

START_TIMEOUT_S = 120.0


def csrf_of(url: str) -> str:
    page = requests.get(f"{url}/review", timeout=30).text
    return page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_loopback_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*args, "--port", str(port)],
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            requests.get(f"{url}/static/studio.css", timeout=2)
            return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the studio did not answer:\n{log.read_text()}")


def decide(url: str, csrf: str, candidate: dict, decision: str) -> requests.Response:
    body = {
        "sku": "CS-1",
        "seed": candidate["seed"],
        "image_sha256": candidate["image_sha256"],
        "decision": decision,
    }
    return requests.post(f"{url}/api/decision", json=body, headers={CSRF_HEADER: csrf}, timeout=60)


def test_kill_mid_write_keeps_the_previous_reviews_csv(tmp_path: Path) -> None:
    cfg = write_project(tmp_path)
    paths = write_candidates(settings_for(cfg).renders_dir, [FakeSku("CS-1", [True, True])])
    candidates = json.loads(paths.render_json("CS-1").read_text())["candidates"]
    marker = tmp_path / "stalled"
    studio = ["studio", "--config", str(cfg), "--dagster-url", f"http://127.0.0.1:{free_loopback_port()}"]
    proc, url = start(
        [sys.executable, "-m", "shoe_lora_pipeline_tests.support.studio_stalls", str(marker), *studio],
        tmp_path / "a.log",
    )
    try:
        csrf = csrf_of(url)
        # The previous reviews.csv, written here (this process's writes do not stall).
        from shoe_lora_pipeline.core.renders.decisions import record_decision

        record_decision(
            paths, "CS-1", str(candidates[0]["seed"]), candidates[0]["image_sha256"], "approve", "first"
        )
        previous = paths.reviews_csv.read_bytes()
        threading.Thread(
            target=lambda: _quiet(decide, url, csrf, candidates[1], "reject"), daemon=True
        ).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not marker.exists():
            assert time.monotonic() < deadline, (tmp_path / "a.log").read_text()
            time.sleep(0.05)
        temporary = Path(marker.read_text())
        assert "reject" in temporary.read_text()  # the new text was written, not yet in place
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert paths.reviews_csv.read_bytes() == previous
    assert [(r.file, r.decision, r.note) for r in read_reviews(paths.reviews_csv)] == [
        ("000-k000.png", "approve", "first"),
        ("001-k000.png", "", ""),
    ]
    proc, url = start([sys.executable, "-m", "shoe_lora_pipeline.cli", *studio], tmp_path / "b.log")
    try:
        assert decide(url, csrf_of(url), candidates[1], "reject").json()["decision"] == "reject"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert [r.decision for r in read_reviews(paths.reviews_csv)] == ["approve", "reject"]


def _quiet(fn, *args) -> None:  # noqa: ANN001 (a thread target whose request never gets an answer)
    with contextlib.suppress(requests.RequestException):
        fn(*args)
