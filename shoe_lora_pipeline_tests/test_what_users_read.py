"""Values people read: the contact sheet, the audit of a published PNG, rounded numbers, the training loss
the checklist names, the validation grid's labels (each a defect a user found; see also
renders/test_renders.py and dagster/test_asset_pages.py for the pages of a real run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shoe_lora_pipeline import cli
from shoe_lora_pipeline.core.config import EvaluationThresholds
from shoe_lora_pipeline.core.display import UI_IMAGE_SIDE, render_settings_text, round_for_display
from shoe_lora_pipeline.core.evaluation.checks import check_descriptions, checklist
from shoe_lora_pipeline.core.evaluation.report import Findings, metric_rows
from shoe_lora_pipeline.core.renders.pnginfo import png_info
from shoe_lora_pipeline.core.renders.review import Review, contact_sheet_html

LORA_SHA = "22b1a90d" + "0" * 56  # sha256 of pytorch_lora_weights.safetensors
KOHYA_HASH = "97cf3a70aaaa"


def sheet(**kwargs: object) -> str:
    index = {
        "specs_sha256": "ab" * 32,
        "lora": {
            "lora_file": "pytorch_lora_weights.safetensors",
            "lora_sha256": LORA_SHA,
            "name": "casual_shoes_lora",
            "a1111_hash": KOHYA_HASH,
        },
        "settings": {
            "steps": 25,
            "guidance_scale": 7.5,
            "size": 512,
            "sampler": "dpmpp_2m",
            "seed": 0,
            "candidates_per_image": 4,
        },
    }
    candidate = {
        "file": "000-abc.png",
        "rank": 1,
        "seed": 7,
        "qa": {"passed": False, "score": 0.5, "failed": []},
    }
    records = [
        {"sku": "CS-1", "row": {"count": 1, "prompt": "p", "negative_prompt": "n"}, "candidates": [candidate]}
    ]
    reviews = [Review("CS-1", "000-abc.png", "reject", "sole is cut off")]
    return contact_sheet_html(index, records, reviews, {"CS-1": []}, [], run_id="run-1", **kwargs)


def test_contact_sheet_names_the_file_whose_hash_it_shows() -> None:
    page = sheet()
    assert f"LoRA file <code>pytorch_lora_weights.safetensors</code> sha256 <code>{LORA_SHA}</code>" in page
    # The kohya file's name is never paired with the diffusers file's hash.
    assert "casual_shoes_lora</code> sha256" not in page


def test_contact_sheet_gives_the_exact_publish_command() -> None:
    command = (
        "cd /repo && DAGSTER_HOME=/repo/.dagster_home dg launch --assets render_review,published_renders"
    )
    page = sheet(publish_command=command)
    assert f"<code>{command.replace('&', '&amp;')}</code>" in page
    assert "materialize render_review again" not in page


def test_contact_sheet_shows_settings_readably_and_the_reviewers_notes() -> None:
    page = sheet(sampler_names={"dpmpp_2m": "DPM++ 2M"})
    assert "Settings: 25 steps · CFG 7.5 · DPM++ 2M · 512×512 px · seed 0 · 4 candidates per image" in page
    assert "{'steps'" not in page and "{&#x27;steps" not in page
    assert "note: sole is cut off" in page


def test_render_settings_text_keeps_unknown_keys() -> None:
    assert render_settings_text({"steps": 2, "hires": True}) == "2 steps · hires True"
    assert render_settings_text({"candidates_per_image": 1}) == "1 candidate per image"


def test_numbers_are_rounded_for_display_only() -> None:
    assert round_for_display(19.47440835875556) == 19.47
    assert round_for_display(0.0016305780652752604) == 0.001631
    assert round_for_display(1.02104) == 1.021
    assert round_for_display(0.0) == 0.0 and round_for_display(float("inf")) == float("inf")


def test_the_checklist_names_the_loss_it_compares_and_shows_the_same_number() -> None:
    summary = {"final_loss": 1.0288, "smoothed_loss": 1.021043}
    t = EvaluationThresholds()
    checks = checklist({}, None, summary, t)
    rows = metric_rows(Findings({}, {}, None, None, t, checks, summary))
    loss_row = next(r for r in rows if "training loss" in r[0])
    # The smoothed loss, under lora_training's name for it, with lora_training's digits.
    assert loss_row[0] == "Smoothed training loss (smoothed_loss) ↓"
    assert loss_row[2] == f"{round_for_display(summary['smoothed_loss']):g}" == "1.021"
    assert "smoothed_loss" in check_descriptions(t)["final_loss"]
    assert "final_loss" in check_descriptions(t)["final_loss"]  # and says which one it is not
    last = {"final_loss": 1.0288}
    only_last = metric_rows(Findings({}, {}, None, None, t, checklist({}, None, last, t), last))
    label = next(r for r in only_last if "training loss" in r[0].lower())[0]
    assert label == "Last-step training loss (final_loss) ↓"


def test_validation_grid_labels_are_readable_at_ui_size() -> None:
    from shoe_lora_pipeline.core.validation import LABEL_PX, make_grid

    cells = [[Image.new("RGB", (512, 512), (128, 128, 128))] * 4 for _ in range(4)]
    grid = make_grid(cells, ["… black …", "… brown leather …", "… white …", "… blue …"], "step 500 (epoch 3)")
    shown = UI_IMAGE_SIDE / max(grid.size)  # the UI's thumbnail scale
    # The first label's ink: dark pixels in the white band between the title and the first image row.
    pixels = np.asarray(grid.convert("L"))
    first_image_row = int(np.argmax(pixels[:, 10] == 128))
    band = pixels[:first_image_row]
    ink_rows = np.flatnonzero((band < 128).any(axis=1))
    title_and_label = np.split(ink_rows, np.flatnonzero(np.diff(ink_rows) > 1) + 1)
    label = title_and_label[-1]
    assert (label[-1] - label[0] + 1) * shown >= 0.6 * LABEL_PX  # glyph height on screen, x-height+ascenders


@pytest.fixture
def published_png(tmp_path: Path) -> Path:
    render = {
        "schema": "shoe_lora_pipeline/render/v1",
        "sku": "CS-1",
        "dagster_run_id": "publish-run-2",
        "render_run_id": "render-run-1",
        "qa": {"passed": False, "score": 0.6459, "failed": ["white_border"], "checks": {"centred": True}},
        "lora_provenance": {"dagster_run_id": "train-run-0", "dataset_name": "casual_shoes"},
    }
    path = tmp_path / "render.png"
    Image.new("RGB", (8, 8), "white").save(path, pnginfo=png_info("a shoe\nSteps: 2", render))
    return path


def test_audit_of_a_png_shows_its_qa_and_names_the_two_runs_apart(
    published_png: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["audit", str(published_png), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["qa"]["passed"] is False and record["qa"]["score"] == 0.6459
    assert record["provenance"]["dagster_run_id"] == "train-run-0"
    assert record["extra"]["publish_run_id"] == "publish-run-2" and "dagster_run_id" not in record["extra"]

    assert cli.main(["audit", str(published_png)]) == 0
    text = capsys.readouterr().out
    assert "QA (product-photo checks" in text
    qa_rows = text.split("QA (product-photo checks", 1)[1].splitlines()[1:4]
    assert [r.split()[:2] for r in qa_rows] == [
        ["passed", "false"],
        ["score", "0.6459"],
        ["failed", "white_border"],
    ]
    assert "failed" in text and "white_border" in text
    assert "Provenance of the LoRA (dagster_run_id: its training run)" in text
    assert text.count("dagster_run_id ") == 1  # the LoRA's, once; the publishing run is publish_run_id
    assert "publish_run_id" in text and "publish-run-2" in text and "render_run_id" in text
