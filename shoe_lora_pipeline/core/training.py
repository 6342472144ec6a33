"""The LoRA training loop for Stable Diffusion 1.x UNets (the ``lora_training`` stage core).

Read :func:`train_lora` top to bottom: it is the whole recipe. The helpers above it are small pieces with
one job each (a seeded sampler that can resume mid-epoch, the run's own RNG, the two data sources, the
loss, the log files).

The recipe (as diffusers' ``train_text_to_image_lora.py``, with its faults fixed — see
``../shared/REFERENCE.md``):

* latents ``scaling_factor * (mean + std * eps)`` from the VAE's latent distribution (cached or encoded on
  the fly — both draw ``eps`` from the same generator, so they give the same numbers);
* noise ~ N(0, 1) and timesteps uniform in ``[0, num_train_timesteps)``, noised with the base model's
  DDPMScheduler; target = noise (``epsilon``) or velocity (``v_prediction``); MSE in fp32;
* LoRA on the UNet's attention projections via peft; AdamW over the LoRA parameters only; LoRA parameters
  in fp32 whenever the *effective* mixed precision is fp16/bf16 (frozen weights in the half dtype);
* gradient accumulation through accelerate; the LoRA gradients' norm clipped with a *list* of
  parameters (the reference passes an exhausted iterator, so it never clipped);
* the LR schedule (``diffusers.optimization.get_scheduler``) steps once per optimizer step.

Determinism and resume: one dedicated ``torch.Generator`` (seeded from ``training.seed``) drives latent
sampling, noise and timesteps, and :class:`EpochSampler` yields a fresh seeded permutation per epoch with
an explicit position. Both are checkpointed (with optimizer, LR schedule, global RNGs and the LoRA
weights), so a resumed run continues mid-epoch and reproduces the uninterrupted run bit for bit on the
same machine: tested on the CPU, and on CUDA (H200) with ``training.deterministic: true`` (deterministic
kernels) — cuDNN/cuBLAS default kernels are not run-to-run deterministic (two identical fresh runs differed by
6e-5 in the LoRA weights after 4 steps), so there a resume is as close as a rerun, not identical.
Validation never touches this state (own per-image seeds, global RNG restored).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from shoe_lora_pipeline.core import checkpoints as ckpt
from shoe_lora_pipeline.core.captions import read_captions_json
from shoe_lora_pipeline.core.fsutil import atomic_write_json
from shoe_lora_pipeline.core.latents import (
    encode_captions,
    encode_images,
    load_image_tensor,
    load_latent_dataset,
    move_module,
)
from shoe_lora_pipeline.core.manifest import file_sha256
from shoe_lora_pipeline.core.models import count_parameters, lora_config
from shoe_lora_pipeline.core.validation import encode_validation_prompts, run_validation

logger = logging.getLogger(__name__)

LOSSES_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "seconds"]
SUMMARY_NAME = "training_summary.json"
LOG_NAME = "training_log_full.txt"
LOSS_CURVE_NAME = "loss_curve.png"
TRACKER_PROJECT = "shoe_lora"
EMA_DECAY = 0.9


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the message names the step and the images."""


