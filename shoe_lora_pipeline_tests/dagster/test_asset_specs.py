"""The Dagster layer's declarations: plain ``@dg.asset`` stages, one chain per category, descriptions the
UI can show, lazy definitions, and the audit metadata every materialisation records."""

import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from shoe_lora_pipeline.assets import STAGE_NAMES, STAGES, category_assets, raw_images
from shoe_lora_pipeline.assets._metadata import config_metadata
from shoe_lora_pipeline.core.config import load_config
from shoe_lora_pipeline.core.device import choose_device
from shoe_lora_pipeline.definitions import build_definitions
from shoe_lora_pipeline.resources import PipelineConfigResource
from shoe_lora_pipeline_tests.support.paths import DEMO_RAW_DIR, REPO_ROOT

# What a markdown renderer takes for an HTML tag (and then hides): ``<image>``, ``</b>``, ``<dataset>_x``.
HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")


def two_categories(tmp_path: Path) -> Path:
    cfg = tmp_path / "two.yaml"
    cfg.write_text(
        """
dataset: {name: casual_shoes, raw_dir: shoes_raw, output_dir: out/casual_shoes}
categories:
  boots: {raw_dir: boots_raw, output_dir: out/boots}
training: {output_dir: out/casual_shoes/lora}
"""
    )
    return cfg


def test_each_stage_module_declares_a_plain_dagster_asset() -> None:
    assert [s.key for s in STAGES] == [dg.AssetKey(name) for name in STAGE_NAMES]
    for stage in STAGES:
        spec = stage.get_asset_spec()
        assert isinstance(stage, dg.AssetsDefinition) and stage.op.name == spec.key.path[-1]
        assert spec.group_name in {"dataset", "training", "export", "evaluation"} and spec.description
        assert spec.code_version == "1"
    pools = {s.key.path[-1]: s.op.pool for s in STAGES}
    assert {k for k, pool in pools.items() if pool == "gpu"} == {
        "training_latents",
        "lora_training",
        "evaluation_report",
    }


def test_a_further_category_gets_the_same_asset_under_its_prefix() -> None:
    for template, boots in zip(STAGES, category_assets("boots", primary=False), strict=True):
        spec, mine = template.get_asset_spec(), boots.get_asset_spec()
        assert mine.key == spec.key.with_prefix("boots") and boots.op.name == f"boots__{spec.key.path[-1]}"
        assert [d.asset_key for d in mine.deps] == [d.asset_key.with_prefix("boots") for d in spec.deps]
        assert mine.tags == {**spec.tags, "category": "boots"}
        assert (mine.group_name, mine.description, mine.kinds, mine.code_version) == (
            spec.group_name,
            spec.description,
            spec.kinds,
            spec.code_version,
        )
        assert boots.op.pool == template.op.pool
        assert boots.required_resource_keys == template.required_resource_keys
        assert [(c.asset_key, c.name, c.description) for c in boots.check_specs] == [
            (mine.key, c.name, c.description) for c in template.check_specs
        ]
    (primary,) = category_assets("casual_shoes", ["raw_images"])
    assert primary.key == dg.AssetKey("raw_images")
    assert primary.tags_by_key[primary.key]["category"] == "casual_shoes"
    with pytest.raises(ValueError, match="raw_imgs"):
        category_assets("casual_shoes", ["raw_imgs"])


def test_a_stage_asset_on_its_own_is_the_first_category(tmp_path: Path) -> None:
    """The module's plain ``@dg.asset`` has no category tag: it runs for the config's first category."""
    raw = tmp_path / "shoes_raw"
    raw.mkdir()
    for name in ("10004.jpg", "10005.jpg"):
        (raw / name).write_bytes((DEMO_RAW_DIR / name).read_bytes())
    (tmp_path / "boots_raw").mkdir()
    cfg = two_categories(tmp_path)
    resources = {"pipeline_config": PipelineConfigResource(config_path=str(cfg))}
    result = dg.materialize([raw_images.raw_images], resources=resources)
    (mat,) = result.get_asset_materialization_events()
    assert mat.materialization.metadata["category"].value == "casual_shoes"
    assert mat.materialization.metadata["num_files"].value == 2
    assert (tmp_path / "out" / "casual_shoes" / "raw_manifest.csv").is_file()


