"""Product renders on the tiny model: reproducible seeds, incremental re-renders, the specs-sheet sensor,
the CLI, and one materialisation of published_renders from a sheet with good and hostile rows."""

import csv
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
import torch
from PIL import Image

from shoe_lora_pipeline.cli import main as cli_main
from shoe_lora_pipeline.core import category_lock, lora_io
from shoe_lora_pipeline.core.config import load_config
from shoe_lora_pipeline.core.marking import TRAINED_ALGORITHMIC_MEDIA, read_marking
from shoe_lora_pipeline.core.models import tiny_sd_path
from shoe_lora_pipeline.core.renders import (
    RenderSettings,
    lora_source,
    parse_a1111_parameters,
    pipeline_loader,
    read_png_provenance,
    read_specs,
    render_sheet,
    spec_rules,
)
from shoe_lora_pipeline.core.renders import publish as publish_module
from shoe_lora_pipeline.core.renders.hires import HiresPass, HiresSettings, img2img_from
from shoe_lora_pipeline.core.renders.pnginfo import a1111_parameters
from shoe_lora_pipeline.definitions import RENDER_STAGE_NAMES, build_definitions, render_assets
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource
from shoe_lora_pipeline_tests.renders.test_marketplace import white_sneaker
from shoe_lora_pipeline_tests.support.export import make_training_checkpoint
from shoe_lora_pipeline_tests.support.training import one_torch_thread

GOOD = "sku,colour,type,characteristics,count,view\nCS-1,black,casual,lace-up,1,side\nÜ-2,white,casual sneakers,,2,\n"
HOSTILE = (
    '"../escape",black,casual,,1,\n'
    '"a/b",black,casual,,1,\n'
    '"nul\x00sku",black,casual,,1,\n'
    f"{'L' * 150},black,casual,,1,\n"
    "NO-COLOUR,,casual,,1,\n"
    "ZERO,black,casual,,0,\n"
    "TOO-MANY,black,casual,,99,\n"
    "CS-1,brown,casual,,1,\n"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_sd_cache: Path) -> Path:
    """training.output_dir with lora_weights/ (a random LoRA, exported as the pipeline does) and a
    final_pipeline/ fused from it."""
    root = tmp_path_factory.mktemp("lora")
    base = tiny_sd_path(tiny_sd_cache)
    with one_torch_thread():
        ckpt, _ = make_training_checkpoint(root, base, rank=4, alpha=4, step=4)
        provenance = {"dagster_run_id": "lora-run-1", "dataset_name": "casual_shoes"}
        lora_io.export_lora(
            ckpt,
            root / "lora_weights",
            dataset_name="casual_shoes",
            provenance=provenance,
            training=lora_io.TrainingFacts(),
        )
        lora_io.fuse_lora_pipeline(base, root / "lora_weights", root / "final_pipeline")
    return root


def project(tmp_path: Path, exported: Path, sheet: str) -> Path:
    """A config + specs sheet + a copy of the exported LoRA where the config expects it."""
    (tmp_path / "raw").mkdir()
    lora_dir = tmp_path / "out" / "lora"
    for name in ("lora_weights", "final_pipeline"):
        shutil.copytree(exported / name, lora_dir / name)
    (tmp_path / "specs.csv").write_text(sheet, encoding="utf-8")
    cfg = tmp_path / "renders.yaml"
    cfg.write_text(
        """
dataset: {name: casual_shoes, raw_dir: raw, output_dir: out, resolution: 64}
training: {base_model: tiny-sd, output_dir: out/lora}
renders:
  specs_csv: specs.csv
  candidates_per_image: 2
  num_inference_steps: 2
  batch_size: 3
  require_qa_pass: false   # the random tiny model never passes product QA
device: cpu
"""
    )
    return cfg


@pytest.fixture(scope="module")
def pipe(exported: Path, tiny_sd_cache: Path) -> Any:
    load = pipeline_loader(
        lora_source(exported / "lora_weights", exported / "final_pipeline"),
        lambda: tiny_sd_path(tiny_sd_cache),
        torch.device("cpu"),
        torch.float32,
        sampler="dpmpp_2m",
    )
    with one_torch_thread():
        return load()[0]


def render(cfg_path: Path, renders_dir: Path, loader: Any, **overrides: Any) -> Any:
    cfg = load_config(cfg_path)
    source = lora_source(cfg.training.output_dir / "lora_weights", cfg.training.output_dir / "final_pipeline")
    source = dataclasses.replace(source, **overrides)
    sheet = read_specs(cfg.renders.specs_csv, **spec_rules(cfg))
    with one_torch_thread():
        return render_sheet(
            sheet, renders_dir, RenderSettings.from_config(cfg), source, loader, log=lambda _: None
        )


