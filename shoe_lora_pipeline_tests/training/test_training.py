"""The training loop: accumulation, clipping, dtypes, cached vs uncached latents, validation, logging."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from PIL import Image

import shoe_lora_pipeline.core.training.loop as training  # the loop looks diffusion_loss up here
from shoe_lora_pipeline.core.checkpoints import list_checkpoints
from shoe_lora_pipeline.core.run_artifacts import read_losses_csv
from shoe_lora_pipeline.core.training import TrainingError, setup_lora_unet
from shoe_lora_pipeline_tests.support.training import (
    assert_same_lora,
    cpu,
    lora_tensors,
    make_cfg,
    relative_difference,
    run_training,
)


@pytest.fixture
def optimizer_steps():
    """Every optimizer.step() of any optimizer while the test runs (torch's global step hooks)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    calls: list[int] = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    yield calls
    handle.remove()


def test_accumulation_epochs_and_progress(tmp_path, load_components, dataset, optimizer_steps, monkeypatch):
    real_loss = training.diffusion_loss
    micro_batch_sizes: list[int] = []

    def counting_loss(unet, scheduler, batch, *args, **kwargs):
        micro_batch_sizes.append(len(batch))
        return real_loss(unet, scheduler, batch, *args, **kwargs)

    monkeypatch.setattr(training, "diffusion_loss", counting_loss)
    progress: list[dict] = []
    cfg = make_cfg(
        tmp_path,
        max_train_steps=6,
        gradient_accumulation_steps=2,
        log_every_steps=4,
        checkpointing_steps=1,
        checkpoints_total_limit=2,
    )
    result = run_training(cfg, load_components(), dataset, on_progress=progress.append)

    # 6 images, 4 per optimizer step (2 micro-batches of 2): 6 steps = 24 samples = 4 epochs
    assert len(optimizer_steps) == 6
    assert micro_batch_sizes == [2] * 12
    rows = read_losses_csv(cfg.training.output_dir / "losses.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 2, 3, 4, 4]  # epoch of each step's last sample
    assert result.global_step == 6 and result.images_per_second > 0 and result.peak_memory_mb > 0
    # a checkpoint per step, rotated down to the newest two
    assert [c.step for c in list_checkpoints(cfg.training.output_dir / "checkpoints")] == [5, 6]
    assert "removed checkpoint-4" in result.log_path.read_text()

    log = result.log_path.read_text()
    for line in ("***** Running training *****", "Num examples = 6", "Num Epochs = 4",
                 "Instantaneous batch size per device = 2", "Total train batch size (w. parallel, distributed & accumulation) = 4",
                 "Gradient Accumulation steps = 2", "Total optimization steps = 6", "Trainable params = "):  # fmt: skip
        assert line in log
    step_lines = re.findall(
        r"^Steps: (\d+)/6 \| [\d.]+ s/it \| ETA \d+:\d\d:\d\d \| epoch \d+ \| loss [\d.]+ \| lr [\d.e+-]+ "
        # throughput: images/s and the UNet's FLOP rate (no MFU: a CPU has no entry in the peak table)
        r"\| [\d.]+ img/s, [\d.]+ [TG]FLOP/s$",
        log,
        re.M,
    )
    assert step_lines == [str(i) for i in range(1, 7)]
    # on_progress every log_every_steps and at the last step
    assert [p["step"] for p in progress] == [4, 6]
    assert (
        progress[0]["line"].startswith("Steps: 4/6 |") and {"loss", "lr", "eta_seconds"} <= progress[0].keys()
    )
    for name in ("training_summary.json", "loss_curve.png", "losses.csv"):
        assert (cfg.training.output_dir / name).is_file()
    assert list((cfg.training.output_dir / "logs").rglob("events.out.tfevents.*"))  # TensorBoard


def test_gradient_clipping_clips_the_lora_gradients(tmp_path, load_components, dataset):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    limit = 1e-5
    norms_at_step: list[float] = []

    def grad_norm_before_update(opt, args, kwargs):
        grads = [p.grad for group in opt.param_groups for p in group["params"]]
        assert all(g is not None for g in grads)
        norms_at_step.append(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        )

    handle = register_optimizer_step_pre_hook(grad_norm_before_update)
    try:
        cfg = make_cfg(tmp_path, max_train_steps=2, gradient_clipping=limit)
        run_training(cfg, load_components(), dataset)
    finally:
        handle.remove()
    logged = [r["grad_norm"] for r in read_losses_csv(cfg.training.output_dir / "losses.csv")]
    assert len(norms_at_step) == 2
    # An exhausted iterator (the reference's bug) would leave the norm unclipped and log 0.0.
    assert all(n <= limit * (1 + 1e-3) for n in norms_at_step), norms_at_step
    assert all(g > 100 * limit for g in logged), logged


def test_cached_and_uncached_latents_give_the_same_losses(tmp_path, load_components, dataset):
    # latent_encoding_batch_size (4) differs from train_batch_size (2), so the VAE runs on different
    # batches in the two paths: results agree to float rounding, not bit for bit.
    cached = run_training(make_cfg(tmp_path / "cached", max_train_steps=3), load_components(), dataset)
    uncached = run_training(
        make_cfg(tmp_path / "uncached", max_train_steps=3, cache_latents=False), load_components(), dataset
    )
    a = [r["loss"] for r in cached.losses]
    b = [r["loss"] for r in uncached.losses]
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    la, lb = lora_tensors(cached.checkpoint_dir), lora_tensors(uncached.checkpoint_dir)
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=1e-4, atol=1e-6)


def test_cached_training_needs_neither_vae_encoder_nor_per_step_text_encoding(
    tmp_path, load_components, dataset
):
    components = load_components()
    components.vae.encoder = None  # the decoder alone is enough (validation)
    calls: list[int] = []
    components.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    result = run_training(make_cfg(tmp_path, max_train_steps=2), components, dataset)
    assert result.global_step == 2 and result.latest_grid.is_file()
    assert calls == [1]  # validation prompts (and "") encoded once, before training


def test_lora_params_stay_fp32_when_frozen_weights_are_bf16(tmp_path, load_components, dataset):
    components = load_components()
    tcfg = make_cfg(tmp_path).training
    params = setup_lora_unet(components.unet, tcfg, torch.device("cpu"), "bf16")
    assert params and all(p.dtype == torch.float32 for p in params)
    frozen = [p for p in components.unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)

    # The whole loop under accelerate's (effective) bf16 on the CPU.
    bf16 = dataclasses.replace(cpu(), mixed_precision="bf16", dtype_policy="test: bf16 on cpu")
    components = load_components()
    result = run_training(
        make_cfg(tmp_path / "run", max_train_steps=2), components, dataset, device_info=bf16
    )
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.losses)
    lora = [p for p in components.unet.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert next(components.unet.conv_in.parameters()).dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in lora_tensors(result.checkpoint_dir).values())


