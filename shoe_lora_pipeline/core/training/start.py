"""Where a run starts and what it starts with: the resume / skip / fresh decision, the settings recorded
with the run (and which of them changed), the accelerator, and the prepared :class:`Run` (frozen base +
LoRA on the device, data, micro-batch layout, optimizer, LR schedule, validation prompts) with the
checkpoint's state restored on top."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shoe_lora_pipeline.core import checkpoints as ckpt
from shoe_lora_pipeline.core import run_artifacts as files
from shoe_lora_pipeline.core import train_speed as speed
from shoe_lora_pipeline.core.distributed import Ranks, on_main
from shoe_lora_pipeline.core.latents import check_resolution, has_images, move_module, vae_encoding_dtype
from shoe_lora_pipeline.core.models import count_parameters
from shoe_lora_pipeline.core.train_data import (
    CachedSource,
    NoiseSettings,
    OnTheFlySource,
    SampleStream,
    Source,
    StepPlan,
)
from shoe_lora_pipeline.core.training.history import History
from shoe_lora_pipeline.core.training.objective import WEIGHT_DTYPES, lora_settings, setup_lora_unet
from shoe_lora_pipeline.core.training.result import TrainingError
from shoe_lora_pipeline.core.validation import (
    ValidationPrompts,
    encode_validation_prompts,
)

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from shoe_lora_pipeline.core.config import PipelineConfig, TrainingConfig
    from shoe_lora_pipeline.core.device import DeviceInfo
    from shoe_lora_pipeline.core.models import SDComponents


TRACKER_PROJECT = "shoe_lora"


def recorded_training_config(cfg: PipelineConfig, family: str | None = None) -> dict[str, Any]:
    """The settings written into each checkpoint, so a mismatch can name the key that changed;
    ``model_family`` is the base model's resolved family when given (``SDComponents.family.name``)."""
    recorded = {
        **cfg.training.model_dump(mode="json", exclude={"output_dir"}),
        "resolution": cfg.dataset.resolution,
    }
    if family is not None:
        recorded["model_family"] = family
    return recorded


def hash_relevant_differences(
    cfg: PipelineConfig, old_config: dict[str, Any] | None, family: str | None = None
) -> list[str]:
    """Settings of a checkpoint's recorded training config that differ from ``cfg`` AND change its hash.

    Each differing key is put back to its old value on a copy of ``cfg``; if that changes
    ``cfg.training_hash()``, the key is one of the reasons (config.py stays the one definition of what counts).
    """
    if not isinstance(old_config, dict):
        return []
    now = recorded_training_config(cfg, family)
    reasons = []
    for key in sorted(set(old_config) | set(now)):
        old, new = old_config.get(key, "<absent>"), now.get(key, "<absent>")
        if key == "model_family":  # the resolved family; checkpoints from before families were SD1.5
            old = old_config.get(key, "sd15")
        if old == new:
            continue
        probe = cfg.model_copy(deep=True)
        try:
            if key == "model_family":
                relevant = True  # another family never resumes (the hash includes it)
            else:
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
    empty_text: torch.Tensor  # the empty caption's hidden states (caption dropout)
    empty_pooled: torch.Tensor | None  # and its pooled embedding (SDXL)
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
    policy = cfg.dataset.cleaning.resize_policy  # where SDXL's crop top-left comes from
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
            resize_policy=policy,
        )
        info = f"cached in {dirs['latents_dir']} ({len(source)} items)" + (
            ", resident on the device" if resident else "; VAE/text encoder stay on the CPU"
        )
    else:
        for module in (components.vae, *components.text_encoders):
            module.to(device)
        source = OnTheFlySource(components, dirs["train_dir"], cfg.dataset.resolution, device, policy)
        info = "encoded on the fly every step (training.cache_latents: false)"
    # The validation loss reads the val split's latent cache; uncached runs encode it like the train set.
    val_source: Source | None = None
    val_dir, val_latents = dirs.get("val_dir"), dirs.get("val_latents_dir")
    if val_dir is not None and has_images(val_dir):
        if val_latents is not None and (val_latents / "index.json").is_file():
            val_source = CachedSource(
                val_latents, val_dir, fingerprint, cfg.dataset.resolution, device, resize_policy=policy
            )
        elif not tcfg.cache_latents:
            val_source = OnTheFlySource(components, val_dir, cfg.dataset.resolution, device, policy)
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
    try:
        check_resolution(cfg.dataset.resolution, components)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    # VAE/text encoders share the weight dtype (the validation pipeline passes tensors between them), but
    # the SDXL VAE overflows in fp16: it stays in fp32 (the SDXL pipeline decodes fp16 latents with it).
    vae_dtype, vae_note = vae_encoding_dtype(components, weight_dtype)
    for module in (components.vae, *components.text_encoders):
        dtype = vae_dtype if module is components.vae else weight_dtype
        move_module(module, next(module.parameters()).device, dtype)
    family_notes = [f"Base model family = {components.family.name} ({components.family.title})"]
    if components.family.uses_added_conditions:
        family_notes.append(
            "Added conditions = pooled text embedding + time_ids (original size from captions.json, crop "
            f"top-left of resize_policy {cfg.dataset.cleaning.resize_policy}, target {cfg.dataset.resolution})"
        )
    if cfg.dataset.resolution != components.family.default_resolution:
        family_notes.append(
            f"Resolution = {cfg.dataset.resolution} (the {components.family.title} default is "
            f"{components.family.default_resolution})"
        )
    if vae_note and not tcfg.cache_latents:
        family_notes.append(vae_note)

    source, val_source, data_info = _data_sources(cfg, components, device, dirs)
    world = accelerator.num_processes
    if tcfg.effective_batch_size % world:
        raise TrainingError(
            f"the effective batch {tcfg.effective_batch_size} (train_batch_size × gradient_accumulation_steps) "
            f"is not divisible by {world} processes"
        )
    validation_prompts = encode_validation_prompts(components, tcfg.validation_prompts, device)
    empty_text = validation_prompts.empty[0].to(device)
    empty_pooled = None if validation_prompts.empty_pooled is None else validation_prompts.empty_pooled[0].to(device)
    shapes = {"latent": source.latent_shape, "text": tuple(empty_text.shape), "dtype": weight_dtype}
    layout = _batch_layout(tcfg, unet, device, tcfg.effective_batch_size // world, shapes)
    try:
        flops = speed.training_flops_per_image(unet, lora_settings(tcfg), source.latent_shape)
    except Exception as exc:  # an unusual UNet the meta device cannot run: throughput without FLOPs
        flops, layout.notes = None, [*layout.notes, f"FLOPs not counted: {type(exc).__name__}: {exc}"]
    fast = tcfg.speed
    notes = [*family_notes, f"Latents = {data_info}", *layout.notes, *speed.apply_fast_path(unet, fast, device)]

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
        empty_pooled=empty_pooled,
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
        "training_config": recorded_training_config(cfg, components.family.name),
        "dataset_fingerprint": dataset_fingerprint,
        "base_model": components.identity,
    }
    start = on_main(
        ranks or Ranks(),
        lambda: ckpt.decide_start(
            ckpt_root,
            current,
            max_train_steps=cfg.training.max_train_steps,
            explain=lambda old: hash_relevant_differences(cfg, old, components.family.name),
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