def pixels(folder: Path) -> dict[str, str]:
    """Per PNG under ``folder``: a digest of its pixels (file bytes also hold the run's text chunks)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest()
        for p in sorted(folder.rglob("*.png"))
    }


def test_rerun_reproduces_and_only_changed_rows_rerender(tmp_path: Path, exported: Path, pipe: Any) -> None:
    cfg = project(tmp_path, exported, GOOD)
    calls: list[int] = []

    def loader() -> tuple[Any, list[str]]:
        calls.append(1)
        return pipe, []

    first = render(cfg, tmp_path / "a", loader)
    assert first.rendered == ["CS-1", "Ü-2"] and first.stats.images == 6 and first.stats.calls == 2
    again = render(cfg, tmp_path / "b", loader)  # a fresh folder: the very same images
    assert pixels(tmp_path / "a" / "candidates") == pixels(tmp_path / "b" / "candidates")
    seeds = [c["seed"] for c in first.records[1]["candidates"]]
    assert sorted(seeds) == sorted(c["seed"] for c in again.records[1]["candidates"])

    # Nothing changed: no model is loaded.
    calls.clear()
    assert render(cfg, tmp_path / "a", loader).reused == ["CS-1", "Ü-2"] and not calls

    # One row changed, one row added before it: only those render; Ü-2 keeps its seeds and files.
    before = pixels(tmp_path / "a" / "candidates" / "Ü-2")
    (tmp_path / "specs.csv").write_text(
        "sku,colour,type,characteristics,count,view\nNEW-3,red,casual,,1,\nCS-1,navy,casual,lace-up,1,side\n"
        "Ü-2,white,casual sneakers,,2,\n",
        encoding="utf-8",
    )
    changed = render(cfg, tmp_path / "a", loader)
    assert changed.rendered == ["NEW-3", "CS-1"] and changed.reused == ["Ü-2"] and len(calls) == 1
    assert pixels(tmp_path / "a" / "candidates" / "Ü-2") == before

    # A LoRA with other tensors re-renders everything; a SKU that left the sheet is removed.
    (tmp_path / "specs.csv").write_text(
        "sku,colour,type,characteristics,count,view\nÜ-2,white,casual sneakers,,2,\n", encoding="utf-8"
    )
    old = json.loads((tmp_path / "a" / "candidates" / "Ü-2" / "render.json").read_text(encoding="utf-8"))
    newer = render(cfg, tmp_path / "a", loader, content_sha256="0" * 64)
    assert newer.rendered == ["Ü-2"] and sorted(newer.removed) == ["CS-1", "NEW-3"]
    # The re-rendered SKU remembers the images it replaced (for reviews.csv rows that name old files).
    assert [(p["file"], p["image_sha256"]) for p in newer.records[0]["previous"]] == [
        (c["file"], c["image_sha256"]) for c in old["candidates"]
    ]
    assert all(c["image_sha256"] for c in newer.records[0]["candidates"])
    assert sorted(p.name for p in (tmp_path / "a" / "candidates").iterdir()) == ["Ü-2"]


def test_materialize_publishes_good_skus_only(tmp_path: Path, exported: Path, tiny_sd_cache: Path) -> None:
    cfg_path = project(tmp_path, exported, GOOD + HOSTILE)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    resources = {
        "pipeline_config": PipelineConfigResource(config_path=str(cfg_path)),
        "device": DeviceResource(device="cpu"),
        "base_model": BaseModelResource(cache_dir=str(tiny_sd_cache)),
    }
    with one_torch_thread():
        result = dg.materialize(render_assets("casual_shoes"), resources=resources)
    assert result.success
    renders = tmp_path / "out" / "lora" / "renders"
    meta = {
        m.asset_key.path[-1]: m.materialization.metadata for m in result.get_asset_materialization_events()
    }
    assert meta["product_renders"]["rows_refused"].value == 8
    assert meta["product_renders"]["pipeline"].value == "final_pipeline"

    # The random tiny model draws noise: every approved image is flagged for amazon_main (never written
    # there), the compliance check fails and names each file and why; the manifest says the same.
    published = renders / "published"
    assert sorted(p.name for p in published.iterdir()) == ["amazon_main", "manifest.csv"]
    manifest = list(csv.DictReader((published / "manifest.csv").open(encoding="utf-8")))
    assert [r["sku"] for r in manifest] == ["CS-1", "Ü-2", "Ü-2"]
    assert all(r["amazon_main"].startswith("flagged: border not near-white") for r in manifest)
    assert all(r["hires"] == "128x128" for r in manifest)  # the hires pass ran on the approved ones only
    assert len(list((renders / "hires").rglob("*.png"))) == 3
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "amazon_main_compliance" and not check.passed
    assert (
        check.metadata["files_failing"].value == 3
        and "border not near-white" in check.metadata["failing"].value
    )
    assert not list((published / "amazon_main").rglob("*.jpg"))

    # Candidates that are product photos (a drawn white shoe, as a real LoRA would make) publish, with
    # hires off (the random model would turn them back into noise): readable A1111 parameters in EXIF,
    # provenance in XMP, a passing check.
    for png in (renders / "candidates").rglob("*.png"):
        white_sneaker(1024, (250, 450, 800, 700)).save(png)
    no_hires = tmp_path / "no_hires.yaml"
    no_hires.write_text(cfg_path.read_text().replace("renders:\n", "renders:\n  hires: {enabled: false}\n"))
    publish_only = {**resources, "pipeline_config": PipelineConfigResource(config_path=str(no_hires))}
    result = dg.materialize(render_assets("casual_shoes")[1:], resources=publish_only)
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.metadata["failing"].value
    jpgs = sorted((published / "amazon_main").rglob("*.jpg"))
    assert [p.parent.name for p in jpgs] == ["CS-1", "Ü-2", "Ü-2"]
    lora_sha = lora_source(exported / "lora_weights", None).lora_sha256
    for jpg in jpgs:
        found = read_marking(jpg)
        assert found["digital_source_type"] == TRAINED_ALGORITHMIC_MEDIA and found["c2pa"]["present"] is False
        params = parse_a1111_parameters(found["parameters"])
        assert params["Steps"] == "2" and params["Size"] == "64x64" and params["Sampler"] == "DPM++ 2M"
        assert params["Lora hashes"].startswith("casual_shoes_lora: ")
        render_info = found["render"]
        assert render_info["lora_sha256"] == lora_sha and render_info["dagster_run_id"] == result.run_id
        assert render_info["config_hash"] and str(render_info["seed"]) == params["Seed"]
        assert render_info["lora_provenance"]["dagster_run_id"] == "lora-run-1"
    # `shoe-lora audit` / `lineage` read a published JPEG like any exported file.
    assert lora_io.read_provenance(jpgs[0])["provenance"]["dagster_run_id"] == "lora-run-1"
    assert (published / "amazon_main" / "SHA256SUMS").read_text().count("\n") == 3

    # Every refused row is named; nothing was written outside the renders folder; the sheet is untouched.
    rejected = (renders / "rejected_specs.csv").read_text(encoding="utf-8")
    for why in (
        "path separator",
        "control character",
        "bytes long",
        "missing colour",
        "at least 1",
        "max_per_sku",
        "duplicate sku: line 2",
    ):
        assert why in rejected, why
    after = {
        p: p.stat().st_mtime_ns
        for p in tmp_path.rglob("*")
        if p.is_file() and renders not in p.parents and p != no_hires
    }
    # ... but the category folder locks every step takes (core/category_lock.py).
    unlocked = lambda files: {p: t for p, t in files.items() if p.name not in category_lock.FILE_NAMES}  # noqa: E731
    assert unlocked(after) == unlocked(before)
    html = (renders / "contact_sheet.html").read_text(encoding="utf-8")
    assert "candidates/%C3%9C-2/" in html and "http" not in html  # images by relative path only
    # What users read: the hashed file named with its hash, the exact publish command, readable settings.
    assert f"LoRA file <code>pytorch_lora_weights.safetensors</code> sha256 <code>{lora_sha}</code>" in html
    command = meta["render_review"]["publish_command"].value
    assert "dg launch --assets render_review,published_renders" in command and "DAGSTER_HOME=" in command
    assert f"SHOE_LORA_CONFIG={cfg_path.resolve()}" in command
    assert "Settings: 2 steps · CFG 7.5 · DPM++ 2M · 64×64 px" in html
    # Asset pages: paths as paths, short hashes in tables with the full ones as their own entries,
    # true/false (not Python's False), a thumbnail that says which SKU and file it is.
    for stage, key in [
        ("product_renders", "rejected_specs_csv"),
        ("render_review", "contact_sheet"),
        ("published_renders", "manifest"),
    ]:
        assert isinstance(meta[stage][key], dg.PathMetadataValue), (stage, key)
    assert meta["product_renders"]["lora_sha256"].value == lora_sha
    assert meta["published_renders"]["lora_sha256"].value == lora_sha
    table = meta["published_renders"]["published"].value
    assert "False" not in table and "True" not in table and ("| false |" in table or "| true |" in table)
    header = [c.strip() for c in table.splitlines()[0].split("|")]
    shas = [line.split("|")[header.index("sha256")].strip() for line in table.splitlines()[2:]]
    assert shas and all(len(s) == 12 for s in shas)
    best = meta["product_renders"]["best_candidate"].value
    first_sku = sorted(p.name for p in (published / "amazon_main").iterdir() if p.is_dir())[0]
    caption = best.split("![", 1)[0]
    assert first_sku in caption and ".png" in caption

    # A reviewer rejects one published image: the next review + publish replaces it with the next best.
    reviews = renders / "reviews.csv"
    first_cs1 = next((published / "amazon_main" / "CS-1").iterdir()).stem + ".png"
    reviews.write_text(
        reviews.read_text(encoding="utf-8").replace(f"CS-1,{first_cs1},,", f"CS-1,{first_cs1},reject,bad"),
        encoding="utf-8",
    )
    # published_renders alone (render_review not re-run) already leaves the rejected image out.
    only = dg.materialize(render_assets("casual_shoes")[2:], resources=publish_only)
    assert only.success and first_cs1[:-4] not in [p.stem for p in (published / "amazon_main" / "CS-1").glob("*")]
    again = dg.materialize(render_assets("casual_shoes")[1:], resources=publish_only)
    assert again.success
    assert [p.stem for p in (published / "amazon_main" / "CS-1").iterdir()] != [first_cs1[:-4]]
    assert f"CS-1,{first_cs1},reject,bad" in reviews.read_text(encoding="utf-8")
    assert "note: bad" in (renders / "contact_sheet.html").read_text(encoding="utf-8")  # the reviewer's note

    # A truncated candidate: its SKU is flagged (named in the check), the other SKU still publishes.
    published_before = sorted(p.name for p in (published / "amazon_main").rglob("*.jpg"))
    cs1 = published / "amazon_main" / "CS-1"
    broken = renders / "candidates" / "CS-1" / (next(cs1.iterdir()).stem + ".png")
    good_bytes = broken.read_bytes()
    broken.write_bytes(good_bytes[:100])
    flagged = dg.materialize(render_assets("casual_shoes")[2:], resources=publish_only)
    (check,) = flagged.get_asset_check_evaluations()
    assert not check.passed and "unreadable" in check.metadata["failing"].value
    assert [p.parent.name for p in (published / "amazon_main").rglob("*.jpg")] == ["Ü-2", "Ü-2"]
    assert broken.read_bytes() == good_bytes[:100]  # candidates are only read
    broken.write_bytes(good_bytes)

    # A failure in the middle of a publication leaves the previous profile folder as it was.
    dg.materialize(render_assets("casual_shoes")[2:], resources=publish_only)
    before_files = {p: p.read_bytes() for p in (published / "amazon_main").rglob("*") if p.is_file()}
    assert sorted(p.name for p in before_files if p.suffix == ".jpg") == published_before
    calls: list[int] = []

    def dies_on_second(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_publish_image(*args, **kwargs)

    real_publish_image = publish_module.publish_image
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(publish_module, "publish_image", dies_on_second)
        failed = dg.materialize(
            render_assets("casual_shoes")[2:], resources=publish_only, raise_on_error=False
        )
    assert not failed.success
    after_files = {p: p.read_bytes() for p in (published / "amazon_main").rglob("*") if p.is_file()}
    assert after_files == before_files
    assert not [p for p in published.parent.iterdir() if p.name.startswith(".published")]
    assert not [p for p in published.iterdir() if p.name.startswith(".")]


def test_hires_pass_same_pipeline_same_seed_cached(tmp_path: Path, pipe: Any) -> None:
    settings = HiresSettings(scale=2.0, denoise=0.35, steps=4, guidance_scale=7.5)
    loads: list[int] = []

    def loader() -> tuple[Any, list[str]]:
        loads.append(1)
        return pipe, []

    base = white_sneaker(64, (12, 26, 46, 44))
    args = ("S-1", "k" * 64, "000-abc.png", base, "white sneakers", "blurry", 7)
    first = HiresPass(settings, tmp_path / "a", loader, log=lambda _: None)
    with one_torch_thread():
        a = first(*args)
        b = HiresPass(settings, tmp_path / "b", loader, log=lambda _: None)(*args)
        other_seed = HiresPass(settings, tmp_path / "c", loader, log=lambda _: None)(*args[:-1], 8)
    assert a.size == (128, 128) and len(loads) == 3
    assert np.array_equal(np.asarray(a), np.asarray(b))  # same seed, same pixels
    assert not np.array_equal(np.asarray(a), np.asarray(other_seed))
    again = first(*args)  # cached: no pipeline, same pixels
    assert len(loads) == 3 and first.reused == 1 and np.array_equal(np.asarray(again), np.asarray(a))
    # Another publication that no longer needs it prunes the cache.
    later = HiresPass(settings, tmp_path / "a", loader, log=lambda _: None)
    assert later.prune() == 1 and not list((tmp_path / "a").rglob("*.png"))
    # The img2img pipeline shares the loaded components: no second copy of the weights.
    img2img = img2img_from(pipe)
    assert img2img.unet is pipe.unet and img2img.vae is pipe.vae and img2img.text_encoder is pipe.text_encoder
    # A1111 records the pass with its own field names.
    text = a1111_parameters(
        prompt="p",
        negative_prompt="n",
        steps=25,
        sampler="DPM++ 2M",
        cfg_scale=7.5,
        seed=7,
        size=512,
        model_hash=None,
        model=None,
        lora_name="casual_shoes_lora",
        lora_hash="0123456789ab",
        extra_fields=settings.a1111_fields(),
    )
    parsed = parse_a1111_parameters(text)
    assert (parsed["Denoising strength"], parsed["Hires upscale"], parsed["Hires steps"]) == (
        "0.35",
        "2",
        "4",
    )
    assert (
        parsed["Hires upscaler"] == "Lanczos" and parsed["Lora hashes"] == "casual_shoes_lora: 0123456789ab"
    )


def test_cli_render_one_sku(
    tmp_path: Path,
    exported: Path,
    tiny_sd_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg_path = project(tmp_path, exported, GOOD)
    monkeypatch.setenv("SHOE_LORA_CACHE", str(tiny_sd_cache))
    args = [
        "render",
        "--config",
        str(cfg_path),
        "--sku",
        "ONE-1",
        "--colour",
        "navy",
        "--type",
        "loafers",
        "--count",
        "1",
    ]
    with one_torch_thread():
        # The random tiny model draws noise: rendered, reviewed, hires-passed, then flagged for amazon_main.
        assert cli_main(args) == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith("flagged: border not near-white") and "profile=amazon_main" in line
    oneoff = tmp_path / "out" / "lora" / "renders" / "oneoff" / "ONE-1"
    (hires,) = (oneoff / "hires" / "ONE-1").iterdir()
    assert Image.open(hires).size == (128, 128)
    params = parse_a1111_parameters(
        read_png_provenance(next((oneoff / "candidates").rglob("*.png")))["parameters"]
    )
    assert params["prompt"].startswith("A professional product photo of navy loafers on white background")
    assert cli_main([*args[:4], "../bad", *args[5:]]) == 2


def test_sensor_launches_one_run_per_sheet_change(tmp_path: Path, exported: Path) -> None:
    cfg_path = project(tmp_path, exported, GOOD)
    defs = build_definitions(cfg_path)
    sensor = defs.resolve_sensor_def("specs_sheet_sensor")
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor: str | None) -> dg.SensorResult:
        return sensor(dg.build_sensor_context(cursor=cursor, instance=instance, definitions=defs))

    first = tick(None)
    assert len(first.run_requests) == 1
    request = first.run_requests[0]
    assert set(request.asset_selection) == {dg.AssetKey(name) for name in RENDER_STAGE_NAMES}
    digest = json.loads(first.cursor)["casual_shoes"]
    assert request.run_key == f"casual_shoes:{digest}"
    assert tick(first.cursor).run_requests == []  # unchanged sheet: nothing

    (tmp_path / "specs.csv").write_text(GOOD + "CS-9,red,casual,,1,\n", encoding="utf-8")
    second = tick(first.cursor)
    assert len(second.run_requests) == 1 and second.run_requests[0].run_key != request.run_key
    assert [r.run_key for r in tick(first.cursor).run_requests] == [
        second.run_requests[0].run_key
    ]  # same key

    # A sheet already rendered by hand (its hash is on the last materialisation) launches nothing.
    (tmp_path / "specs.csv").write_text(GOOD, encoding="utf-8")
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key="product_renders", metadata={"specs_sha256": digest})
    )
    assert tick(second.cursor).run_requests == []