def test_validation_images_grid_and_no_effect_on_training(tmp_path, load_components, dataset):
    prompts = [
        "A professional product photo of black casual shoes",
        "A professional product photo of blue casual shoes",
    ]
    events: list[dict] = []
    with_val = run_training(
        make_cfg(
            tmp_path / "val",
            max_train_steps=4,
            validation_steps=2,
            num_validation_images=2,
            validation_prompts=prompts,
        ),
        load_components(),
        dataset,
        on_validation=events.append,
    )
    without = run_training(make_cfg(tmp_path / "noval", max_train_steps=4), load_components(), dataset)

    out = tmp_path / "val" / "lora" / "validation"
    assert [e["step"] for e in events] == [2, 4]
    for e in events:
        names = sorted(p.name for p in e["image_paths"])
        epoch = e["epoch"]
        assert names == sorted(
            f"epoch{epoch:03d}_step{e['step']:05d}_prompt{p}_img{i}.png" for p in range(2) for i in range(2)
        )
        assert e["grid_path"] == out / f"grid_step{e['step']:05d}.png" and e["grid_path"].is_file()
        with Image.open(e["image_paths"][0]) as img:
            assert img.size == (128, 128)
    assert with_val.latest_grid == out / "grid_step00004.png"
    # validation used its own seeds and restored the RNG: training is unchanged, bit for bit
    assert_same_lora(lora_tensors(with_val.checkpoint_dir), lora_tensors(without.checkpoint_dir))
    assert [r["loss"] for r in with_val.losses] == [r["loss"] for r in without.losses]