def test_descriptions_show_in_the_ui(tmp_path: Path) -> None:
    """The UI renders descriptions as markdown: a ``<name>`` placeholder would vanish as an HTML tag."""
    defs = build_definitions(two_categories(tmp_path))
    graph = defs.resolve_asset_graph()
    texts = {}
    for key in graph.get_all_asset_keys():
        assets_def = defs.resolve_assets_def(key)
        texts[key.to_user_string()] = assets_def.get_asset_spec(key).description
        texts |= {f"{key.to_user_string()}:{c.name}": c.description for c in assets_def.check_specs}
    texts |= {job.name: job.description for job in defs.resolve_all_job_defs()}
    texts |= {s.name: s.description for s in [*defs.schedules, *defs.sensors]}
    assert len(texts) > 2 * len(STAGE_NAMES)
    assert {name: text for name, text in texts.items() if HTML_TAG.search(text or "")} == {}
    assert "casual_shoes_lora.safetensors" in texts["lora_weights"]
    assert "1234.txt" in texts["captions"]


def test_importing_the_definitions_reads_no_config(tmp_path: Path) -> None:
    """Import is free of side effects; Dagster calls ``defs()`` to load, and only that reads the config."""
    missing = tmp_path / "nowhere.yaml"
    code = (
        "import dagster as dg\n"
        "import shoe_lora_pipeline.definitions as d\n"
        "print('imported')\n"
        "try:\n"
        "    d.defs()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={"PATH": "", "PYTHONPATH": str(REPO_ROOT), "SHOE_LORA_CONFIG": str(missing)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "imported"
    assert lines[1].startswith("ConfigError") and str(missing) in lines[1]


def test_audit_metadata_has_one_base_model_identity_and_one_device_form() -> None:
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", check_paths=False)
    assert cfg.training.revision is None  # the config names no revision; the resolved identity does
    identity = {
        "base_model": "tiny-sd",
        "path": "/cache/tiny-sd",
        "revision": "tiny-sd-v2",
        "fingerprint": "f0",
    }

    data_stage = config_metadata(cfg)
    assert not {"device", "device_details", "base_model", "base_model_revision"} & set(data_stage)

    device = choose_device("cpu")
    meta = config_metadata(cfg, device, identity)
    assert meta["base_model"] == "tiny-sd" and meta["base_model_revision"] == "tiny-sd-v2"
    assert meta["base_model_fingerprint"] == "f0"
    assert meta["device"] == "cpu"
    details = meta["device_details"]
    assert isinstance(details, dg.JsonMetadataValue) and details.value["type"] == "cpu"


def test_instance_settings_have_one_copy_that_the_readme_dagster_home_reads() -> None:
    """The layout keeps dagster.yaml in the repository root; the README's DAGSTER_HOME (.dagster_home/)
    reads it through a link, so dagster dev's warning about the root file is harmless (README says so)."""
    import yaml

    linked = REPO_ROOT / ".dagster_home" / "dagster.yaml"
    assert linked.is_symlink() and linked.resolve() == (REPO_ROOT / "dagster.yaml").resolve()
    settings = yaml.safe_load(linked.read_text())
    assert settings["concurrency"]["pools"]["default_limit"] == 1


def test_checklist_descriptions_state_the_configured_thresholds(tmp_path: Path) -> None:
    path = two_categories(tmp_path)
    path.write_text(path.read_text() + "evaluation: {thresholds: {fid_max: 55, white_background_min: 0.8}}\n")
    defs = build_definitions(path)
    for key in (dg.AssetKey("evaluation_report"), dg.AssetKey(["boots", "evaluation_report"])):
        checks = {c.name: c.description for c in defs.resolve_assets_def(key).check_specs}
        assert "55" in checks["fid"] and "30" not in checks["fid"]
        assert "80" in checks["white_background"]
