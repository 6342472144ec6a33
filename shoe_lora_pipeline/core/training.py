"""The LoRA training loop for Stable Diffusion 1.x UNets (the ``lora_training`` stage core).

Read :func:`train_lora` top to bottom: where the run starts, the loop (micro-batches, backward,
clip, step, the ``% N`` triggers for the log, checkpoints and validation), the result. Everything it calls
is a small piece with one job: the start decision in ``checkpoints.py``, what each sample sees in
``train_data.py``, the throughput levers in ``train_speed.py``, the log files in ``run_artifacts.py``.

The recipe (diffusers' ``train_text_to_image_lora.py``, with its faults fixed):

* latents ``scaling_factor * (mean + std * eps)`` from the VAE's latent distribution (cached or encoded on
  the fly — both take ``eps`` from the sample's own generator, so they give the same numbers);
* noise ~ N(0, 1) and timesteps uniform in ``[0, num_train_timesteps)``, noised with the base model's
  DDPMScheduler; target = noise (``epsilon``) or velocity (``v_prediction``); MSE in fp32, averaged over
  the effective batch; optional min-SNR-γ weighting, noise offset, input perturbation, caption dropout;
* LoRA on the UNet's attention projections via peft; AdamW over the LoRA parameters only; LoRA parameters
  in fp32 whenever the *effective* mixed precision is fp16/bf16 (frozen weights in the half dtype);
* gradient accumulation over micro-batches; the LoRA gradients' norm clipped with a *list* of parameters
  (the reference passes an exhausted iterator, so it never clipped); the LR schedule
  (``diffusers.optimization.get_scheduler``) steps once per optimizer step.

Determinism: each sample's image and random draws are functions of (seed, step, position)
(``train_data.py``), so micro-batch size and process count do not change a step's maths and the step
number alone is the data stream's state. Checkpoints hold LoRA weights, optimizer, LR schedule and the
global RNGs; a resumed run reproduces the uninterrupted run bit for bit for a fixed micro-batch on the
same machine (CPU; CUDA with ``training.deterministic: true``). Validation never touches this state.

Several processes (``accelerate launch``, ``core/distributed.py``): each runs this loop on its share of every
step; rank 0 alone decides where the run starts and writes the run folder (checkpoints with every rank's
part, losses.csv, validation, log, summary); all ranks meet at the same collectives, so a non-finite loss or
a SIGINT on one stops them all at the same point.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from shoe_lora_pipeline.core import checkpoints as ckpt
from shoe_lora_pipeline.core import run_artifacts as files
from shoe_lora_pipeline.core import train_speed as speed
from shoe_lora_pipeline.core.distributed import Ranks, on_main
from shoe_lora_pipeline.core.fsutil import atomic_write_json
from shoe_lora_pipeline.core.latents import has_images, move_module
from shoe_lora_pipeline.core.models import count_parameters, lora_config
from shoe_lora_pipeline.core.train_data import (
    CachedSource,
    MicroBatch,
    NoiseSettings,
    OnTheFlySource,
    SampleStream,
    Source,
    StepPlan,
    derived_seed,
)
from shoe_lora_pipeline.core.validation import (
    ValidationPrompts,
    ValidationResult,
    encode_validation_prompts,
    run_validation,
)

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from shoe_lora_pipeline.core.config import PipelineConfig, TrainingConfig
    from shoe_lora_pipeline.core.device import DeviceInfo
    from shoe_lora_pipeline.core.models import SDComponents

TRACKER_PROJECT = "shoe_lora"
WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}
# Validation loss: the mean denoising loss at these fractions of the noise schedule (4 spread timesteps).
VALIDATION_LOSS_FRACTIONS = (0.125, 0.375, 0.625, 0.875)


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the message names the step and the images."""


