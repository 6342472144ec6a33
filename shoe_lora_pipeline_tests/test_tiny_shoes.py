"""tiny-shoes, the committed demo base model: the pretraining script's machinery, the committed weights,
and the refusals (missing/corrupt weights, overwriting without --force). Issue 19."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shoe_lora_pipeline.core import models
from shoe_lora_pipeline_tests.support.training import one_torch_thread

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "pretrain_demo_model.py"


def _run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "tiny-shoes"
    r = _run_script("--smoke", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_pretraining_script_writes_a_loadable_sd_folder_with_a_card(smoke_model: Path) -> None:
    card = json.loads((smoke_model / "training.json").read_text())
    for key in ("command", "seed", "unet steps", "vae final loss", "unet final loss", "device", "wall time"):
        assert key in card
    assert card["status"] == "final"
    assert "| seed |" in (smoke_model / "README.md").read_text()
    with one_torch_thread():
        c = models.load_base_model(str(smoke_model))
    assert type(c.unet).__name__ == "UNet2DConditionModel" and c.vae_scale_factor == 8
    assert c.unet.config.block_out_channels == models.TINY_UNET_CONFIG["block_out_channels"]
    assert c.vae.config.scaling_factor != models.TINY_VAE_CONFIG["scaling_factor"]  # measured, not copied
    assert len(c.tokenizer) == 49408


def test_pretraining_script_is_deterministic_and_refuses_to_overwrite(
    smoke_model: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    r = _run_script("--smoke", "--out", str(smoke_model))
    assert r.returncode == 2 and "--force" in r.stderr and str(smoke_model) in r.stderr
    again = tmp_path / "again"
    assert _run_script("--smoke", "--out", str(again)).returncode == 0
    for rel in models.WEIGHT_FILES:
        a, b = load_file(smoke_model / rel), load_file(again / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    assert _run_script("--smoke", "--out", str(again), "--force").returncode == 0


def test_pretraining_script_continues_a_model_with_zero_terminal_snr_and_v_prediction(
    smoke_model: Path, tmp_path: Path
) -> None:
    """--from keeps the VAE and text encoder, trains the UNet further; the betas and objective land in the
    scheduler config, so every scheduler built from the folder (training's DDPM too) uses them."""
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file

    out = tmp_path / "continued"
    args = ("--smoke", "--from", str(smoke_model), "--out", str(out), "--zero-terminal-snr")
    r = _run_script(*args, "--prediction-type", "v_prediction")
    assert r.returncode == 0, r.stderr[-3000:]
    for rel in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(smoke_model / rel), load_file(out / rel)
        assert all(torch.equal(a[k], b[k]) for k in a), rel  # kept
    a, b = (load_file(f / "unet" / "diffusion_pytorch_model.safetensors") for f in (smoke_model, out))
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)  # trained further
    card = json.loads((out / "training.json").read_text())
    assert str(smoke_model) in card["continued from"] and "v-prediction" in card["noise schedule"]
    with one_torch_thread():
        c = models.load_base_model(str(out))
    assert c.scheduler.config.prediction_type == "v_prediction"
    assert c.scheduler.config.timestep_spacing == "trailing"
    noise = c.noise_scheduler
    assert isinstance(noise, DDPMScheduler) and noise.config.prediction_type == "v_prediction"
    assert 0 < float(noise.alphas_cumprod[-1]) < 1e-7  # zero terminal SNR (2**-24, finite for every sampler)


def test_committed_tiny_shoes_is_v_prediction_with_zero_terminal_snr() -> None:
    """The demo model's scheduler: v-prediction on zero-terminal-SNR betas, sampled from the last timestep;
    every sampler the renders offer starts there with finite numbers."""
    import diffusers

    from shoe_lora_pipeline.core.renders.generate import SAMPLERS

    config = json.loads((models.TINY_SHOES_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["timestep_spacing"] == "trailing"
    for class_name, _ in SAMPLERS.values():
        sched = getattr(diffusers, class_name).from_config(config)
        sched.set_timesteps(20)
        assert int(sched.timesteps[0]) == 999, class_name
        assert float(sched.alphas_cumprod[-1]) < 1e-7, class_name
        if hasattr(sched, "sigmas"):
            assert torch.isfinite(sched.sigmas).all(), class_name


def test_committed_tiny_shoes_loads_by_name() -> None:
    assert (models.TINY_SHOES_DIR / "README.md").is_file()
    card = json.loads((models.TINY_SHOES_DIR / "training.json").read_text())
    assert card["status"] == "final"
    size = sum(p.stat().st_size for p in models.TINY_SHOES_DIR.rglob("*") if p.is_file())
    assert size < 40 * 2**20  # "tens of MB at most"
    with one_torch_thread():
        c = models.load_base_model(models.TINY_SHOES)
    assert c.identity["base_model"] == models.TINY_SHOES and c.identity["fingerprint"]
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size


def _copy_of_committed(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-shoes"
    shutil.copytree(models.TINY_SHOES_DIR, folder)
    return folder


def test_missing_weight_file_fails_naming_it(tmp_path: Path) -> None:
    folder = _copy_of_committed(tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(models.BaseModelError, match=r"unet/diffusion_pytorch_model\.safetensors is missing"):
        models.tiny_shoes_path(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "lfs-pointer"])
def test_corrupt_weight_file_fails_naming_it(tmp_path: Path, damage: str) -> None:
    folder = _copy_of_committed(tmp_path)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 1000)
    else:
        path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(models.BaseModelError) as err:
        models.tiny_shoes_path(folder)
    assert str(path) in str(err.value)
    assert ("corrupt" in str(err.value)) or ("LFS" in str(err.value))


def test_weight_file_lacking_tensors_is_refused_not_randomly_filled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy_of_committed(tmp_path)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors[sorted(tensors)[0]]
    save_file(tensors, path)
    monkeypatch.setattr(models, "TINY_SHOES_DIR", folder)
    with one_torch_thread(), pytest.raises(models.BaseModelError) as err:
        models.load_base_model(models.TINY_SHOES)
    # diffusers itself may refuse the file first; either way the path is named and nothing random loads
    assert str(folder / "unet") in str(err.value)
