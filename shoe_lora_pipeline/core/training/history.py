"""The run's numbers and checkpoints inside the loop: settling the device-side losses of pending steps (the
non-finite check), losses.csv / TensorBoard / progress reports, the loss EMA and validation rows
(:class:`History`), and what each checkpoint records and how it is saved and rotated."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shoe_lora_pipeline.core import checkpoints as ckpt
from shoe_lora_pipeline.core import run_artifacts as files
from shoe_lora_pipeline.core import train_speed as speed
from shoe_lora_pipeline.core.distributed import Ranks
from shoe_lora_pipeline.core.train_data import (
    MicroBatch,
    Source,
)
from shoe_lora_pipeline.core.training.result import TrainingError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from shoe_lora_pipeline.core.config import PipelineConfig, TrainingConfig
    from shoe_lora_pipeline.core.training.start import Run


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


def newest_checkpoint_name(root: Path) -> str:
    newest = ckpt.newest_checkpoint(root)
    return newest.path.name if newest else "none"
