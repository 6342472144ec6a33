"""A reviewer's reject survives a no-op re-export (issue 17): the same checkpoint exports byte-identical
files, so renders are reused ("0 to render"), the reject stays on its row and the rejected image is not
published again. Also checks the modes of what the stages write under umask 022."""

import csv
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from shoe_lora_pipeline.assets import category_assets, render_assets
from shoe_lora_pipeline.core.models import tiny_sd_path
from shoe_lora_pipeline.core.renders.store import png_pixels_sha256
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource
from shoe_lora_pipeline_tests.support.export import make_training_checkpoint
from shoe_lora_pipeline_tests.support.training import one_torch_thread

SPECS = "sku,colour,type,characteristics,count,view\nCS-1,black,casual,lace-up,1,side\nCS-2,white,casual sneakers,,2,\n"
CAPTION = (
    "A professional product photo of black casual shoes on white background, side view, product photography"
)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def project(tmp_path: Path, base_dir: Path) -> Path:
    """A category with a training checkpoint (as the trainer writes it), its train captions and a specs sheet."""
    (tmp_path / "raw").mkdir()
    training_dir = tmp_path / "out" / "lora"
    ckpt, _ = make_training_checkpoint(training_dir, base_dir, rank=4, alpha=4, step=4)
    state = json.loads((ckpt / "training_state.json").read_text())
    (ckpt / "training_state.json").write_text(json.dumps({**state, "saved_at": 1_780_000_000.5}))
    train = tmp_path / "out" / "train"
    train.mkdir(parents=True)
    entry = {
        "image_file": "a.png",
        "caption": CAPTION,
        "metadata": {"original_size": [64, 64], "processed": True},
    }
    (train / "captions.json").write_text(json.dumps([entry]))
    (tmp_path / "specs.csv").write_text(SPECS, encoding="utf-8")
    cfg = tmp_path / "category.yaml"
    cfg.write_text(
        """
dataset: {name: casual_shoes, raw_dir: raw, output_dir: out, resolution: 64}
training: {base_model: tiny-sd, output_dir: out/lora}
renders:
  specs_csv: specs.csv
  candidates_per_image: 2
  num_inference_steps: 2
  batch_size: 6
  require_qa_pass: false   # the random tiny model never passes product QA
device: cpu
"""
    )
    return cfg


def metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    return {
        m.asset_key.path[-1]: {k: v.value for k, v in m.materialization.metadata.items()}
        for m in result.get_asset_materialization_events()
    }


def published(renders: Path) -> dict[str, str]:
    """sku/file → pixel hash of every candidate published (published/manifest.csv: one row per approved
    candidate, whatever each marketplace profile then made of it; the random tiny model's noise fails the
    profiles' white-border rule, so the profile folders themselves stay empty here)."""
    with (renders / "published" / "manifest.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["file"]: png_pixels_sha256(renders / "candidates" / r["file"]) for r in rows}


def review_rows(renders: Path) -> list[dict[str, str]]:
    with (renders / "reviews.csv").open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_reject_survives_a_no_op_reexport(tmp_path: Path, tiny_sd_cache: Path, umask_022: None) -> None:
    cfg = project(tmp_path, tiny_sd_path(tiny_sd_cache))
    resources = {
        "pipeline_config": PipelineConfigResource(config_path=str(cfg)),
        "device": DeviceResource(device="cpu"),
        "base_model": BaseModelResource(cache_dir=str(tiny_sd_cache)),
    }
    export = category_assets("casual_shoes", ["lora_weights", "final_pipeline"])
    renders_group = render_assets("casual_shoes")
    lora_dir = tmp_path / "out" / "lora" / "lora_weights"
    renders = tmp_path / "out" / "lora" / "renders"

    def run(assets: list[dg.AssetsDefinition]) -> dict[str, dict]:
        with one_torch_thread():
            result = dg.materialize(assets, resources=resources)
        assert result.success
        return metadata(result)

    # 1. Export, render, review, publish.
    first = run([*export, *renders_group])
    assert first["product_renders"]["skus_rendered"] == 2
    weights = {p.name: p.read_bytes() for p in lora_dir.iterdir() if p.name != "provenance.json"}
    candidates = {
        p.relative_to(renders / "candidates").as_posix() for p in renders.rglob("candidates/*/*.png")
    }
    before = published(renders)
    assert len(before) == 3 and len(review_rows(renders)) == 6

    # 2. A reviewer rejects a published image.
    rows = review_rows(renders)
    rejected_file = next(k for k in before if k.startswith("CS-1/")).split("/", 1)[1]
    target = next(i for i, r in enumerate(rows) if r["sku"] == "CS-1" and r["file"] == rejected_file)
    rows[target].update(decision="reject", note="scuffed toe")
    with (renders / "reviews.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    rejected_pixels = before[f"CS-1/{rejected_file}"]

    # 3. lora_weights again, nothing changed: byte-identical files, same data version.
    again = run(export[:1])
    assert {p.name: p.read_bytes() for p in lora_dir.iterdir() if p.name != "provenance.json"} == weights
    assert again["lora_weights"]["files"] == first["lora_weights"]["files"]

    # 4. product_renders, render_review, published_renders: nothing re-renders, the reject stays on its
    #    row, and the rejected image is not published (the next best CS-1 candidate is).
    after_meta = run(renders_group)
    assert after_meta["product_renders"]["skus_rendered"] == 0
    assert after_meta["product_renders"]["skus_unchanged"] == 2
    assert after_meta["product_renders"]["images_generated"] == 0
    assert {
        p.relative_to(renders / "candidates").as_posix() for p in renders.rglob("candidates/*/*.png")
    } == (candidates)
    rows_after = review_rows(renders)
    assert len(rows_after) == 6  # no orphaned row at the bottom
    assert rows_after[target] == {**rows[target], "decision": "reject", "note": "scuffed toe"}
    assert after_meta["render_review"]["rejected_by_review"] == 1
    after = published(renders)
    assert rejected_pixels not in after.values()
    assert f"CS-1/{rejected_file}" not in after
    assert set(after) <= {c for c in candidates}  # nothing new: only images rendered in step 1
    assert {k: v for k, v in after.items() if k.startswith("CS-2/")} == {
        k: v for k, v in before.items() if k.startswith("CS-2/")
    }
    assert len(after) == 3

    # 5. The same through a `--select '*'`-style run (export + fuse + renders in one run): no change.
    run([*export, *renders_group])
    assert published(renders) == after
    assert review_rows(renders)[target]["decision"] == "reject"

    # Modes follow the umask (022): readable by the team and a web server.
    for path in [
        renders / "reviews.csv",
        renders / "published" / "manifest.csv",
        renders / "contact_sheet.html",
        lora_dir / "casual_shoes_lora.safetensors",
        lora_dir / "provenance.json",
        lora_dir.parent / "final_pipeline" / "unet" / "diffusion_pytorch_model.safetensors",
    ]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for folder in (renders / "published", renders / "published" / "amazon_main", lora_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