@dataclass
class TrainingResult:
    global_step: int
    max_train_steps: int
    trainable_params: int
    total_params: int
    final_loss: float | None
    smoothed_loss: float | None  # EMA (decay run_artifacts.EMA_DECAY) of the per-step losses
    wall_time_s: float  # this call, including checkpoints and validation
    seconds_per_step: float | None  # mean optimizer-step time in this call (no checkpoint/validation)
    images_per_second: float | None
    peak_memory_mb: float | None  # CUDA max allocated / MPS driver memory / process peak RSS on CPU
    device: str
    resumed_from: int | None
    skipped: bool
    checkpoint_dir: Path | None  # newest checkpoint
    log_path: Path
    loss_curve_png: Path | None
    latest_grid: Path | None
    losses: list[dict[str, Any]] = field(default_factory=list)
    resume_note: str = ""
    steps_this_run: int = 0
    output_dir: Path | None = None
    losses_csv: Path | None = None
    micro_batch_size: int | None = None
    accumulation_steps: int | None = None
    num_processes: int = 1
    gradient_checkpointing: bool | None = None
    flops_per_image: float | None = None  # UNet model FLOPs of one training sample (forward + backward)
    tflops_per_second: float | None = None
    mfu: float | None = None  # fraction of the device's dense peak (None: device not in the table)
    mfu_peak: str | None = None
    val_loss: float | None = None  # the newest validation loss
    best_val_step: int | None = None
    validation_losses: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict (everything but the per-step rows)."""
        data = asdict(self)
        data.pop("losses")
        data.pop("validation_losses")
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


# ----------------------------------------------------------------------------------------------
# the model and the objective
# ----------------------------------------------------------------------------------------------


def setup_lora_unet(
    unet: torch.nn.Module, tcfg: TrainingConfig, device: torch.device, mixed_precision: str
) -> list[torch.nn.Parameter]:
    """Frozen UNet in the weight dtype on ``device`` + a fresh LoRA adapter; returns the LoRA params (a list).

    ``mixed_precision`` must be the accelerator's *effective* setting: with fp16/bf16 the frozen weights
    are half precision and the LoRA parameters are upcast to fp32 (peft creates them in the base layer's
    dtype; AdamW on fp16 parameters cannot unscale and bf16 updates lose the small LoRA steps).
    """
    from diffusers.training_utils import cast_training_params

    if getattr(unet, "peft_config", None):
        raise ValueError("the UNet already carries a LoRA adapter; pass freshly loaded base model components")
    unet.requires_grad_(False)
    move_module(unet, device, WEIGHT_DTYPES[mixed_precision])
    unet.add_adapter(lora_config(**lora_settings(tcfg)))
    if mixed_precision in ("fp16", "bf16"):
        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"no LoRA parameters: lora_target_modules {tcfg.lora_target_modules} match no UNet layer"
        )
    return params


def lora_settings(tcfg: TrainingConfig) -> dict[str, Any]:
    return {
        "rank": tcfg.lora_rank,
        "alpha": tcfg.lora_alpha,
        "dropout": tcfg.lora_dropout,
        "target_modules": list(tcfg.lora_target_modules),
    }


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights per sample: min(SNR, γ) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr


def denoising_mse(
    unet: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    noisy_input_noise: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    weight_dtype: torch.dtype,
    channels_last: bool = False,
) -> torch.Tensor:
    """Per-sample MSE of the UNet's prediction against the target (noise or velocity), in fp32."""
    noisy = noise_scheduler.add_noise(latents, noisy_input_noise, timesteps).to(weight_dtype)
    if channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:  # "v_prediction" (checked before training starts)
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states=text.to(weight_dtype), return_dict=False)[0]
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    batch: MicroBatch,
    source: Source,
    empty_text: torch.Tensor,
    scaling_factor: float,
    weight_dtype: torch.dtype,
    snr_gamma: float | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Per-sample losses of one micro-batch of the denoising objective (weighted by min-SNR-γ when set)."""
    mean, std, text = source.get(batch.items)
    text = torch.where(batch.drop_caption[:, None, None], empty_text.to(text.dtype), text)
    latents = scaling_factor * (mean + std * batch.eps)
    losses = denoising_mse(
        unet,
        noise_scheduler,
        latents,
        batch.noise,
        batch.noisy_input_noise,
        batch.timesteps,
        text,
        weight_dtype,
        channels_last,
    )
    if snr_gamma is not None:
        losses = losses * min_snr_weights(noise_scheduler, batch.timesteps, snr_gamma)
    return losses


@torch.no_grad()
def validation_loss(
    unet: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    source: Source,
    scaling_factor: float,
    weight_dtype: torch.dtype,
    seed: int,
    batch_size: int,
) -> dict[str, float]:
    """Mean denoising MSE of the held-out split at fixed timesteps with noise from fixed generators:
    deterministic for given weights and independent of the training RNG. Returns ``val_loss`` and one
    ``t<timestep>`` entry per timestep."""
    total_steps = int(noise_scheduler.config.num_train_timesteps)
    timesteps = [int(f * total_steps) for f in VALIDATION_LOSS_FRACTIONS]
    device = source.device
    sums = torch.zeros(len(timesteps), dtype=torch.float64, device=device)
    was_training = unet.training
    unet.eval()
    try:
        for start in range(0, len(source), batch_size):
            items = list(range(start, min(len(source), start + batch_size)))
            mean, std, text = source.get(items)
            for k, t in enumerate(timesteps):
                gens = [torch.Generator().manual_seed(derived_seed(seed, "val-loss", i, k)) for i in items]
                eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(device)
                noise = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(device)
                latents = scaling_factor * (mean + std * eps)
                t_batch = torch.full((len(items),), t, dtype=torch.long, device=device)
                mse = denoising_mse(unet, noise_scheduler, latents, noise, noise, t_batch, text, weight_dtype)
                sums[k] += mse.double().sum()
    finally:
        unet.train(was_training)
    per_t = (sums / len(source)).tolist()
    return {
        "val_loss": sum(per_t) / len(per_t),
        **{f"t{t}": v for t, v in zip(timesteps, per_t, strict=True)},
    }


# ----------------------------------------------------------------------------------------------
# settings recorded with the run
# ----------------------------------------------------------------------------------------------


def recorded_training_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The settings written into each checkpoint, so a mismatch can name the key that changed."""
    return {
        **cfg.training.model_dump(mode="json", exclude={"output_dir"}),
        "resolution": cfg.dataset.resolution,
    }


def hash_relevant_differences(cfg: PipelineConfig, old_config: dict[str, Any] | None) -> list[str]:
    """Settings of a checkpoint's recorded training config that differ from ``cfg`` AND change its hash.

    Each differing key is put back to its old value on a copy of ``cfg``; if that changes
    ``cfg.training_hash()``, the key is one of the reasons (config.py stays the one definition of what counts).
    """
    if not isinstance(old_config, dict):
        return []
    now = recorded_training_config(cfg)
    reasons = []
    for key in sorted(set(old_config) | set(now)):
        old, new = old_config.get(key, "<absent>"), now.get(key, "<absent>")
        if old == new:
            continue
        probe = cfg.model_copy(deep=True)
        try:
            if key == "resolution":
                probe.dataset.resolution = old
            else:
                setattr(probe.training, key, old)
            relevant = probe.training_hash() != cfg.training_hash()
        except (ValueError, TypeError, AttributeError):
            relevant = True  # a key this version does not know (or cannot take) changes results
        if relevant:
            name = "dataset.resolution" if key == "resolution" else f"training.{key}"
            reasons.append(f"{name}: {old!r} -> {new!r}")
    return reasons


def _tracker_config(cfg: PipelineConfig) -> dict[str, Any]:
    # TensorBoard hparams accept only scalars and strings.
    flat = {}
    for k, v in cfg.training.model_dump(mode="json").items():
        flat[k] = v if isinstance(v, int | float | str | bool) else json.dumps(v)
    flat["resolution"] = cfg.dataset.resolution
    return flat


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------------------------
# before the loop: accelerator, model, data, optimizer
# ----------------------------------------------------------------------------------------------


