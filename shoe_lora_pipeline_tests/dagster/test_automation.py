"""Categories, jobs, the retraining schedule and the new-photo sensor."""

import hashlib
import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from shoe_lora_pipeline.assets import STAGE_NAMES, STAGES, category_assets
from shoe_lora_pipeline.core.config import ConfigError, load_config
from shoe_lora_pipeline.definitions import RENDER_STAGE_NAMES, build_definitions
from shoe_lora_pipeline.resources import PipelineConfigResource
from shoe_lora_pipeline_tests.support.paths import DEMO_RAW_DIR

DATA_STAGES = [s.key.to_user_string() for s in STAGES if s.group_names_by_key[s.key] == "dataset"]


def photos(folder: Path, ids: list[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        shutil.copy2(DEMO_RAW_DIR / f"{i}.jpg", folder / f"{i}.jpg")
    return folder


def two_category_config(tmp_path: Path) -> Path:
    photos(tmp_path / "shoes_raw", [10004, 10005, 10006, 10008, 10010])
    photos(tmp_path / "boots_raw", [10011, 10012, 10021, 10022])
    cfg = tmp_path / "two.yaml"
    cfg.write_text(
        """
dataset:
  name: casual_shoes
  raw_dir: shoes_raw
  output_dir: out/casual_shoes
  resolution: 64
  min_valid_ratio: 0.5
  cleaning: {min_side: 32, workers: 1}
categories:
  boots:
    raw_dir: boots_raw
    output_dir: out/boots
    default_type: ankle boots
automation:
  retrain_cron: "30 2 * * 0"
  timezone: Europe/Berlin
  sensor_interval_seconds: 30
training:
  output_dir: out/casual_shoes/lora
device: cpu
"""
    )
    return cfg


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_single_dataset_section_is_one_category() -> None:
    cfg = load_config("configs/demo.yaml", check_paths=False)
    assert cfg.category_names() == ["casual_shoes"]
    assert cfg.for_category("casual_shoes").dataset.output_dir == cfg.dataset.output_dir
    defs = build_definitions("configs/demo.yaml")
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    # Unchanged asset keys for a single-category project, plus the renders group (the demo has a specs sheet).
    assert keys == set(STAGE_NAMES) | set(RENDER_STAGE_NAMES)
    # A scheduled retrain trains and evaluates; it never re-renders and republishes the shop's photos.
    retrain = defs.resolve_job_def("retrain_job").asset_layer.executable_asset_keys
    assert {k.to_user_string() for k in retrain} == set(STAGE_NAMES)


def test_categories_get_their_own_chains_and_folders(tmp_path: Path) -> None:
    cfg_path = two_category_config(tmp_path)
    cfg = load_config(cfg_path)
    boots = cfg.for_category("boots")
    assert boots.dataset.name == "boots" and boots.dataset.default_type == "ankle boots"
    assert boots.dataset.resolution == 64  # inherited from dataset:
    assert boots.training.output_dir == (tmp_path / "out" / "boots" / "lora").resolve()
    with pytest.raises(ConfigError, match="unknown category 'sandals'"):
        cfg.for_category("sandals")

    graph = build_definitions(cfg_path).resolve_asset_graph()
    parents = graph.get(dg.AssetKey(["boots", "cleaned_images"])).parent_keys
    assert parents == {dg.AssetKey(["boots", "raw_images"])}
    assert graph.get(dg.AssetKey(["cleaned_images"])).parent_keys == {dg.AssetKey(["raw_images"])}


def test_categories_must_not_share_output_folders(tmp_path: Path) -> None:
    cfg_path = two_category_config(tmp_path)
    cfg_path.write_text(cfg_path.read_text().replace("output_dir: out/boots", "output_dir: out/casual_shoes"))
    with pytest.raises(ConfigError, match="share the output folder"):
        load_config(cfg_path)


def test_one_category_never_touches_another(tmp_path: Path) -> None:
    cfg_path = two_category_config(tmp_path)
    resources = {"pipeline_config": PipelineConfigResource(config_path=str(cfg_path))}
    assert dg.materialize(category_assets("casual_shoes", DATA_STAGES), resources=resources).success
    shoes_before = tree_digest(tmp_path / "out" / "casual_shoes")
    result = dg.materialize(category_assets("boots", DATA_STAGES, primary=False), resources=resources)
    assert result.success
    assert all(c.passed for c in result.get_asset_check_evaluations())
    assert tree_digest(tmp_path / "out" / "casual_shoes") == shoes_before
    captions = json.loads((tmp_path / "out" / "boots" / "captions.json").read_text())
    assert captions and all(e["metadata"]["source"] for e in captions)


def test_jobs_and_schedule_come_from_config(tmp_path: Path) -> None:
    defs = build_definitions(two_category_config(tmp_path))
    retrain = defs.resolve_job_def("retrain_job")
    dataset = defs.resolve_job_def("dataset_job")
    assert len(retrain.asset_layer.executable_asset_keys) == 2 * len(STAGE_NAMES)
    assert {k.path[-1] for k in dataset.asset_layer.executable_asset_keys} == set(DATA_STAGES)
    schedule = defs.resolve_schedule_def("retrain_schedule")
    assert schedule.cron_schedule == "30 2 * * 0" and schedule.execution_timezone == "Europe/Berlin"
    assert schedule.job_name == "retrain_job"


def test_sensor_launches_one_run_for_the_changed_category(tmp_path: Path) -> None:
    cfg_path = two_category_config(tmp_path)
    defs = build_definitions(cfg_path)
    sensor = defs.resolve_sensor_def("new_photos_sensor")
    assert sensor.minimum_interval_seconds == 30
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor: str | None) -> dg.SensorResult:
        return sensor(dg.build_sensor_context(cursor=cursor, instance=instance, definitions=defs))

    # Both categories have photos nobody has trained on yet: one request each.
    first = tick(None)
    assert sorted(r.tags["category"] for r in first.run_requests) == ["boots", "casual_shoes"]
    # Train both (data stage is enough for the sensor's bookkeeping: raw_images' data version).
    resources = {"pipeline_config": PipelineConfigResource(config_path=str(cfg_path))}
    for category, primary in (("casual_shoes", True), ("boots", False)):
        assets = category_assets(category, ["raw_images"], primary=primary)
        assert dg.materialize(assets, resources=resources, instance=instance).success

    # Nothing changed on disk: no request, and no file is read (listing fingerprint unchanged).
    second = tick(first.cursor)
    assert second.run_requests == []

    # A new boot photo: exactly one run, for boots only, over boots' whole chain.
    shutil.copy2(DEMO_RAW_DIR / "10016.jpg", tmp_path / "boots_raw" / "10016.jpg")
    third = tick(second.cursor)
    assert len(third.run_requests) == 1
    request = third.run_requests[0]
    assert request.tags["category"] == "boots"
    assert set(request.asset_selection) == {dg.AssetKey(["boots", s]) for s in STAGE_NAMES}
    assert request.run_key.startswith("boots:")

    # Evaluating again before the run happened asks for the same run key (Dagster dedupes it) ...
    again = tick(second.cursor)
    assert [r.run_key for r in again.run_requests] == [request.run_key]
    # ... and a touched-but-identical file launches nothing.
    fourth = tick(third.cursor)
    assert fourth.run_requests == []
    (tmp_path / "shoes_raw" / "10004.jpg").touch()
    assert tick(fourth.cursor).run_requests == []
