"""Export of a training checkpoint into the PEFT, diffusers and kohya formats: files, keys, metadata.

Numerical equivalence of the formats is in test_lora_equivalence.py. The checkpoints come from
``support.export.make_training_checkpoint``, which writes them exactly as the trainer does.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from shoe_lora_pipeline.core import lora_io
from shoe_lora_pipeline.core.model_card import LICENSE_LINE, read_front_matter
from shoe_lora_pipeline.core.models import TINY_SD_VERSION, tiny_sd_path
from shoe_lora_pipeline_tests.support.export import TARGETS, make_training_checkpoint

DATASET = "casual_shoes"
CAPTIONS = [
    "A professional product photo of black casual shoes on white background, side view, product photography",
    "A professional product photo of brown leather casual shoes on white background, side view, product photography",
    "A professional product photo of white casual sneakers on white background, top view, product photography",
]


@pytest.fixture(scope="module")
def base_dir(tiny_sd_cache: Path) -> Path:
    return tiny_sd_path(tiny_sd_cache)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> lora_io.ExportResult:
    root = tmp_path_factory.mktemp("train")
    ckpt, _ = make_training_checkpoint(root, base_dir, rank=8, alpha=16, step=20)
    facts = lora_io.TrainingFacts(
        learning_rate=1e-4,
        lr_scheduler="cosine",
        train_batch_size=2,
        gradient_accumulation_steps=8,
        max_train_steps=3000,
        resolution=512,
        captions=CAPTIONS,
        caption_template="A professional product photo of {colour} {type} shoes on white background",
        validation_prompts=CAPTIONS[:2],
    )
    provenance = {"dagster_run_id": "run-abc", "config_hash": "cfg-hash", "dataset_manifest_hash": "mh"}
    return lora_io.export_lora(
        ckpt, root / "lora_weights", dataset_name=DATASET, provenance=provenance, training=facts
    )


def test_load_checkpoint_lora_gives_peft_keys_and_declared_alpha(tmp_path: Path, base_dir: Path) -> None:
    ckpt, unet = make_training_checkpoint(tmp_path, base_dir, rank=4, alpha=16)
    sd, meta = lora_io.load_checkpoint_lora(ckpt)
    assert meta["rank"] == 4 and meta["alpha"] == 16.0 and meta["global_step"] == 20
    assert meta["target_modules"] == sorted(TARGETS)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    assert key in sd
    trained = dict(unet.named_parameters())
    torch.testing.assert_close(sd[key], trained[key.replace(".weight", ".default.weight")], rtol=0, atol=0)

    # Without training_state.json alpha comes from the file's lora_adapter_metadata.
    (ckpt / "training_state.json").unlink()
    _, meta = lora_io.load_checkpoint_lora(ckpt)
    assert (meta["rank"], meta["alpha"]) == (4, 16.0)


def test_load_checkpoint_refuses_to_guess_alpha(tmp_path: Path, base_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    ckpt, _ = make_training_checkpoint(tmp_path, base_dir, rank=4, alpha=16)
    weights = ckpt / lora_io.DIFFUSERS_WEIGHTS_NAME
    save_file(load_file(weights), weights, metadata={"format": "pt"})  # no lora_adapter_metadata
    (ckpt / "training_state.json").unlink()
    with pytest.raises(lora_io.LoraExportError, match="refusing to assume alpha = rank"):
        lora_io.load_checkpoint_lora(ckpt)


def test_load_checkpoint_rejects_conflicting_alpha(tmp_path: Path, base_dir: Path) -> None:
    ckpt, _ = make_training_checkpoint(tmp_path, base_dir, rank=4, alpha=16)
    state = json.loads((ckpt / "training_state.json").read_text())
    state["lora"]["alpha"] = 4
    (ckpt / "training_state.json").write_text(json.dumps(state))
    with pytest.raises(lora_io.LoraExportError, match="lora.alpha"):
        lora_io.load_checkpoint_lora(ckpt)


def test_export_writes_all_files(export: lora_io.ExportResult) -> None:
    names = sorted(p.name for p in export.out_dir.iterdir())
    assert names == sorted(
        [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
            f"{DATASET}_lora.safetensors",
            "provenance.json",
            "pytorch_lora_weights.safetensors",
            "validation_grid.png",
        ]
    )
    # No temporary folders left next to the export.
    assert not [p for p in export.out_dir.parent.iterdir() if p.name.startswith(".lora_weights")]
    assert export.step == 20 and export.rank == 8 and export.alpha == 16.0


def test_peft_adapter_config(export: lora_io.ExportResult) -> None:
    cfg = json.loads(export.peft_config.read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["lora_dropout"] == 0.0
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)
    assert cfg["base_model_name_or_path"] == "tiny-sd"
    assert cfg["auto_mapping"]["base_model_class"] == "UNet2DConditionModel"
    from safetensors import safe_open

    with safe_open(str(export.peft_weights), framework="pt") as f:
        keys = list(f.keys())
    # The layout PeftModel.from_pretrained(unet, dir) expects for a wrapped UNet.
    assert all(
        k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys
    )


def test_diffusers_file_declares_alpha_and_keeps_provenance(export: lora_io.ExportResult) -> None:
    from diffusers import StableDiffusionPipeline

    header = lora_io.weights_header(export.diffusers_weights)
    adapter = json.loads(header["lora_adapter_metadata"])
    assert adapter["unet.r"] == 8 and adapter["unet.lora_alpha"] == 16
    # The export run's id and time are not in the weights (they would change the bytes on every export).
    assert "shoe_lora_dagster_run_id" not in header and "shoe_lora_created_at" not in header
    # diffusers still reads the file after our header rewrite.
    sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(
        str(export.out_dir), weight_name=lora_io.DIFFUSERS_WEIGHTS_NAME, return_lora_metadata=True
    )
    assert alphas is None and meta["unet.lora_alpha"] == 16
    assert all(k.startswith("unet.") for k in sd)


def test_kohya_keys_shapes_and_alpha(export: lora_io.ExportResult) -> None:
    from safetensors.torch import load_file

    sd = load_file(export.kohya_weights)
    pattern = re.compile(
        r"^lora_unet_[a-z0-9_]+_(to_q|to_k|to_v|to_out_0)\.(lora_down\.weight|lora_up\.weight|alpha)$"
    )
    assert all(pattern.match(k) for k in sd), [k for k in sd if not pattern.match(k)][:3]
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert f"{name}.lora_down.weight" in sd
    down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"]
    assert down.shape == (8, 64) and up.shape == (64, 8)  # [r, in] / [out, r]; tiny block 1 is 64 wide
    # The trained alpha, not the rank that convert_state_dict_to_kohya writes.
    assert alpha.ndim == 0 and alpha.dtype == torch.float32 and alpha.item() == 16.0
    modules = {k.split(".")[0] for k in sd}
    assert len(sd) == 3 * len(modules)
    assert all(sd[f"{m}.alpha"].item() == 16.0 for m in modules)


def test_kohya_metadata(export: lora_io.ExportResult) -> None:
    header = lora_io.weights_header(export.kohya_weights)
    assert all(isinstance(v, str) for v in header.values())
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "8",
        "ss_network_alpha": "16.0",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": "tiny-sd",
        "ss_resolution": "(512, 512)",
        "ss_steps": "20",
        "ss_learning_rate": "0.0001",
        "ss_lr_scheduler": "cosine",
        "ss_num_train_images": "3",
        "ss_output_name": f"{DATASET}_lora",
        # the objective's options under kohya's names (the checkpoint's recorded settings)
        "ss_min_snr_gamma": "5.0",
        "ss_noise_offset": "0.05",
        "ss_ip_noise_gamma": "None",
        "ss_caption_dropout_rate": "0.1",
        "shoe_lora_checkpoint_step": "20",
        "shoe_lora_training_hash": "train-hash-123",
        "shoe_lora_config_hash": "cfg-hash",
        "shoe_lora_dataset_manifest_hash": "mh",
        "shoe_lora_base_model": "tiny-sd",
        "shoe_lora_snr_gamma": "5.0",  # the provenance records the objective too
        "shoe_lora_caption_dropout": "0.1",
    }
    assert {k: header.get(k) for k in expected} == expected
    freq = json.loads(header["ss_tag_frequency"])
    assert freq[DATASET]["product photography"] == 3 and freq[DATASET]["side view"] == 2
    assert "ss_training_comment" in header
    # sshs_model_hash is kohya's: sha256 of the tensor section of the file.
    assert header["sshs_model_hash"] == lora_io.kohya_tensor_hash(export.kohya_weights)
    assert re.fullmatch(r"[0-9a-f]{8}", header["sshs_legacy_hash"])


def test_kohya_metadata_says_v_parameterization_for_a_v_prediction_base() -> None:
    """kohya / A1111 / ComfyUI read ss_v_parameterization to sample a v-prediction LoRA as v-prediction;
    the objective comes from the base model's scheduler config (tiny-shoes: v-prediction, zero-terminal-SNR
    trained_betas)."""
    from shoe_lora_pipeline.core.models import TINY_SHOES_DIR

    lora = {"rank": 8, "alpha": 16.0, "dropout": 0.0}
    facts = lora_io.TrainingFacts(resolution=128)

    def meta(objective: lora_io.BaseObjective | None) -> dict[str, str]:
        return lora_io.build_kohya_metadata(
            lora, facts, dataset_name=DATASET, base_model="b", step=1, objective=objective
        )

    eps = meta(lora_io.base_objective({"prediction_type": "epsilon", "trained_betas": None}))
    assert "ss_v_parameterization" not in eps and "ss_zero_terminal_snr" not in eps  # kohya's default
    assert "ss_v_parameterization" not in meta(None)
    committed = json.loads((TINY_SHOES_DIR / "scheduler" / "scheduler_config.json").read_text())
    objective = lora_io.base_objective(committed)
    assert objective == lora_io.BaseObjective("v_prediction", zero_terminal_snr=True)
    v = meta(objective)
    assert v["ss_v_parameterization"] == "True" and v["ss_zero_terminal_snr"] == "True"
    assert v["ss_v2"] == "False" and v["ss_base_model_version"] == "sd_v1"  # still an SD1.5-class model
    plain_v = lora_io.base_objective({"prediction_type": "v_prediction", "beta_schedule": "scaled_linear"})
    assert plain_v == lora_io.BaseObjective("v_prediction", zero_terminal_snr=False)
    assert lora_io.base_objective({"rescale_betas_zero_snr": True}).zero_terminal_snr


def test_provenance_is_the_same_in_every_file(export: lora_io.ExportResult) -> None:
    paths = [
        export.out_dir,
        export.peft_weights,
        export.diffusers_weights,
        export.kohya_weights,
        export.model_card,
        export.provenance_json,
    ]
    records = [lora_io.read_provenance(p) for p in paths]
    first = records[0]["provenance"]
    assert first["dagster_run_id"] == "run-abc" and first["checkpoint_step"] == 20
    assert first["base_model"] == "tiny-sd" and first["base_model_revision"] == f"tiny-sd-v{TINY_SD_VERSION}"
    for r in records:
        assert r["provenance"] == first, r["path"]
        assert (r["lora"]["rank"], float(r["lora"]["alpha"]), r["lora"]["scale"]) == (8, 16.0, 2.0), r["path"]
    assert {r["format"] for r in records} >= {"peft", "diffusers", "kohya", "model_card", "lora_weights"}
    record = json.loads(export.provenance_json.read_text())
    assert record["files"][f"{DATASET}_lora.safetensors"] == lora_io.file_sha256(export.kohya_weights)


def test_model_card(export: lora_io.ExportResult) -> None:
    text = export.model_card.read_text()
    assert text.splitlines()[1] == LICENSE_LINE and "TODO" in LICENSE_LINE
    front = read_front_matter(export.model_card)
    assert front["base_model"] == "tiny-sd" and front["library_name"] == "diffusers"
    assert front["tags"] == ["stable-diffusion", "lora", "text-to-image", "diffusers", "product-photography"]
    assert front["widget"][0] == {"text": CAPTIONS[0], "output": {"url": "validation_grid.png"}}
    assert "{colour}" in front["instance_prompt"]
    for needle in (
        "load_lora_weights",
        "PeftModel.from_pretrained",
        f"{DATASET}_lora.safetensors",
        "![validation grid](validation_grid.png)",
        "| Steps | 20 |",
        "| LoRA rank / alpha (scale) | 8 / 16 (2) |",
        "2 × 8 accumulation = 16",
        "| Final training loss | 0.05 |",  # losses.csv at step 20, not the later rows
        "| Validation loss (held-out split) | 0.125 |",  # the checkpoint's validation_loss.csv at step 20
        "| Min-SNR-γ / noise offset / input perturbation / caption dropout | 5 / 0.05 / off / 0.1 |",
    ):
        assert needle in text, needle
    assert "dagster_run_id" not in text and "created_at" not in text  # run facts: provenance.json only


def test_same_checkpoint_exports_byte_identical_files(
    tmp_path: Path, base_dir: Path, export: lora_io.ExportResult
) -> None:
    """Another run (other run id, other time) exporting the same checkpoint writes the same bytes; only
    provenance.json, which records that run, differs."""
    ckpt = export.out_dir.parent / "checkpoints" / "checkpoint-20"
    facts = lora_io.TrainingFacts(captions=CAPTIONS, validation_prompts=CAPTIONS[:2])

    def again(out: Path, run_id: str, created_at: str) -> lora_io.ExportResult:
        prov = {"dagster_run_id": run_id, "created_at": created_at, "config_hash": "cfg-hash"}
        return lora_io.export_lora(ckpt, out, dataset_name=DATASET, provenance=prov, training=facts)

    first = again(tmp_path / "a", "run-1", "2026-01-01T00:00:00+00:00")
    second = again(tmp_path / "b", "run-2", "2026-06-01T12:00:00+00:00")
    third = again(tmp_path / "a", "run-3", "2026-07-01T12:00:00+00:00")  # in place, over the first
    names = sorted(p.name for p in first.out_dir.iterdir() if p.name != lora_io.PROVENANCE_NAME)
    assert {"README.md", "adapter_config.json", f"{DATASET}_lora.safetensors"} <= set(names)
    for name in names:
        content = (second.out_dir / name).read_bytes()
        assert content == (tmp_path / "a" / name).read_bytes() == (third.out_dir / name).read_bytes(), name
    assert first.file_sha256 == second.file_sha256 == third.file_sha256
    # provenance.json says which run exported them; reading a weights file in place adds that back.
    assert json.loads(second.provenance_json.read_text())["provenance"]["dagster_run_id"] == "run-2"
    kohya = lora_io.read_provenance(second.kohya_weights)
    assert kohya["provenance"]["dagster_run_id"] == "run-2"
    assert kohya["provenance"]["created_at"] == "2026-06-01T12:00:00+00:00"
    # A copy away from its provenance.json keeps everything but the run facts.
    shutil.copy(second.kohya_weights, tmp_path / "copy.safetensors")
    alone = lora_io.read_provenance(tmp_path / "copy.safetensors")["provenance"]
    assert alone.get("dagster_run_id") is None and alone.get("created_at") is None
    assert alone["checkpoint_step"] == 20 and alone["source_checkpoint_sha256"]


def test_validation_grid_is_the_checkpoint_step(export: lora_io.ExportResult) -> None:
    from PIL import Image

    assert export.validation_grid is not None
    with Image.open(export.validation_grid) as im:
        assert im.getpixel((0, 0)) == (0, 128, 0)  # "green" = grid_step00020, not the later "blue"


def test_reexport_replaces_atomically_and_warns_on_mismatch(tmp_path: Path, base_dir: Path) -> None:
    ckpt, _ = make_training_checkpoint(tmp_path, base_dir, rank=4, alpha=8, step=6)
    out = tmp_path / "lora_weights"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    res = lora_io.export_lora(
        ckpt, out, dataset_name="x", provenance={"checkpoint_step": 5}, base_model_dir=base_dir
    )
    assert not (out / "stale.txt").exists() and (out / "x_lora.safetensors").is_file()
    assert res.provenance["checkpoint_step"] == 6 and res.provenance["requested_checkpoint_step"] == 5
    assert res.warnings and "checkpoint_step" in res.warnings[0]
    # Training numbers come from the checkpoint's recorded config when the caller gives none.
    card = (out / "README.md").read_text()
    assert "| Learning rate / schedule | 0.0001 / cosine |" in card and "2 × 8 accumulation = 16" in card
    # Nothing but the export itself was added next to the training outputs (no temporary folders).
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoints", "losses.csv", "lora_weights", "training_summary.json", "validation"]
    )


def test_checkpoint_settings_win_over_caller_facts(tmp_path: Path, base_dir: Path) -> None:
    ckpt, _ = make_training_checkpoint(tmp_path, base_dir, rank=4, alpha=8, step=6)
    state = json.loads((ckpt / "training_state.json").read_text())
    state["loss"] = 0.125
    (ckpt / "training_state.json").write_text(json.dumps(state))
    facts = lora_io.TrainingFacts(learning_rate=5e-4, resolution=512)
    res = lora_io.export_lora(ckpt, tmp_path / "lw", dataset_name="x", provenance={}, training=facts)
    assert any("learning_rate" in w for w in res.warnings)
    header = lora_io.weights_header(res.kohya_weights)
    assert header["ss_learning_rate"] == "0.0001"
    assert "| Final training loss | 0.125 |" in res.model_card.read_text()


def test_export_fails_cleanly_without_base_model(tmp_path: Path, base_dir: Path) -> None:
    ckpt, _ = make_training_checkpoint(tmp_path, base_dir, rank=4, alpha=8)
    with pytest.raises(lora_io.LoraExportError, match="base_model_dir"):
        lora_io.export_lora(
            ckpt, tmp_path / "out", dataset_name="x", provenance={}, base_model_dir=tmp_path / "nowhere"
        )
    assert not (tmp_path / "out").exists()


def test_read_provenance_errors(tmp_path: Path) -> None:
    with pytest.raises(lora_io.ProvenanceError, match="no such file"):
        lora_io.read_provenance(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain, metadata={"format": "pt"})
    with pytest.raises(lora_io.ProvenanceError, match="plain.safetensors"):
        lora_io.read_provenance(plain)
    (tmp_path / "README.md").write_text("# no front matter\n")
    with pytest.raises(lora_io.ProvenanceError, match="README.md"):
        lora_io.read_provenance(tmp_path / "README.md")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(lora_io.ProvenanceError, match="empty"):
        lora_io.read_provenance(empty)
    shutil.rmtree(empty)


def test_tag_frequency_counts_like_kohya() -> None:
    assert lora_io.tag_frequency(["A, b ,a", "B,,c"]) == {"a": 2, "b": 2, "c": 1}
