"""What a training call returns (:class:`TrainingResult`) and how it is built after the loop or from disk
when the run is already complete; the error type of the training core."""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shoe_lora_pipeline.core import checkpoints as ckpt
from shoe_lora_pipeline.core import run_artifacts as files
from shoe_lora_pipeline.core import train_speed as speed
from shoe_lora_pipeline.core.fsutil import atomic_write_json

if TYPE_CHECKING:
    from shoe_lora_pipeline.core.config import PipelineConfig
    from shoe_lora_pipeline.core.device import DeviceInfo
    from shoe_lora_pipeline.core.training.history import History
    from shoe_lora_pipeline.core.training.start import Run


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


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


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