def test_gradient_checkpointing_gives_the_same_step(tmp_path, load_components, dataset):
    plain = run_training(make_cfg(tmp_path / "plain", max_train_steps=2), load_components(), dataset)
    ckpt = run_training(
        make_cfg(tmp_path / "gc", max_train_steps=2, gradient_checkpointing=True), load_components(), dataset
    )
    assert [r["loss"] for r in plain.losses] == pytest.approx([r["loss"] for r in ckpt.losses], rel=1e-6)
    la, lb = lora_tensors(plain.checkpoint_dir), lora_tensors(ckpt.checkpoint_dir)
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=1e-5, atol=1e-7)


def test_prediction_types(tmp_path, load_components, dataset):
    components = load_components()
    components.scheduler = type(components.scheduler).from_config(
        components.scheduler.config, prediction_type="sample"
    )
    with pytest.raises(TrainingError, match="unsupported prediction_type 'sample'"):
        run_training(make_cfg(tmp_path / "sample", max_train_steps=1), components, dataset)

    components = load_components()
    components.scheduler = type(components.scheduler).from_config(
        components.scheduler.config, prediction_type="v_prediction"
    )
    result = run_training(make_cfg(tmp_path / "v", max_train_steps=1), components, dataset)
    assert result.final_loss is not None and result.final_loss > 0


def test_max_steps_this_run_stops_early_without_extra_checkpoint(tmp_path, load_components, dataset):
    cfg = make_cfg(tmp_path, max_train_steps=4, checkpointing_steps=2)
    result = run_training(cfg, load_components(), dataset, max_steps_this_run=1)
    assert (result.global_step, result.steps_this_run, result.checkpoint_dir) == (1, 1, None)
    assert not result.skipped and len(result.losses) == 1


def test_micro_batch_size_does_not_change_the_lora(tmp_path, load_components, dataset):
    # The effective batch (2 × 2 = 4 images per optimizer step) through the UNet 1, 2 or 4 at a time:
    # every sample keeps its image, noise and timestep, so only the float summation order differs.
    runs = {
        micro: run_training(
            make_cfg(tmp_path / f"micro{micro}", max_train_steps=3, micro_batch_size=micro),
            load_components(),
            dataset,
        )
        for micro in (1, 2, 4)
    }
    assert [(r.micro_batch_size, r.accumulation_steps) for r in runs.values()] == [(1, 4), (2, 2), (4, 1)]
    reference = lora_tensors(runs[2].checkpoint_dir)
    for micro in (1, 4):
        assert relative_difference(lora_tensors(runs[micro].checkpoint_dir), reference) <= 1e-4, micro
        assert [r["loss"] for r in runs[micro].losses] == pytest.approx(
            [r["loss"] for r in runs[2].losses], rel=1e-5
        )
    # on the CPU "auto" keeps the recipe's micro-batch (train_batch_size)
    assert (
        run_training(
            make_cfg(tmp_path / "auto", max_train_steps=1), load_components(), dataset
        ).micro_batch_size
        == 2
    )


def test_throughput_and_flops_are_reported(tmp_path, load_components, dataset):
    result = run_training(make_cfg(tmp_path, max_train_steps=2), load_components(), dataset)
    assert result.flops_per_image and result.flops_per_image > 1e6
    assert result.tflops_per_second == pytest.approx(result.flops_per_image * result.images_per_second / 1e12)
    assert result.mfu is None  # no CPU peak in the table: MFU omitted, never guessed
    log = result.log_path.read_text()
    assert "UNet FLOPs per training image = " in log and "attention processors: AttnProcessor2_0" in log