@dataclass
class TrainingResult:
    global_step: int
    max_train_steps: int
    trainable_params: int
    total_params: int
    final_loss: float | None
    smoothed_loss: float | None  # EMA (decay 0.9) of the per-step losses
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

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict (everything but the per-step losses)."""
        data = asdict(self)
        data.pop("losses")
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


# ----------------------------------------------------------------------------------------------
# seeds, sampler and RNG — the state that makes resume exact
# ----------------------------------------------------------------------------------------------


def derived_seed(seed: int, *parts: Any) -> int:
    """An independent 63-bit seed per purpose ("noise", "sampler", epoch…) from the one configured seed."""
    digest = hashlib.sha256("/".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class EpochSampler:
    """Micro-batches of indices: a fresh seeded permutation per epoch, and an explicit position in it.

    ``next_batch()`` returns (epoch, indices) and advances. The position is part of every checkpoint
    (``state_dict``), so a resumed run continues with the next micro-batch of the interrupted epoch: no
    sample is replayed and none skipped. The last micro-batch of an epoch may be smaller (no drop_last).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int) -> None:
        if num_items < 1:
            raise ValueError("cannot sample from an empty train set")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # micro-batch index within the epoch
        self._perm: tuple[int, list[int]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_items / self.batch_size)

    def permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, "sampler", epoch))
            self._perm = (epoch, torch.randperm(self.num_items, generator=g).tolist())
        return self._perm[1]

    def next_batch(self) -> tuple[int, list[int]]:
        epoch = self.epoch
        start = self.position * self.batch_size
        indices = self.permutation(epoch)[start : start + self.batch_size]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return epoch, indices

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_items", "batch_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this run has {getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class TrainingRNG:
    """The run's own generator (latent sampling, noise, timesteps), checkpointed with the run.

    It lives on the CPU: draws are moved to the device, so the stream is the same on CPU, CUDA and MPS.
    The MPS global RNG is saved here too because accelerate does not save it.
    """

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(derived_seed(seed, "noise"))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": self.generator.get_state()}
        if torch.backends.mps.is_available():
            state["mps"] = torch.mps.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if "mps" in state and torch.backends.mps.is_available():
            torch.mps.set_rng_state(state["mps"])


# ----------------------------------------------------------------------------------------------
# data: cached latents or on-the-fly encoding, same interface
# ----------------------------------------------------------------------------------------------


class CachedSource:
    """Items from the latent cache, held in CPU memory; no VAE or text encoder needed."""

    def __init__(
        self, latents_dir: Path, train_dir: Path, base_fingerprint: str, resolution: int, device: torch.device
    ):
        ds = load_latent_dataset(
            latents_dir, train_dir, base_fingerprint=base_fingerprint, resolution=resolution
        )
        self.image_files, self.device = ds.image_files, device
        self.mean, self.std, self.text = ds.mean, ds.std, ds.text_embeddings

    def __len__(self) -> int:
        return len(self.image_files)

    def get(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.tensor(indices)
        return self.mean[idx].to(self.device), self.std[idx].to(self.device), self.text[idx].to(self.device)


class OnTheFlySource:
    """Encodes each micro-batch with the frozen VAE and text encoder (``training.cache_latents: false``)."""

    def __init__(self, components: Any, train_dir: Path, resolution: int, device: torch.device):
        entries = read_captions_json(train_dir / "captions.json")
        self.image_files = [e["image_file"] for e in entries]
        self.captions = [e["caption"] for e in entries]
        self.paths = [train_dir / "images" / f for f in self.image_files]
        self.components, self.resolution, self.device = components, resolution, device

    def __len__(self) -> int:
        return len(self.image_files)

    def get(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = torch.stack([load_image_tensor(self.paths[i], self.resolution) for i in indices])
        mean, std = encode_images(self.components.vae, pixels)
        text = encode_captions(
            self.components.tokenizer, self.components.text_encoder, [self.captions[i] for i in indices]
        )
        return mean, std, text


def dataset_fingerprint(train_dir: Path) -> str:
    """Content fingerprint of a train folder: captions.json bytes plus every listed image's sha256."""
    train_dir = Path(train_dir)
    h = hashlib.sha256((train_dir / "captions.json").read_bytes())
    for e in read_captions_json(train_dir / "captions.json"):
        h.update(
            e["image_file"].encode() + b"\0" + file_sha256(train_dir / "images" / e["image_file"]).encode()
        )
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# model setup and the loss
# ----------------------------------------------------------------------------------------------


WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


def setup_lora_unet(
    unet: torch.nn.Module, tcfg: Any, device: torch.device, mixed_precision: str
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
    unet.add_adapter(
        lora_config(tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_dropout, tcfg.lora_target_modules)
    )
    if mixed_precision in ("fp16", "bf16"):
        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"no LoRA parameters: lora_target_modules {tcfg.lora_target_modules} match no UNet layer"
        )
    return params


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    mean: torch.Tensor,
    std: torch.Tensor,
    text: torch.Tensor,
    scaling_factor: float,
    generator: torch.Generator,
    weight_dtype: torch.dtype,
) -> torch.Tensor:
    """One micro-batch of the denoising objective; the random draws come from ``generator`` in fixed order."""
    bsz = mean.shape[0]
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator).to(
        mean.device
    )

    latents = scaling_factor * (mean + std * eps)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:  # "v_prediction" (checked before training starts)
        target = noise_scheduler.get_velocity(latents, noise, timesteps)

    model_pred = unet(
        noisy_latents.to(weight_dtype),
        timesteps,
        encoder_hidden_states=text.to(weight_dtype),
        return_dict=False,
    )[0]
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


# ----------------------------------------------------------------------------------------------
# log files
# ----------------------------------------------------------------------------------------------


class RunLog:
    """``training_log_full.txt`` (appended across resumes) mirrored to the python logger.

    Each line is appended and closed at once: nothing is lost if the process is killed, and no file handle
    outlives an exception.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, line: str, level: int = logging.INFO) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        logger.log(level, line)


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, max_steps: int, sec_per_it: float, epoch: int, loss: float, lr: float) -> str:
    eta = format_eta((max_steps - step) * sec_per_it)
    return f"Steps: {step}/{max_steps} | {sec_per_it:.2f} s/it | ETA {eta} | epoch {epoch} | loss {loss:.4f} | lr {lr:.2e}"


def ema(values: list[float], decay: float = EMA_DECAY) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else decay * out[-1] + (1 - decay) * v)
    return out


def write_losses_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=LOSSES_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_losses_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [
            {
                "step": int(r["step"]),
                "epoch": int(r["epoch"]),
                "loss": float(r["loss"]),
                "lr": float(r["lr"]),
                "grad_norm": float(r["grad_norm"]),
                "seconds": float(r["seconds"]),
            }
            for r in csv.DictReader(f)
        ]


def plot_loss_curve(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Loss and its EMA against the optimizer step (matplotlib's Agg canvas; no pyplot global state)."""
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    ax.plot(steps, ema(losses), color="tab:blue", linewidth=2, label=f"EMA ({EMA_DECAY})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _tracker_config(cfg: Any) -> dict[str, Any]:
    # TensorBoard hparams accept only scalars and strings.
    flat = {}
    for k, v in cfg.training.model_dump(mode="json").items():
        flat[k] = v if isinstance(v, int | float | str | bool) else json.dumps(v)
    flat["resolution"] = cfg.dataset.resolution
    return flat


def recorded_training_config(cfg: Any) -> dict[str, Any]:
    """The settings written into each checkpoint, so a mismatch can name the key that changed."""
    return {
        **cfg.training.model_dump(mode="json", exclude={"output_dir"}),
        "resolution": cfg.dataset.resolution,
    }


def hash_relevant_differences(cfg: Any, old_config: dict[str, Any] | None) -> list[str]:
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
            reasons.append(
                f"training.{key}: {old!r} -> {new!r}"
                if key != "resolution"
                else f"dataset.resolution: {old!r} -> {new!r}"
            )
    return reasons


def _reset_accelerate_singletons() -> None:
    # accelerate keeps process-wide state (device, mixed precision, accumulation counter) in singletons and
    # refuses a second Accelerator with other settings; each train_lora call is a run of its own.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_header(
    cfg: Any,
    source: Any,
    sampler: EpochSampler,
    trainable: int,
    total: int,
    device: torch.device,
    device_info: Any,
    mixed_precision: str,
) -> list[str]:
    """The configuration block of training_log_full.txt (diffusers' "***** Running training *****" lines)."""
    tcfg = cfg.training
    k = tcfg.gradient_accumulation_steps
    return [
        f"Num examples = {len(source)}",
        f"Num Epochs = {math.ceil(tcfg.max_train_steps * k / sampler.batches_per_epoch)}",
        f"Instantaneous batch size per device = {tcfg.train_batch_size}",
        f"Total train batch size (w. accumulation) = {tcfg.train_batch_size * k}",
        f"Gradient Accumulation steps = {k}",
        f"Total optimization steps = {tcfg.max_train_steps}",
        f"Micro-batches per epoch = {sampler.batches_per_epoch}",
        f"Trainable params = {trainable:,} of {total:,} UNet params ({100 * trainable / total:.2f} %)",
        f"LoRA = rank {tcfg.lora_rank}, alpha {tcfg.lora_alpha}, dropout {tcfg.lora_dropout}, "
        f"targets {','.join(tcfg.lora_target_modules)}",
        f"Optimizer = AdamW lr {tcfg.learning_rate:g}, betas ({tcfg.adam_beta1}, {tcfg.adam_beta2}), "
        f"weight decay {tcfg.weight_decay:g}, grad clip {tcfg.gradient_clipping:g}; "
        f"{tcfg.lr_scheduler} schedule with {tcfg.lr_warmup_steps} warmup steps",
        f"Device = {device} ({device_info.name}); mixed precision {mixed_precision}; {device_info.dtype_policy}; "
        f"gradient checkpointing {tcfg.gradient_checkpointing}",
    ]


def checkpoint_state(
    current: dict[str, Any],
    tcfg: Any,
    sampler: EpochSampler,
    trainable: int,
    total: int,
    loss: float,
    smoothed: float | None,
) -> dict[str, Any]:
    """training_state.json: what resume compares (hashes, base model) and where the data stream stands."""
    return {
        **current,  # training_hash, training_config, dataset_fingerprint, base_model
        "epoch": sampler.epoch,  # 0-based epoch of the next micro-batch
        "position": sampler.position,  # its index within that epoch
        "micro_batches_per_epoch": sampler.batches_per_epoch,
        "max_train_steps": tcfg.max_train_steps,
        "lora": {
            "rank": tcfg.lora_rank,
            "alpha": tcfg.lora_alpha,
            "dropout": tcfg.lora_dropout,
            "target_modules": list(tcfg.lora_target_modules),
        },
        "trainable_params": trainable,
        "total_params": total,
        "loss": loss,
        "smoothed_loss": smoothed,
    }


# ----------------------------------------------------------------------------------------------
# the training run
# ----------------------------------------------------------------------------------------------


def train_lora(
    cfg: Any,
    components: Any,
    device_info: Any,
    *,
    train_dir: Path,
    latents_dir: Path | None,
    output_dir: Path,
    dataset_fingerprint: str,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_validation: Callable[[dict[str, Any]], None] | None = None,
    max_steps_this_run: int | None = None,
) -> TrainingResult:
    """Train (or resume, or skip) the LoRA described by ``cfg.training`` on ``train_dir``.

    ``components`` (SDComponents, freshly loaded) is taken over: the UNet gets the adapter, frozen modules
    are moved/cast. ``latents_dir`` is the latent cache (required when ``training.cache_latents``).
    ``max_steps_this_run`` stops after that many optimizer steps in this call (tests, benchmarks) without
    writing an extra checkpoint. Raises TrainingError on a non-finite loss (no checkpoint written).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    call_start = time.perf_counter()
    tcfg = cfg.training
    train_dir, output_dir = Path(train_dir), Path(output_dir)
    ckpt_root = output_dir / "checkpoints"
    output_dir.mkdir(parents=True, exist_ok=True)
    losses_csv = output_dir / "losses.csv"
    log = RunLog(output_dir / LOG_NAME)
    log.write(
        f"===== {datetime.now().isoformat(timespec='seconds')} train_lora start (pid {os.getpid()}) ====="
    )

    # ---- 1. where do we start: resume, skip or fresh -------------------------------------------
    for action in ckpt.clean_stale_tmp(ckpt_root):
        log.write(f"checkpoints: {action}")
    training_config = recorded_training_config(cfg)
    current = {
        "training_hash": cfg.training_hash(),
        "training_config": training_config,
        "dataset_fingerprint": dataset_fingerprint,
        "base_model": components.identity,
    }
    newest = ckpt.newest_checkpoint(ckpt_root)
    resume_from: ckpt.CheckpointInfo | None = None
    if newest is None:
        resume_note = f"fresh start: no checkpoint in {ckpt_root}"
    elif problems := ckpt.compatibility_problems(
        newest.state, current, explain=lambda old: hash_relevant_differences(cfg, old)
    ):
        moved = ckpt.supersede_checkpoints(
            ckpt_root,
            newest.state.get("training_hash"),
            extra=[
                losses_csv,
                output_dir / SUMMARY_NAME,
                output_dir / LOSS_CURVE_NAME,
                output_dir / "validation",
            ],
        )
        resume_note = (
            f"fresh start: newest checkpoint {newest.path.name} does not match this run: "
            + " | ".join(problems)
            + (f"; old checkpoints and outputs moved to {moved}" if moved else "")
        )
    else:
        resume_from = newest
        resume_note = f"resumed from {newest.path.name} (step {newest.step} of {tcfg.max_train_steps})"
    log.write(resume_note, logging.WARNING if resume_note.startswith("fresh start: newest") else logging.INFO)

    if resume_from is not None and resume_from.step >= tcfg.max_train_steps:
        log.write(
            f"nothing to do: {resume_from.path.name} is at max_train_steps={tcfg.max_train_steps}; skipped"
        )
        return _skipped_result(cfg, output_dir, resume_from, device_info, call_start)

    # ---- 2. accelerator --------------------------------------------------------------------------
    _reset_accelerate_singletons()
    accelerator = Accelerator(
        gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
        mixed_precision=device_info.mixed_precision,
        cpu=device_info.type == "cpu",
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        log_with="tensorboard",
    )
    device = accelerator.device
    mixed_precision = accelerator.mixed_precision  # the effective one, which is what the dtypes follow
    weight_dtype = WEIGHT_DTYPES[mixed_precision]
    if device.type != device_info.type:
        log.write(
            f"warning: accelerate chose {device}, device_info asked for {device_info.type}", logging.WARNING
        )
    accelerator.init_trackers(TRACKER_PROJECT, config=_tracker_config(cfg))

    try:
        # ---- 3. model: frozen base + LoRA ------------------------------------------------------
        if tcfg.deterministic:
            # Exact resume on CUDA needs deterministic kernels; cuBLAS reads this before its first handle.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # python/numpy/torch: makes the LoRA init (kaiming on lora_A) reproducible
        set_seed(tcfg.seed, deterministic=tcfg.deterministic)
        unet = components.unet
        lora_params = setup_lora_unet(unet, tcfg, device, mixed_precision)
        trainable, total = count_parameters(unet)
        if tcfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        noise_scheduler = components.noise_scheduler
        if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise TrainingError(
                f"unsupported prediction_type {noise_scheduler.config.prediction_type!r} of the base model"
            )
        # VAE/text encoder share the weight dtype (the validation pipeline passes tensors between them).
        for module in (components.vae, components.text_encoder):
            move_module(module, next(module.parameters()).device, weight_dtype)

        # ---- 4. data -----------------------------------------------------------------------------
        if tcfg.cache_latents:
            if latents_dir is None:
                raise TrainingError("training.cache_latents is on but no latents_dir was given")
            source: CachedSource | OnTheFlySource = CachedSource(
                latents_dir, train_dir, components.identity["fingerprint"], cfg.dataset.resolution, device
            )
            latent_info = f"cached in {latents_dir} ({len(source)} items); VAE/text encoder stay on the CPU"
        else:
            components.vae.to(device)
            components.text_encoder.to(device)
            source = OnTheFlySource(components, train_dir, cfg.dataset.resolution, device)
            latent_info = "encoded on the fly every step (training.cache_latents: false)"
        scaling_factor = float(components.vae.config.scaling_factor)
        k = tcfg.gradient_accumulation_steps
        sampler = EpochSampler(len(source), tcfg.train_batch_size, tcfg.seed)
        rng = TrainingRNG(tcfg.seed)
        validation_prompts = encode_validation_prompts(components, tcfg.validation_prompts, device)

        # ---- 5. optimizer and LR schedule (one scheduler step per optimizer step) ---------------
        optimizer = torch.optim.AdamW(
            lora_params,
            lr=tcfg.learning_rate,
            betas=(tcfg.adam_beta1, tcfg.adam_beta2),
            weight_decay=tcfg.weight_decay,
            eps=tcfg.adam_epsilon,
        )
        lr_scheduler = get_scheduler(
            tcfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=tcfg.lr_warmup_steps,
            num_training_steps=tcfg.max_train_steps,
        )
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        ckpt.register_lora_hooks(accelerator, accelerator.unwrap_model(unet))
        accelerator.register_for_checkpointing(sampler)  # -> custom_checkpoint_0.pkl
        accelerator.register_for_checkpointing(rng)  # -> custom_checkpoint_1.pkl

        # ---- 6. resume ---------------------------------------------------------------------------
        global_step = 0
        losses: list[dict[str, Any]] = []
        if resume_from is not None:
            ckpt.load_checkpoint(accelerator, resume_from)
            global_step = resume_from.step
            losses = read_losses_csv(resume_from.path / ckpt.LOSSES_NAME)
        # losses.csv = the checkpoint's rows (drops rows of an interrupted tail) and grows one row per step.
        write_losses_csv(losses_csv, losses)

        header = run_header(cfg, source, sampler, trainable, total, device, device_info, mixed_precision)
        ident = components.identity
        header += [
            f"Base model = {ident.get('base_model')} (revision {ident.get('revision')}, "
            f"fingerprint {str(ident.get('fingerprint'))[:12]})",
            f"Prediction type = {noise_scheduler.config.prediction_type}",
            f"Latents = {latent_info}",
            "Resumed from = "
            + (
                f"{resume_from.path.name} (continuing epoch {sampler.epoch + 1} at micro-batch {sampler.position})"
                if resume_from
                else "none"
            ),
        ]
        log.write("***** Running training *****")
        for line in header:
            log.write("  " + line)

        # ---- 7. the loop ---------------------------------------------------------------------------
        unet.train()
        steps_this_run = 0
        step_seconds: list[float] = []
        recent = deque(maxlen=20)  # wall time between step ends (includes checkpoints): for s/it and ETA
        last_end = time.perf_counter()
        latest_grid: Path | None = None
        smoothed = ema([r["loss"] for r in losses])[-1] if losses else None
        while global_step < tcfg.max_train_steps:
            if max_steps_this_run is not None and steps_this_run >= max_steps_this_run:
                log.write(f"stopping after {steps_this_run} steps in this call (max_steps_this_run)")
                break
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step will use

            # k micro-batches; accelerate only syncs (and lets the optimizer step) on the k-th.
            micro_losses = []
            for micro in range(k):
                epoch, indices = sampler.next_batch()
                with accelerator.accumulate(unet):
                    mean, std, text = source.get(indices)
                    loss = diffusion_loss(
                        unet, noise_scheduler, mean, std, text, scaling_factor, rng.generator, weight_dtype
                    )
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        files = [source.image_files[i] for i in indices]
                        raise TrainingError(
                            f"non-finite loss ({loss_value}) at optimizer step {global_step + 1}, micro-batch "
                            f"{micro + 1}/{k} (epoch {epoch + 1}), images {files}; no checkpoint written, "
                            f"newest good checkpoint: {_newest_name(ckpt_root)}"
                        )
                    accelerator.backward(loss)  # divides by k: the step's gradient is the micro-batch mean
                micro_losses.append(loss_value)
            if not accelerator.sync_gradients:
                raise RuntimeError("internal error: gradient accumulation out of step with the sampler")
            # Clip the LoRA gradients (a list, not a spent iterator); the returned norm is the pre-clip one.
            grad_norm = float(accelerator.clip_grad_norm_(lora_params, tcfg.gradient_clipping))
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            global_step += 1
            steps_this_run += 1
            seconds = time.perf_counter() - t0
            step_seconds.append(seconds)
            row = {
                "step": global_step,
                "epoch": epoch + 1,
                "loss": sum(micro_losses) / k,
                "lr": lr,
                "grad_norm": grad_norm,
                "seconds": seconds,
            }
            losses.append(row)
            smoothed = (
                row["loss"] if smoothed is None else EMA_DECAY * smoothed + (1 - EMA_DECAY) * row["loss"]
            )
            _append_losses_row(losses_csv, row)
            accelerator.log(
                {"loss": row["loss"], "lr": lr, "grad_norm": grad_norm, "epoch": epoch + 1}, step=global_step
            )

            now = time.perf_counter()
            recent.append(now - last_end)
            last_end = now
            sec_per_it = sum(recent) / len(recent)
            line = progress_line(global_step, tcfg.max_train_steps, sec_per_it, epoch + 1, row["loss"], lr)
            log.write(line, logging.DEBUG)
            is_last = global_step == tcfg.max_train_steps
            if on_progress is not None and (global_step % tcfg.log_every_steps == 0 or is_last):
                on_progress(
                    {
                        **row,
                        "max_steps": tcfg.max_train_steps,
                        "smoothed_loss": smoothed,
                        "seconds_per_step": sec_per_it,
                        "eta_seconds": (tcfg.max_train_steps - global_step) * sec_per_it,
                        "line": line,
                    }
                )

            if global_step % tcfg.checkpointing_steps == 0 or is_last:
                state = checkpoint_state(current, tcfg, sampler, trainable, total, row["loss"], smoothed)
                rows_now = list(losses)
                path = ckpt.save_checkpoint(
                    accelerator,
                    ckpt_root,
                    global_step,
                    state,
                    write_extra=lambda d, rows=rows_now: write_losses_csv(d / ckpt.LOSSES_NAME, rows),
                )
                removed = ckpt.rotate_checkpoints(ckpt_root, tcfg.checkpoints_total_limit)
                log.write(
                    f"saved {path.name}"
                    + (f"; removed {', '.join(p.name for p in removed)}" if removed else "")
                )

            if global_step % tcfg.validation_steps == 0 or is_last:
                shown = run_validation(
                    accelerator.unwrap_model(unet),
                    components,
                    validation_prompts,
                    out_dir=output_dir / "validation",
                    step=global_step,
                    epoch=epoch + 1,
                    seed=tcfg.seed,
                    num_images=tcfg.num_validation_images,
                    num_inference_steps=tcfg.validation_inference_steps,
                    guidance_scale=tcfg.validation_guidance_scale,
                    resolution=cfg.dataset.resolution,
                    device=device,
                )
                latest_grid = shown.grid_path
                log.write(f"validation at step {global_step}: {shown.grid_path.name} ({shown.seconds:.1f} s)")
                if on_validation is not None:
                    on_validation(shown.as_callback_dict())

        # ---- 8. wrap up ------------------------------------------------------------------------------
        curve = plot_loss_curve(losses, output_dir / LOSS_CURVE_NAME)
        measured = sum(step_seconds)
        images = steps_this_run * tcfg.train_batch_size * k
        newest_now = ckpt.newest_checkpoint(ckpt_root)
        result = TrainingResult(
            global_step=global_step,
            max_train_steps=tcfg.max_train_steps,
            trainable_params=trainable,
            total_params=total,
            final_loss=losses[-1]["loss"] if losses else None,
            smoothed_loss=smoothed,
            wall_time_s=time.perf_counter() - call_start,
            seconds_per_step=measured / steps_this_run if steps_this_run else None,
            images_per_second=images / measured if measured > 0 else None,
            peak_memory_mb=peak_memory_mb(device),
            device=str(device),
            resumed_from=resume_from.step if resume_from else None,
            skipped=False,
            checkpoint_dir=newest_now.path if newest_now else None,
            log_path=log.path,
            loss_curve_png=curve,
            latest_grid=latest_grid or _latest_grid(output_dir),
            losses=losses,
            resume_note=resume_note,
            steps_this_run=steps_this_run,
            output_dir=output_dir,
            losses_csv=losses_csv,
        )
        atomic_write_json(output_dir / SUMMARY_NAME, result.summary(), default=str)
        log.write(
            f"done: step {global_step}/{tcfg.max_train_steps}, loss {result.final_loss}, "
            f"{result.seconds_per_step or 0:.2f} s/step, peak memory {result.peak_memory_mb or 0:.0f} MB"
        )
        return result
    except BaseException as exc:
        # KeyboardInterrupt (Dagster termination) included: record it, then let it propagate unchanged.
        log.write(
            f"stopped: {type(exc).__name__}: {exc} (newest checkpoint: {_newest_name(ckpt_root)})",
            logging.ERROR,
        )
        raise
    finally:
        accelerator.end_training()


def _append_losses_row(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=LOSSES_COLUMNS).writerow(row)


def _newest_name(root: Path) -> str:
    newest = ckpt.newest_checkpoint(root)
    return newest.path.name if newest else "none"


def _latest_grid(output_dir: Path) -> Path | None:
    grids = sorted((output_dir / "validation").glob("grid_step*.png"))
    return grids[-1] if grids else None


def _skipped_result(
    cfg: Any, output_dir: Path, newest: ckpt.CheckpointInfo, device_info: Any, call_start: float
) -> TrainingResult:
    """The run is already complete: report it from disk (summary, losses), re-creating what is missing."""
    losses = read_losses_csv(newest.path / ckpt.LOSSES_NAME)
    losses_csv = output_dir / "losses.csv"
    if not losses_csv.is_file():
        write_losses_csv(losses_csv, losses)
    curve = output_dir / LOSS_CURVE_NAME
    if not curve.is_file():
        plot_loss_curve(losses, curve)
    previous: dict[str, Any] = {}
    summary_path = output_dir / SUMMARY_NAME
    if summary_path.is_file():
        try:
            previous = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = {}
    smoothed = ema([r["loss"] for r in losses])
    result = TrainingResult(
        global_step=newest.step,
        max_train_steps=cfg.training.max_train_steps,
        trainable_params=int(newest.state.get("trainable_params", previous.get("trainable_params", 0))),
        total_params=int(newest.state.get("total_params", previous.get("total_params", 0))),
        final_loss=losses[-1]["loss"] if losses else None,
        smoothed_loss=smoothed[-1] if smoothed else None,
        wall_time_s=time.perf_counter() - call_start,
        seconds_per_step=previous.get("seconds_per_step"),
        images_per_second=previous.get("images_per_second"),
        peak_memory_mb=previous.get("peak_memory_mb"),
        device=previous.get("device", device_info.type),
        resumed_from=newest.step,
        skipped=True,
        checkpoint_dir=newest.path,
        log_path=output_dir / LOG_NAME,
        loss_curve_png=curve if curve.is_file() else None,
        latest_grid=_latest_grid(output_dir),
        losses=losses,
        resume_note=f"skipped: {newest.path.name} is already at max_train_steps={cfg.training.max_train_steps}",
        steps_this_run=0,
        output_dir=output_dir,
        losses_csv=losses_csv,
    )
    if not summary_path.is_file():
        atomic_write_json(summary_path, result.summary(), default=str)
    return result
