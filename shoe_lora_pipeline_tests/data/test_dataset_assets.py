"""The data stage wired through Dagster: materialize() on a temp copy of the demo data."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image

from shoe_lora_pipeline.assets import STAGES, category_assets
from shoe_lora_pipeline.definitions import defs
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource
from shoe_lora_pipeline_tests.support.paths import DEMO_RAW_DIR, REPO_ROOT

DATA_STAGES = [s.key.to_user_string() for s in STAGES if s.group_names_by_key[s.key] == "dataset"]
DATA_CHECKS = {
    "cleaned_images_are_square_rgb_png",
    "valid_ratio_above_minimum",
    "train_images_have_one_caption",
    "no_image_in_two_splits",
}


def write_config(tmp_path: Path, raw_dir: Path, resolution: int = 128, extra: str = "") -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"""
dataset:
  name: casual_shoes
  raw_dir: {raw_dir}
  output_dir: out/casual_shoes
  resolution: {resolution}
  min_valid_ratio: 0.5
  cleaning: {{workers: 1}}
training:
  base_model: tiny-sd
  output_dir: out/casual_shoes/lora
device: cpu
{extra}"""
    )
    return cfg


def folder_fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def materialize_data(cfg_path: Path, category: str = "casual_shoes") -> dg.ExecuteInProcessResult:
    return dg.materialize(
        category_assets(category, DATA_STAGES),
        resources={"pipeline_config": PipelineConfigResource(config_path=str(cfg_path))},
    )


def by_stage(result: dg.ExecuteInProcessResult) -> dict:
    """Materialisations by stage name (the key without its category prefix)."""
    return {m.asset_key.path[-1]: m for m in result.get_asset_materialization_events()}


@pytest.fixture()
def demo_copy(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    shutil.copytree(DEMO_RAW_DIR, raw)
    return raw


def test_definitions_load_with_every_stage() -> None:
    loaded = defs()  # what Dagster loads (the @dg.definitions function)
    graph = loaded.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert set(DATA_STAGES) <= keys  # the first category keeps the plain stage names
    assert isinstance(loaded.resources["pipeline_config"], PipelineConfigResource)
    assert isinstance(loaded.resources["device"], DeviceResource)
    assert isinstance(loaded.resources["base_model"], BaseModelResource)


def test_data_stage_on_demo_data(tmp_path: Path, demo_copy: Path) -> None:
    before = folder_fingerprint(demo_copy)
    cfg_path = write_config(tmp_path, demo_copy)
    result = materialize_data(cfg_path)
    assert result.success

    checks = result.get_asset_check_evaluations()
    assert {c.check_name for c in checks} == DATA_CHECKS
    assert all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks if not c.passed]

    out = tmp_path / "out" / "casual_shoes"
    mats = by_stage(result)
    cleaned_meta = mats["cleaned_images"].materialization.metadata
    assert cleaned_meta["rejected_count"].value > 0  # the demo ships deliberately invalid files
    assert (out / "cleaned" / "discard_report.csv").exists()

    entries = json.loads((out / "captions.json").read_text())
    assert entries and all(
        set(e) >= {"image_file", "caption", "metadata"}
        and "original_size" in e["metadata"]
        and "processed" in e["metadata"]
        for e in entries
    )
    train = json.loads((out / "train" / "captions.json").read_text())
    train_files = {p.name for p in (out / "train" / "images").glob("*.png")}
    assert train_files == {e["image_file"] for e in train}
    with Image.open(out / "train" / "images" / sorted(train_files)[0]) as im:
        assert (im.mode, im.size, im.format) == ("RGB", (128, 128), "PNG")

    # The raw folder is byte-identical (and untouched) after the whole stage.
    assert folder_fingerprint(demo_copy) == before

    # Data version of raw_images is the manifest hash; unchanged folder → same version on re-run.
    v1 = mats["raw_images"].materialization.tags["dagster/data_version"]
    again = materialize_data(cfg_path)
    mats2 = by_stage(again)
    assert mats2["raw_images"].materialization.tags["dagster/data_version"] == v1
    assert mats2["cleaned_images"].materialization.metadata["processed_this_run"].value == 0


def test_incremental_rerun_processes_only_new_files(tmp_path: Path, demo_copy: Path) -> None:
    cfg_path = write_config(tmp_path, demo_copy)
    assert materialize_data(cfg_path).success
    for i, colour in enumerate([(20, 20, 20), (30, 60, 160)]):
        im = Image.new("RGB", (400, 300), "white")
        im.paste(colour, (100, 120, 300, 200))
        im.save(demo_copy / f"9990{i}.jpg", quality=90)
    result = materialize_data(cfg_path)
    assert result.success
    mats = by_stage(result)
    assert mats["cleaned_images"].materialization.metadata["processed_this_run"].value == 2
    captions_meta = mats["captions"].materialization.metadata
    assert captions_meta["captioned_this_run"].value == 2  # the other captions are reused as they were
    assert captions_meta["reused_unchanged"].value == captions_meta["num_captions"].value - 2


def test_data_steps_load_no_torch() -> None:
    """Loading the code location and the data stage's core never imports torch & co.: a data step
    (or its process) would otherwise pay seconds for libraries it does not use."""
    code = (
        "import sys, shoe_lora_pipeline.definitions\n"
        "from shoe_lora_pipeline.core import captions, cleaning, manifest, normalise, pool, splits\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'peft', 'accelerate', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_hostile_raw_dir_never_crashes(tmp_path: Path) -> None:
    raw = tmp_path / "hostile"
    raw.mkdir()
    (raw / "empty.jpg").write_bytes(b"")
    (raw / "text.png").write_text("not an image")
    (raw / "styles.csv").write_text("id,gender\n../../etc/passwd,Men\n")
    (raw / "link.jpg").symlink_to("/etc/hostname")
    good = Image.new("RGB", (300, 300), "white")
    good.paste((0, 0, 0), (50, 100, 250, 200))
    good.save(raw / "1.png")
    before = folder_fingerprint(raw)
    result = materialize_data(write_config(tmp_path, raw))
    assert result.success
    mats = by_stage(result)
    assert mats["raw_images"].materialization.metadata["num_skipped"].value == 1  # the symlink out
    assert mats["cleaned_images"].materialization.metadata["rejected_count"].value == 2
    assert folder_fingerprint(raw) == before


def test_bad_config_fails_before_any_asset_runs(tmp_path: Path, demo_copy: Path) -> None:
    cfg_path = write_config(tmp_path, demo_copy, extra="")
    cfg_path.write_text(
        cfg_path.read_text().replace("  base_model: tiny-sd", "  base_model: tiny-sd\n  learning_rate: -1")
    )
    with pytest.raises(Exception) as err:  # noqa: PT011 - Dagster wraps it; the cause is what users read
        materialize_data(cfg_path)
    chain, exc = [], err.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__
    assert any("training.learning_rate = -1" in m and str(cfg_path) in m for m in chain), chain
    assert not (tmp_path / "out").exists()