def make_accelerator(cfg: PipelineConfig, device_info: DeviceInfo, output_dir: Path) -> Accelerator:
    """One Accelerator per call (its process-wide singletons reset): mixed precision as the device allows,
    TensorBoard logging, no accumulation of its own (the loop accumulates over its micro-batches)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=device_info.mixed_precision,
        cpu=device_info.type == "cpu",
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        log_with="tensorboard",
        # The LR schedule counts optimizer steps of the whole run, not steps per process.
        step_scheduler_with_optimizer=False,
    )
    accelerator.init_trackers(TRACKER_PROJECT, config=_tracker_config(cfg))
    return accelerator


@dataclass
class Run:
    """Everything the loop needs, built by :func:`prepare_run`."""

    unet: torch.nn.Module
    lora_params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    noise_scheduler: DDPMScheduler
    source: Source
    val_source: Source | None
    plan: StepPlan
    layout: speed.BatchLayout
    empty_text: torch.Tensor
    validation_prompts: ValidationPrompts
    weight_dtype: torch.dtype
    mixed_precision: str
    trainable: int
    total: int
    flops_per_image: float | None
    notes: list[str]
    compiled: bool
    device: torch.device
    device_name: str
    peak_precision: str  # which dense peak the MFU is measured against
    scaling_factor: float
    channels_last: bool


def _data_sources(
    cfg: PipelineConfig,
    components: SDComponents,
    device: torch.device,
    dirs: dict[str, Path | None],
) -> tuple[Source, Source | None, str]:
    tcfg = cfg.training
    fingerprint = components.identity["fingerprint"]
    resident = device.type == "cuda" and tcfg.speed.data_on_device
    if tcfg.cache_latents:
        if dirs["latents_dir"] is None:
            raise TrainingError("training.cache_latents is on but no latents_dir was given")
        source: Source = CachedSource(
            dirs["latents_dir"],
            dirs["train_dir"],
            fingerprint,
            cfg.dataset.resolution,
            device,
            on_device=resident,
        )
        info = f"cached in {dirs['latents_dir']} ({len(source)} items)" + (
            ", resident on the device" if resident else "; VAE/text encoder stay on the CPU"
        )
    else:
        components.vae.to(device)
        components.text_encoder.to(device)
        source = OnTheFlySource(components, dirs["train_dir"], cfg.dataset.resolution, device)
        info = "encoded on the fly every step (training.cache_latents: false)"
    # The validation loss reads the val split's latent cache; uncached runs encode it like the train set.
    val_source: Source | None = None
    val_dir, val_latents = dirs.get("val_dir"), dirs.get("val_latents_dir")
    if val_dir is not None and has_images(val_dir):
        if val_latents is not None and (val_latents / "index.json").is_file():
            val_source = CachedSource(val_latents, val_dir, fingerprint, cfg.dataset.resolution, device)
        elif not tcfg.cache_latents:
            val_source = OnTheFlySource(components, val_dir, cfg.dataset.resolution, device)
    return source, val_source, info


def _batch_layout(
    tcfg: TrainingConfig,
    unet: torch.nn.Module,
    device: torch.device,
    local_batch: int,
    shapes: dict[str, Any],
) -> speed.BatchLayout:
    """Micro-batch and gradient checkpointing: as configured, or probed on CUDA (``auto``)."""
    checkpointing = tcfg.gradient_checkpointing
    if isinstance(tcfg.micro_batch_size, int):
        candidates = [tcfg.micro_batch_size]
    elif device.type == "cuda":
        candidates = speed.divisors_descending(local_batch)
    else:  # CPU and MPS keep the recipe's micro-batch unless told otherwise
        candidates = [max(d for d in speed.divisors_descending(local_batch) if d <= tcfg.train_batch_size)]
    if local_batch % candidates[0]:
        raise TrainingError(
            f"training.micro_batch_size {candidates[0]} does not divide the per-process batch {local_batch}"
        )
    if device.type == "cuda" and (checkpointing == "auto" or len(candidates) > 1):
        fits = speed.cuda_fit_probe(unet, shapes["latent"], shapes["text"], shapes["dtype"], device)
        layout = speed.choose_micro_batch(candidates, fits, checkpointing)
    else:
        layout = speed.BatchLayout(candidates[0], checkpointing is True)
    speed.set_gradient_checkpointing(unet, layout.gradient_checkpointing)
    return layout


def prepare_run(
    cfg: PipelineConfig,
    components: SDComponents,
    accelerator: Accelerator,
    dirs: dict[str, Path | None],
    log: files.RunLog,
    device_name: str,
) -> Run:
    """Frozen base + LoRA on the device, the data, the micro-batch layout, the fast path, the optimizer and
    LR schedule (prepared by accelerate), the validation prompts and the FLOPs count."""
    from diffusers.optimization import get_scheduler

    tcfg, device = cfg.training, accelerator.device
    mixed_precision = accelerator.mixed_precision  # the effective one, which is what the dtypes follow
    weight_dtype = WEIGHT_DTYPES[mixed_precision]
    if tcfg.deterministic:
        # Exact resume on CUDA needs deterministic kernels; cuBLAS reads this before its first handle.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from accelerate.utils import set_seed

    set_seed(tcfg.seed, deterministic=tcfg.deterministic)  # python/numpy/torch: the LoRA init (kaiming)
    unet = components.unet
    lora_params = setup_lora_unet(unet, tcfg, device, mixed_precision)
    trainable, total = count_parameters(unet)
    noise_scheduler = components.noise_scheduler
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise TrainingError(
            f"unsupported prediction_type {noise_scheduler.config.prediction_type!r} of the base model"
        )
    # VAE/text encoder share the weight dtype (the validation pipeline passes tensors between them).
    for module in (components.vae, components.text_encoder):
        move_module(module, next(module.parameters()).device, weight_dtype)

    source, val_source, data_info = _data_sources(cfg, components, device, dirs)
    world = accelerator.num_processes
    if tcfg.effective_batch_size % world:
        raise TrainingError(
            f"the effective batch {tcfg.effective_batch_size} (train_batch_size × gradient_accumulation_steps) "
            f"is not divisible by {world} processes"
        )
    validation_prompts = encode_validation_prompts(components, tcfg.validation_prompts, device)
    empty_text = validation_prompts.negative[0].to(device)
    shapes = {"latent": source.latent_shape, "text": tuple(empty_text.shape), "dtype": weight_dtype}
    layout = _batch_layout(tcfg, unet, device, tcfg.effective_batch_size // world, shapes)
    try:
        flops = speed.training_flops_per_image(unet, lora_settings(tcfg), source.latent_shape)
    except Exception as exc:  # an unusual UNet the meta device cannot run: throughput without FLOPs
        flops, layout.notes = None, [*layout.notes, f"FLOPs not counted: {type(exc).__name__}: {exc}"]
    fast = tcfg.speed
    notes = [f"Latents = {data_info}", *layout.notes, *speed.apply_fast_path(unet, fast, device)]

    use_fused = device.type == "cuda" and fast.fused_optimizer
    optimizer = torch.optim.AdamW(
        lora_params,
        lr=tcfg.learning_rate,
        betas=(tcfg.adam_beta1, tcfg.adam_beta2),
        weight_decay=tcfg.weight_decay,
        eps=tcfg.adam_epsilon,
        **({"fused": True} if use_fused else {}),
    )
    lr_scheduler = get_scheduler(
        tcfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=tcfg.lr_warmup_steps,
        num_training_steps=tcfg.max_train_steps,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ckpt.register_lora_hooks(accelerator, accelerator.unwrap_model(unet))
    plan = StepPlan(
        SampleStream(len(source), tcfg.seed),
        tcfg.effective_batch_size,
        layout.micro_batch,
        rank=accelerator.process_index,
        world_size=world,
        seed=tcfg.seed,
        latent_shape=source.latent_shape,
        num_train_timesteps=int(noise_scheduler.config.num_train_timesteps),
        settings=NoiseSettings(tcfg.noise_offset, tcfg.input_perturbation, tcfg.caption_dropout),
        device=device,
    )
    log.write(
        f"micro-batch {layout.micro_batch} × {plan.accumulation_steps} accumulation × {world} process(es)"
    )
    return Run(
        unet=unet,
        lora_params=lora_params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        noise_scheduler=noise_scheduler,
        source=source,
        val_source=val_source,
        plan=plan,
        layout=layout,
        empty_text=empty_text,
        validation_prompts=validation_prompts,
        weight_dtype=weight_dtype,
        mixed_precision=mixed_precision,
        trainable=trainable,
        total=total,
        flops_per_image=flops,
        notes=notes + (["fused AdamW"] if use_fused else []),
        compiled=device.type == "cuda" and fast.compile,
        device=device,
        device_name=device_name,
        peak_precision=speed.peak_precision(mixed_precision, device.type == "cuda" and fast.tf32),
        scaling_factor=float(components.vae.config.scaling_factor),
        channels_last=device.type == "cuda" and fast.channels_last,
    )


def run_header(cfg: PipelineConfig, run: Run, device: torch.device, device_info: DeviceInfo) -> list[str]:
    """The configuration block of training_log_full.txt (diffusers' "***** Running training *****" lines)."""
    tcfg, plan = cfg.training, run.plan
    flops = f"{run.flops_per_image / 1e9:.1f} GFLOP" if run.flops_per_image else "not counted"
    return [
        f"Num examples = {len(run.source)}",
        f"Num Epochs = {plan.stream.epochs_for(tcfg.max_train_steps, tcfg.effective_batch_size)}",
        f"Instantaneous batch size per device = {plan.micro_batch}",
        f"Total train batch size (w. parallel, distributed & accumulation) = {tcfg.effective_batch_size}",
        f"Gradient Accumulation steps = {plan.accumulation_steps}",
        f"Processes = {plan.world_size}",
        f"Total optimization steps = {tcfg.max_train_steps}",
        f"Trainable params = {run.trainable:,} of {run.total:,} UNet params ({100 * run.trainable / run.total:.2f} %)",
        f"LoRA = rank {tcfg.lora_rank}, alpha {tcfg.lora_alpha}, dropout {tcfg.lora_dropout}, "
        f"targets {','.join(tcfg.lora_target_modules)}",
        f"Optimizer = AdamW lr {tcfg.learning_rate:g}, betas ({tcfg.adam_beta1}, {tcfg.adam_beta2}), "
        f"weight decay {tcfg.weight_decay:g}, grad clip {tcfg.gradient_clipping:g}; "
        f"{tcfg.lr_scheduler} schedule with {tcfg.lr_warmup_steps} warmup steps",
        f"Objective = min-SNR-γ {tcfg.snr_gamma}, noise offset {tcfg.noise_offset:g}, input perturbation "
        f"{tcfg.input_perturbation:g}, caption dropout {tcfg.caption_dropout:g}",
        f"Device = {device} ({device_info.name}); mixed precision {run.mixed_precision}; "
        f"{device_info.dtype_policy}; gradient checkpointing {run.layout.gradient_checkpointing}",
        f"UNet FLOPs per training image = {flops}",
        f"Validation loss = {f'{len(run.val_source)} held-out images' if run.val_source else 'no val split'}",
        *run.notes,
    ]


def checkpoint_state(
    current: dict[str, Any], cfg: PipelineConfig, run: Run, step: int, loss: float, smoothed: float | None
) -> dict[str, Any]:
    """training_state.json: what resume compares (hashes, base model) and where the data stream stands."""
    tcfg = cfg.training
    position = step * tcfg.effective_batch_size
    return {
        **current,  # training_hash, training_config, dataset_fingerprint, base_model
        "epoch": position // len(run.source),  # 0-based epoch of the next sample
        "position": position % len(run.source),  # its index within that epoch
        "micro_batch_size": run.plan.micro_batch,
        "num_processes": run.plan.world_size,
        "max_train_steps": tcfg.max_train_steps,
        "lora": {
            "rank": tcfg.lora_rank,
            "alpha": tcfg.lora_alpha,
            "dropout": tcfg.lora_dropout,
            "target_modules": list(tcfg.lora_target_modules),
        },
        "trainable_params": run.trainable,
        "total_params": run.total,
        "loss": loss,
        "smoothed_loss": smoothed,
    }


# ----------------------------------------------------------------------------------------------
# inside the loop: settling the device-side numbers, saving
# ----------------------------------------------------------------------------------------------


@dataclass
class PendingStep:
    """An optimizer step whose numbers are still on the device (read at the next logging point)."""

    step: int
    epoch: int  # 1-based epoch of the step's last sample
    lr: float
    micro_losses: torch.Tensor  # [accumulation] each micro-batch's share of the step's loss
    grad_norm: torch.Tensor
    batches: list[MicroBatch]  # which train items each micro-batch held (for the error message)


def settle(
    pending: list[PendingStep],
    clock: files.StepClock,
    source: Source,
    newest: Callable[[], str],
    ranks: Ranks | None = None,
) -> list[dict[str, Any]]:
    """One host synchronisation for the pending steps: their losses.csv rows. A non-finite loss raises,
    naming the first bad step, micro-batch and images (before any checkpoint of it can be written).

    With several processes a step's loss is the mean of the processes' shares (each the mean of its part of
    the effective batch); every rank gathers them first, so a non-finite loss on one raises on all of them
    at the same point (the one that holds it names its images) and none waits for a missing peer."""
    seconds = clock.settle(len(pending))
    numbers = torch.stack(
        [torch.cat([p.micro_losses, p.grad_norm.reshape(1).float()]) for p in pending]
    ).cpu()
    ranks = ranks or Ranks()
    shares = ranks.gather(numbers[:, :-1].double().sum(dim=1)) if ranks.distributed else None
    rows = []
    for k, (p, values) in enumerate(zip(pending, numbers.tolist(), strict=True)):
        *micro, grad_norm = values
        for m, value in enumerate(micro):
            if not math.isfinite(value):
                raise TrainingError(
                    f"non-finite loss ({value}) at optimizer step {p.step}, micro-batch {m + 1}/{len(micro)} "
                    f"(epoch {p.epoch}), images {[source.image_files[i] for i in p.batches[m].items]}; no checkpoint "
                    f"written, newest good checkpoint: {newest()}"
                )
        loss = sum(micro) if shares is None else shares[:, k].sum().item() / ranks.world_size
        if not math.isfinite(loss):
            bad = [r for r in range(ranks.world_size) if not math.isfinite(shares[r, k].item())]
            raise TrainingError(
                f"non-finite loss at optimizer step {p.step} on process {bad[0]} (its log names the images); "
                f"no checkpoint written, newest good checkpoint: {newest()}"
            )
        rows.append(
            {
                "step": p.step,
                "epoch": p.epoch,
                "loss": loss,
                "lr": p.lr,
                "grad_norm": grad_norm,
                "seconds": seconds,
            }
        )
    pending.clear()
    return rows


def save_and_rotate(
    accelerator: Accelerator,
    root: Path,
    step: int,
    state: dict[str, Any],
    rows: dict[str, list[dict[str, Any]]],
    keep: int,
    protect: list[int],
    tag: int | None = None,
) -> tuple[Path, list[Path]]:
    """Write checkpoint-``step`` atomically with its losses.csv/validation_loss.csv, then rotate (rank 0;
    every rank takes part in the save, ``tag`` names its temporary folder: ``checkpoints.save_checkpoint``)."""

    def write_logs(folder: Path) -> None:
        files.write_losses_csv(folder / files.LOSSES_NAME, rows["losses"])
        if rows["validation"]:
            files.write_rows_csv(
                folder / files.VALIDATION_LOSS_NAME, rows["validation"], list(rows["validation"][0])
            )

    path = ckpt.save_checkpoint(accelerator, root, step, state, write_extra=write_logs, tag=tag)
    if not accelerator.is_main_process:
        return path, []
    return path, ckpt.rotate_checkpoints(root, keep, protect=protect)


@dataclass
class History:
    """The run's numbers so far: per-step rows (losses.csv), validation rows, the loss EMA."""

    losses: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    smoothed: float | None = None

    def __post_init__(self) -> None:
        if self.losses:
            self.smoothed = files.ema(r["loss"] for r in self.losses)[-1]

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.losses.append(row)
            d = files.EMA_DECAY
            self.smoothed = (
                row["loss"] if self.smoothed is None else d * self.smoothed + (1 - d) * row["loss"]
            )

    @property
    def best_val_step(self) -> int | None:
        return files.best_validation_step(self.validation)


def record_steps(
    rows: list[dict[str, Any]],
    history: History,
    run: Run,
    tcfg: TrainingConfig,
    accelerator: Accelerator,
    log: files.RunLog,
    clock: files.StepClock,
    output_dir: Path,
) -> speed.Throughput:
    """Settled steps → losses.csv, TensorBoard, one DEBUG progress line each; returns the throughput of
    this logging window (images/s, TFLOP/s, MFU)."""
    history.add(rows)
    if accelerator.is_main_process:
        files.append_rows_csv(output_dir / files.LOSSES_NAME, rows, files.LOSSES_COLUMNS)
    seconds = rows[-1]["seconds"]
    rate = speed.mfu(
        tcfg.effective_batch_size / seconds if seconds > 0 else 0.0,
        run.flops_per_image,
        run.device_name,
        run.peak_precision,
    )
    max_steps = tcfg.max_train_steps
    for row in rows:
        accelerator.log(
            {"loss": row["loss"], "lr": row["lr"], "grad_norm": row["grad_norm"], "epoch": row["epoch"]},
            step=row["step"],
        )
        line = files.progress_line(
            row["step"], max_steps, clock, row["epoch"], row["loss"], row["lr"], rate.describe()
        )
        log.write(line, logging.DEBUG)
    accelerator.log(
        {k: v for k, v in rate.as_metadata().items() if not isinstance(v, str)}, step=rows[-1]["step"]
    )
    return rate


def validate(
    run: Run,
    cfg: PipelineConfig,
    accelerator: Accelerator,
    components: SDComponents,
    history: History,
    step: int,
    epoch: int,
    output_dir: Path,
    log: files.RunLog,
) -> ValidationResult:
    """The validation loss on the held-out split and the validation images, on the main process only;
    neither touches the training RNG (own generators; global RNG restored)."""
    tcfg, device = cfg.training, accelerator.device
    unet = accelerator.unwrap_model(run.unet)
    with speed.eager(run.compiled):
        if run.val_source is not None:
            measured = validation_loss(
                unet, run.noise_scheduler, run.val_source, run.scaling_factor, run.weight_dtype, tcfg.seed,
                run.plan.micro_batch,
            )  # fmt: skip
            row = {"step": step, **measured}
            history.validation = [r for r in history.validation if r["step"] != step] + [row]
            files.write_rows_csv(output_dir / files.VALIDATION_LOSS_NAME, history.validation, list(row))
            accelerator.log({"val_loss": row["val_loss"]}, step=step)
            log.write(
                f"validation loss at step {step}: {row['val_loss']:.5f} (best so far at step {history.best_val_step})"
            )
        shown = run_validation(
            unet,
            components,
            run.validation_prompts,
            out_dir=output_dir / files.VALIDATION_DIR,
            step=step,
            epoch=epoch,
            seed=tcfg.seed,
            num_images=tcfg.num_validation_images,
            num_inference_steps=tcfg.validation_inference_steps,
            guidance_scale=tcfg.validation_guidance_scale,
            resolution=cfg.dataset.resolution,
            device=device,
        )
    log.write(f"validation images at step {step}: {shown.grid_path.name} ({shown.seconds:.1f} s)")
    return shown


def train_lora(
    cfg: PipelineConfig,
    components: SDComponents,
    device_info: DeviceInfo,
    *,
    train_dir: Path,
    latents_dir: Path | None,
    output_dir: Path,
    dataset_fingerprint: str,
    val_dir: Path | None = None,
    val_latents_dir: Path | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_validation: Callable[[dict[str, Any]], None] | None = None,
    echo: Callable[[str], None] | None = None,
    max_steps_this_run: int | None = None,
    ranks: Ranks | None = None,
) -> TrainingResult:
    """Train (or resume, or skip) the LoRA of ``cfg.training`` on ``train_dir`` (latent cache ``latents_dir``;
    held-out ``val_dir``/``val_latents_dir`` for the validation loss). ``components`` are taken over. ``echo``
    gets the log's INFO lines live; ``max_steps_this_run`` stops early without an extra checkpoint. Every
    process of a launcher (``ranks``) runs this; rank 0 alone decides the start, writes the run folder and
    calls the callbacks. A non-finite loss raises TrainingError before any checkpoint of it is written."""
    call_start = time.perf_counter()
    tcfg, output_dir = cfg.training, Path(output_dir)
    ckpt_root = output_dir / "checkpoints"
    ranks = ranks or Ranks()
    main = ranks.is_main
    log = files.RunLog(output_dir / files.LOG_NAME, echo) if main else rank_log(output_dir, ranks.rank)
    log.path.parent.mkdir(parents=True, exist_ok=True)
    log.write(
        f"===== {datetime.now().isoformat(timespec='seconds')} train_lora start (pid {os.getpid()}) ====="
    )

    # ---- 1. where do we start: resume, skip or fresh (said in the log before anything is loaded) ----
    start, current = decide_start(cfg, components, dataset_fingerprint, ckpt_root, log, ranks)
    if start.complete:
        return skipped_result(cfg, output_dir, start, device_info, call_start, write=main)

    accelerator = make_accelerator(cfg, device_info, output_dir)
    try:
        # ---- 2. model, data, optimizer; then the checkpoint's state on top ------------------------
        dirs = {"train_dir": Path(train_dir), "latents_dir": latents_dir}
        dirs |= {"val_dir": val_dir, "val_latents_dir": val_latents_dir}
        run = prepare_run(cfg, components, accelerator, dirs, log, device_info.name)
        if main:  # before the first step: a disk that cannot hold the checkpoints refuses now, not at step 2500
            lora_bytes = sum(p.numel() * p.element_size() for p in run.lora_params)
            ckpt.check_room_for_training(ckpt_root, lora_bytes, tcfg.checkpoints_total_limit)
        global_step, history = restore(accelerator, start.resume_from, run, output_dir, log)
        ckpt_tag = ranks.broadcast(os.getpid())  # names the temporary checkpoint folder on every rank
        log.write("***** Running training *****")
        for line in run_header(cfg, run, accelerator.device, device_info):
            log.write("  " + line)

        # ---- 3. the loop ------------------------------------------------------------------------
        unet, optimizer, plan = run.unet, run.optimizer, run.plan
        unet.train()
        clock, pending, steps_this_run, latest_grid = files.StepClock(), [], 0, None
        while global_step < tcfg.max_train_steps:
            if max_steps_this_run is not None and steps_this_run >= max_steps_this_run:
                log.write(f"stopping after {steps_this_run} steps in this call (max_steps_this_run)")
                break
            if ranks.stop_requested():  # SIGINT on any process: all stop before the same step
                raise KeyboardInterrupt(f"SIGINT: every process stops before step {global_step + 1}")
            lr = optimizer.param_groups[0]["lr"]  # the rate this step will use
            batches = plan.micro_batches(global_step)
            micro_losses = []
            for i, batch in enumerate(batches):
                # Gradients are all-reduced across processes once per step, with the last micro-batch.
                with accelerator.no_sync(unet) if i < len(batches) - 1 else contextlib.nullcontext():
                    per_sample = diffusion_loss(
                        unet, run.noise_scheduler, batch, run.source, run.empty_text, run.scaling_factor,
                        run.weight_dtype, tcfg.snr_gamma, run.channels_last,
                    )  # fmt: skip
                    loss = per_sample.sum() / plan.local_batch  # this micro-batch's share of the step mean
                    accelerator.backward(loss)
                micro_losses.append(loss.detach())  # stays on the device: no host sync per micro-step
            # Clip the LoRA gradients (a list, not a spent iterator); the returned norm is the pre-clip one.
            grad_norm = accelerator.clip_grad_norm_(run.lora_params, tcfg.gradient_clipping)
            optimizer.step()
            run.lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            steps_this_run += 1
            epoch = (global_step * tcfg.effective_batch_size - 1) // len(run.source) + 1  # of its last sample
            pending.append(PendingStep(global_step, epoch, lr, torch.stack(micro_losses), grad_norm, batches))

            is_last = global_step == tcfg.max_train_steps
            stopping = max_steps_this_run is not None and steps_this_run >= max_steps_this_run
            due_log = global_step % tcfg.log_every_steps == 0 or is_last
            due_validation = global_step % tcfg.validation_steps == 0 or is_last
            due_checkpoint = global_step % tcfg.checkpointing_steps == 0 or is_last
            if not (due_log or due_validation or due_checkpoint or stopping):
                continue
            # ---- 4. a logging point: one host sync (non-finite check), then log / validate / save ------
            rows = settle(pending, clock, run.source, lambda: _newest_name(ckpt_root), ranks)
            rate = record_steps(rows, history, run, tcfg, accelerator, log, clock, output_dir)
            if on_progress is not None and due_log and main:
                on_progress(progress_report(rows[-1], history, clock, rate, tcfg.max_train_steps))
            if due_validation and main:  # the others go on to the next step's all-reduce and wait there
                shown = validate(
                    run, cfg, accelerator, components, history, global_step, epoch, output_dir, log
                )
                latest_grid = shown.grid_path
                if on_validation is not None:
                    on_validation(shown.as_callback_dict())
            if due_checkpoint:
                state = checkpoint_state(current, cfg, run, global_step, rows[-1]["loss"], history.smoothed)
                protect = [history.best_val_step] if history.best_val_step is not None else []
                saved, removed = save_and_rotate(
                    accelerator, ckpt_root, global_step, state,
                    {"losses": history.losses, "validation": history.validation},
                    tcfg.checkpoints_total_limit, protect, ckpt_tag,
                )  # fmt: skip
                log.write(f"saved {saved.name}" + "".join(f"; removed {p.name}" for p in removed))
            clock.resume()  # checkpoint and validation time is not training time

        # ---- 5. wrap up ---------------------------------------------------------------------------
        return build_result(
            cfg, run, history, clock, start, output_dir, call_start, steps_this_run, latest_grid, log, main
        )
    except BaseException as exc:
        # KeyboardInterrupt (Dagster termination) included: record it, then let it propagate unchanged.
        log.write(
            f"stopped: {type(exc).__name__}: {exc} (newest checkpoint: {_newest_name(ckpt_root)})",
            logging.ERROR,
        )
        raise
    finally:
        accelerator.end_training()


# ----------------------------------------------------------------------------------------------
# resume, progress and the result
# ----------------------------------------------------------------------------------------------


def decide_start(
    cfg: PipelineConfig,
    components: SDComponents,
    dataset_fingerprint: str,
    ckpt_root: Path,
    log: files.RunLog,
    ranks: Ranks | None = None,
) -> tuple[ckpt.StartDecision, dict[str, Any]]:
    """Resume, skip or fresh start (``checkpoints.decide_start``) for this config, dataset and base model;
    says so in the log at once. Returns the decision and what every checkpoint of this run records.
    Rank 0 decides (it may clean up, set aside or move folders); the other ranks get its decision."""
    current = {
        "training_hash": cfg.training_hash(components.family.name),
        "training_config": recorded_training_config(cfg),
        "dataset_fingerprint": dataset_fingerprint,
        "base_model": components.identity,
    }
    start = on_main(
        ranks or Ranks(),
        lambda: ckpt.decide_start(
            ckpt_root,
            current,
            max_train_steps=cfg.training.max_train_steps,
            explain=lambda old: hash_relevant_differences(cfg, old),
            superseded_outputs=[ckpt_root.parent / name for name in files.RUN_OUTPUTS],
        ),
    )
    for line in [*start.log_lines, start.note]:
        log.write(line, logging.WARNING if line.startswith("warning") or start.superseded else logging.INFO)
    return start, current


def restore(
    accelerator: Accelerator,
    resume: ckpt.CheckpointInfo | None,
    run: Run,
    output_dir: Path,
    log: files.RunLog,
) -> tuple[int, History]:
    """Load the checkpoint's state (LoRA, optimizer, schedule, RNGs) and its logs; rewrite the run folder's
    losses.csv/validation_loss.csv from them (which drops the rows of an interrupted tail)."""
    losses_csv, val_csv = output_dir / files.LOSSES_NAME, output_dir / files.VALIDATION_LOSS_NAME
    main = accelerator.is_main_process
    if resume is None:
        history = History([], [])
    else:
        ckpt.load_checkpoint(accelerator, resume)
        history = History(
            files.read_losses_csv(resume.path / files.LOSSES_NAME),
            files.read_validation_losses(resume.path / files.VALIDATION_LOSS_NAME),
        )
        for key, now in (("micro_batch_size", run.plan.micro_batch), ("num_processes", run.plan.world_size)):
            if resume.state.get(key, now) != now:
                log.write(
                    f"note: {resume.path.name} was trained with {key} {resume.state[key]}, this run uses {now}: "
                    "the same maths in another float summation order (close to, not bit-identical with, an "
                    "uninterrupted run)",
                    logging.WARNING,
                )
    if main:
        files.write_losses_csv(losses_csv, history.losses)
        if history.validation:
            files.write_rows_csv(val_csv, history.validation, list(history.validation[0]))
        else:
            val_csv.unlink(missing_ok=True)
    return (resume.step if resume else 0), history


def progress_report(
    row: dict[str, Any], history: History, clock: files.StepClock, rate: speed.Throughput, max_steps: int
) -> dict[str, Any]:
    """What ``on_progress`` receives at each logging step (the Dagster run log prints ``line``)."""
    line = files.progress_line(
        row["step"], max_steps, clock, row["epoch"], row["loss"], row["lr"], rate.describe()
    )
    return {
        **row,
        "max_steps": max_steps,
        "smoothed_loss": history.smoothed,
        "seconds_per_step": clock.seconds_per_step,
        "eta_seconds": clock.eta_seconds(max_steps - row["step"]),
        "throughput": rate.as_metadata(),
        "val_loss": history.validation[-1]["val_loss"] if history.validation else None,
        "line": line,
    }


def rank_log(output_dir: Path, rank: int) -> files.RunLog:
    """The log of a rank other than 0 (rank 0 writes training_log_full.txt)."""
    return files.RunLog(Path(output_dir) / "logs" / f"rank{rank}_training_log.txt")


def _newest_name(root: Path) -> str:
    newest = ckpt.newest_checkpoint(root)
    return newest.path.name if newest else "none"


def build_result(
    cfg: PipelineConfig,
    run: Run,
    history: History,
    clock: files.StepClock,
    start: ckpt.StartDecision,
    output_dir: Path,
    call_start: float,
    steps_this_run: int,
    latest_grid: Path | None,
    log: files.RunLog,
    write: bool = True,
) -> TrainingResult:
    """The run's result (and, when ``write``, training_summary.json and the loss curve) after the loop."""
    tcfg = cfg.training
    seconds_per_step, images_per_second = clock.throughput(tcfg.effective_batch_size)
    overall = (
        speed.mfu(images_per_second, run.flops_per_image, run.device_name, run.peak_precision)
        if images_per_second
        else None
    )
    newest = ckpt.newest_checkpoint(output_dir / "checkpoints")
    losses = history.losses
    result = TrainingResult(
        global_step=losses[-1]["step"] if losses else 0,
        max_train_steps=tcfg.max_train_steps,
        trainable_params=run.trainable,
        total_params=run.total,
        final_loss=losses[-1]["loss"] if losses else None,
        smoothed_loss=history.smoothed,
        wall_time_s=time.perf_counter() - call_start,
        seconds_per_step=seconds_per_step,
        images_per_second=images_per_second,
        peak_memory_mb=peak_memory_mb(run.device),
        device=str(run.device),
        resumed_from=start.resume_from.step if start.resume_from else None,
        skipped=False,
        checkpoint_dir=newest.path if newest else None,
        log_path=output_dir / files.LOG_NAME,
        loss_curve_png=files.plot_loss_curve(
            losses, output_dir / files.LOSS_CURVE_NAME, validation=history.validation
        )
        if write
        else None,
        latest_grid=latest_grid or files.latest_grid(output_dir),
        losses=losses,
        resume_note=start.note,
        steps_this_run=steps_this_run,
        output_dir=output_dir,
        losses_csv=output_dir / files.LOSSES_NAME,
        micro_batch_size=run.plan.micro_batch,
        accumulation_steps=run.plan.accumulation_steps,
        num_processes=run.plan.world_size,
        gradient_checkpointing=run.layout.gradient_checkpointing,
        flops_per_image=run.flops_per_image,
        tflops_per_second=overall.tflops_per_second if overall else None,
        mfu=overall.mfu if overall else None,
        mfu_peak=f"{overall.peak_tflops:g} TFLOP/s {overall.peak_precision}"
        if overall and overall.peak_tflops
        else None,
        val_loss=history.validation[-1]["val_loss"] if history.validation else None,
        best_val_step=history.best_val_step,
        validation_losses=history.validation,
    )
    if write:
        atomic_write_json(output_dir / files.SUMMARY_NAME, result.summary(), default=str)
    log.write(
        f"done: step {result.global_step}/{tcfg.max_train_steps}, loss {result.final_loss}, "
        f"{result.seconds_per_step or 0:.2f} s/step, peak memory {result.peak_memory_mb or 0:.0f} MB"
    )
    return result


def skipped_result(
    cfg: PipelineConfig,
    output_dir: Path,
    start: ckpt.StartDecision,
    device_info: DeviceInfo,
    call_start: float,
    write: bool = True,
) -> TrainingResult:
    """The run is already complete: report it from disk (summary, losses), re-creating what is missing
    (when ``write``: rank 0)."""
    newest = start.resume_from
    assert newest is not None
    losses = files.read_losses_csv(newest.path / files.LOSSES_NAME)
    validation = files.read_validation_losses(newest.path / files.VALIDATION_LOSS_NAME)
    losses_csv = output_dir / files.LOSSES_NAME
    if write and not losses_csv.is_file():
        files.write_losses_csv(losses_csv, losses)
    curve = output_dir / files.LOSS_CURVE_NAME
    if write and not curve.is_file():
        files.plot_loss_curve(losses, curve, validation=validation)
    summary_path = output_dir / files.SUMMARY_NAME
    try:
        previous: dict[str, Any] = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        previous = {}
    carried = {
        k: previous.get(k)
        for k in (
            "seconds_per_step",
            "images_per_second",
            "peak_memory_mb",
            "micro_batch_size",
            "accumulation_steps",
            "gradient_checkpointing",
            "flops_per_image",
            "tflops_per_second",
            "mfu",
            "mfu_peak",
        )
    }
    result = TrainingResult(
        global_step=newest.step,
        max_train_steps=cfg.training.max_train_steps,
        trainable_params=int(newest.state.get("trainable_params", previous.get("trainable_params", 0))),
        total_params=int(newest.state.get("total_params", previous.get("total_params", 0))),
        final_loss=losses[-1]["loss"] if losses else None,
        smoothed_loss=files.ema(r["loss"] for r in losses)[-1] if losses else None,
        wall_time_s=time.perf_counter() - call_start,
        device=previous.get("device", device_info.type),
        resumed_from=newest.step,
        skipped=True,
        checkpoint_dir=newest.path,
        log_path=output_dir / files.LOG_NAME,
        loss_curve_png=curve if curve.is_file() else None,
        latest_grid=files.latest_grid(output_dir),
        losses=losses,
        resume_note=start.note,
        steps_this_run=0,
        output_dir=output_dir,
        losses_csv=losses_csv,
        num_processes=int(newest.state.get("num_processes", 1)),
        val_loss=validation[-1]["val_loss"] if validation else None,
        best_val_step=files.best_validation_step(validation),
        validation_losses=validation,
        **carried,
    )
    if write and not summary_path.is_file():
        atomic_write_json(summary_path, result.summary(), default=str)
    return result
