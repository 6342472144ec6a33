"""The LoRA training loop (the ``lora_training`` stage core).

Read :func:`train_lora` top to bottom: where the run starts, the loop (micro-batches, backward,
clip, step, the ``% N`` triggers for the log, checkpoints and validation), the result. Everything it calls
is a small piece with one job, each in a room of its own: the objective in ``objective.py``, the run's start
decision, preparation and resume in ``start.py``, checkpoints and the run's numbers in ``history.py``, the
result in ``result.py``; below them the checkpoint folders in ``core/checkpoints.py``, what each sample
sees in ``core/train_data.py``, the throughput levers in ``core/train_speed.py``, the log files in
``core/run_artifacts.py``.

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
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shoe_lora_pipeline.core import checkpoints as ckpt
from shoe_lora_pipeline.core import run_artifacts as files
from shoe_lora_pipeline.core import train_speed as speed
from shoe_lora_pipeline.core.distributed import Ranks
from shoe_lora_pipeline.core.training.history import (
    History,
    PendingStep,
    checkpoint_state,
    newest_checkpoint_name,
    progress_report,
    rank_log,
    record_steps,
    save_and_rotate,
    settle,
)
from shoe_lora_pipeline.core.training.objective import diffusion_loss, validation_loss
from shoe_lora_pipeline.core.training.result import TrainingResult, build_result, skipped_result
from shoe_lora_pipeline.core.training.start import (
    Run,
    decide_start,
    make_accelerator,
    prepare_run,
    restore,
    run_header,
)
from shoe_lora_pipeline.core.validation import (
    ValidationResult,
    run_validation,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from shoe_lora_pipeline.core.config import PipelineConfig
    from shoe_lora_pipeline.core.device import DeviceInfo
    from shoe_lora_pipeline.core.models import SDComponents


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
        if (
            main
        ):  # before the first step: a disk that cannot hold the checkpoints refuses now, not at step 2500
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
                        run.weight_dtype, tcfg.snr_gamma, run.channels_last, run.empty_pooled,
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
            rows = settle(pending, clock, run.source, lambda: newest_checkpoint_name(ckpt_root), ranks)
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
            f"stopped: {type(exc).__name__}: {exc} (newest checkpoint: {newest_checkpoint_name(ckpt_root)})",
            logging.ERROR,
        )
        raise
    finally:
        accelerator.end_training()
