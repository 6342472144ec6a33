"""The demo's LoRA on tiny-shoes (issue 19): the whole graph on the demo config, then the evaluation
report's base-vs-LoRA shares on the same seeds and the validation loss.

The base model was pretrained on varied backdrops (captions always say "on white background"); the demo
photos are on white. The issue's goals (base white background below 50 %, LoRA at least 90 %) are NOT met
by the committed model: see ``test_demo_lora_meets_the_white_background_goal`` (strict xfail, so it turns
red the day they are met and the marker must go).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
import yaml

from shoe_lora_pipeline.assets import category_assets
from shoe_lora_pipeline.core.evaluation.report import LORA_EFFECT_GOALS
from shoe_lora_pipeline.core.run_artifacts import read_validation_losses
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource
from shoe_lora_pipeline_tests.support.paths import REPO_ROOT

pytestmark = pytest.mark.slow


def demo_config(tmp_path: Path) -> Path:
    """configs/demo.yaml as shipped, with its outputs in ``tmp_path`` (inputs stay the repository's)."""
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
    cfg["dataset"]["raw_dir"] = str(REPO_ROOT / "data" / "casual_shoes" / "raw")
    cfg["dataset"]["output_dir"] = str(tmp_path / "out")
    cfg["training"]["output_dir"] = str(tmp_path / "out" / "lora")
    cfg["renders"]["specs_csv"] = str(REPO_ROOT / "data" / "casual_shoes" / "specs.csv")
    cfg["device"] = "cpu"
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path = tmp_path_factory.mktemp("demo")
    resources = {
        "pipeline_config": PipelineConfigResource(config_path=str(demo_config(tmp_path))),
        "device": DeviceResource(),
        "base_model": BaseModelResource(),
    }
    result = dg.materialize(category_assets("casual_shoes"), resources=resources)
    assert result.success
    lora_dir = tmp_path / "out" / "lora"
    return {
        "metrics": json.loads((lora_dir / "evaluation" / "metrics.json").read_text()),
        "report": (lora_dir / "evaluation" / "report.md").read_text(),
        "val_losses": [r["val_loss"] for r in read_validation_losses(lora_dir / "validation_loss.csv")],
    }


def _border_brightness(qa: dict[str, Any]) -> float:
    return float(
        np.mean([np.mean(i["white_background"]["details"]["border_median_rgb"]) for i in qa["images"]])
    )


def test_demo_report_compares_base_and_lora_on_the_same_seeds(demo_run: dict[str, Any]) -> None:
    base, lora = demo_run["metrics"]["qa"]["base"], demo_run["metrics"]["qa"]["lora"]
    assert base["n_images"] == lora["n_images"] == 64  # 4 validation prompts x 16 seeds, same seeds
    assert [i["path"].split("/")[-1] for i in base["images"]] == [
        i["path"].split("/")[-1] for i in lora["images"]
    ]
    assert "| White background |" in demo_run["report"] and "base < 50%, LoRA ≥ 90%" in demo_run["report"]
    # The LoRA, trained on the white demo photos, moves the backdrop towards white and lowers the
    # held-out validation loss.
    assert _border_brightness(lora) > _border_brightness(base)
    losses = demo_run["val_losses"]
    assert len(losses) >= 2 and losses[-1] < losses[0]


@pytest.mark.xfail(
    strict=True,
    reason="issue 19 goal not met by the committed tiny-shoes: its backdrops are grey-ish and the demo LoRA "
    "brightens them only a little (measured base 0 %, LoRA 0 % white; see data/models/tiny-shoes/README.md)",
)
def test_demo_lora_meets_the_white_background_goal(demo_run: dict[str, Any]) -> None:
    base, lora = demo_run["metrics"]["qa"]["base"], demo_run["metrics"]["qa"]["lora"]
    below, at_least = LORA_EFFECT_GOALS["white_background_share"]
    assert base["white_background_share"] < below
    assert lora["white_background_share"] >= at_least
