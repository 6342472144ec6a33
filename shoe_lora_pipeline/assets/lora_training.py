"""lora_training: the LoRA training loop with checkpoints, exact resume, validation images and a log.

Where it trains is ``training.launcher``: in this step process (``inprocess``), in a child process through
Dagster Pipes, data-parallel over ``training.num_processes`` with ``accelerate launch`` (``accelerate``), or
in a Kubernetes pod through dagster-k8s Pipes (``k8s``). All three run :func:`train.train_category` and
report the same metadata (:func:`training_metadata`).
"""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import contextlib
import dataclasses
import shlex
from collections.abc import Mapping
from typing import TYPE_CHECKING

import dagster as dg

from shoe_lora_pipeline.assets._category import category_config, device_for
from shoe_lora_pipeline.assets._metadata import MetadataDict, config_metadata, rounded, thumbnail_md
from shoe_lora_pipeline.core.config import PipelineConfig
from shoe_lora_pipeline.core.display import UI_IMAGE_SIDE
from shoe_lora_pipeline.core.gpu_slots import lease_gpus, visible_gpus
from shoe_lora_pipeline.core.launch import TrainArgs, accelerate_command, k8s_pod, resolve_num_processes
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource

if TYPE_CHECKING:  # torch-heavy: the data steps load this module too and must not pay for torch
    from shoe_lora_pipeline.core.device import DeviceInfo
    from shoe_lora_pipeline.core.training import TrainingResult

GPU_POOL = "gpu"  # training, latent encoding and evaluation own the accelerator


@dg.asset(
    group_name="training",
    deps=["training_latents"],
    kinds={"pytorch"},
    pool=GPU_POOL,
    code_version="1",
    description="Trains the LoRA (peft on the UNet's to_k/to_q/to_v/to_out.0). Checkpoints every "
    "checkpointing_steps, written atomically; re-materialising resumes from the newest compatible "
    "checkpoint mid-epoch, or skips when training is already complete. training.launcher: inprocess "
    "(this step), accelerate (a child process per GPU, Dagster Pipes) or k8s (a pod).",
)
def lora_training(
    context: dg.AssetExecutionContext,
    pipeline_config: PipelineConfigResource,
    device: DeviceResource,
    base_model: BaseModelResource,
) -> dg.MaterializeResult:
    cfg, _ = category_config(context, pipeline_config)
    if note := gpu_pool_note(context.instance, cfg.automation.gpu_slots):
        context.log.warning(note)
    launcher = cfg.training.launcher
    if launcher == "inprocess":
        from shoe_lora_pipeline.train import train_category  # torch: loaded by this step only

        device_info = device_for(context, device, cfg)
        context.log.info(f"device: {device_info.type} ({device_info.name}); {device_info.dtype_policy}")
        components = base_model.load(cfg, device_info)
        # The training log's INFO lines (where the run starts, checkpoints, validation) reach the run log
        # live, and one progress line every log_every_steps (no tqdm in the run log: it floods the UI).
        result = train_category(
            cfg,
            device_info,
            components,
            echo=context.log.info,
            on_progress=lambda p: context.log.info(p["line"]),
        )
        return dg.MaterializeResult(metadata=training_metadata(cfg, device_info, components.identity, result))

    # The child trains the same category of the same config file (absolute path), with the same overrides.
    args = TrainArgs(
        config=str(cfg.source_path),
        category=cfg.dataset.name,
        overrides=tuple(pipeline_config.overrides),
        device=device.device,
        base_model_cache=base_model.cache_dir,
    )
    if launcher == "accelerate":
        return train_with_accelerate(context, cfg, device.resolve(cfg), args, device.gpu_lock_dir)
    return train_in_pod(context, cfg, args)


def gpu_pool_note(instance: dg.DagsterInstance, slots: int) -> str | None:
    """A warning when the instance's limit of the ``gpu`` pool is not ``automation.gpu_slots``. A pool's limit
    lives in the Dagster instance (its database), not in a code location, so the config cannot set it; this
    says which command does."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return None
    limit = storage.get_concurrency_info(GPU_POOL).limit
    if limit == slots:
        return None
    return (
        f"the Dagster instance runs {limit if limit is not None else 'unlimited'} step(s) of the "
        f"'{GPU_POOL}' pool at once, automation.gpu_slots is {slots}: run `dagster instance concurrency set "
        f"{GPU_POOL} {slots}` (a pool's limit is instance state, which a code location cannot set)"
    )


def train_with_accelerate(
    context: dg.AssetExecutionContext,
    cfg: PipelineConfig,
    device_info: "DeviceInfo",
    args: TrainArgs,
    gpu_lock_dir: str = "",
) -> dg.MaterializeResult:
    """The entry point in a child process (``accelerate launch`` for several), pinned to free GPUs."""
    gpus = visible_gpus() if device_info.type == "cuda" else []
    n = resolve_num_processes(cfg.training.num_processes, device_info.type, len(gpus))
    command = accelerate_command(n, args)
    env: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if device_info.type == "cuda":
            holder = f"run {context.run.run_id[:8]} {context.asset_key.to_user_string()}"
            lease = stack.enter_context(lease_gpus(n, gpus, gpu_lock_dir or None, holder))
            env["CUDA_VISIBLE_DEVICES"] = lease.cuda_visible_devices
            context.log.info(f"GPU(s) {lease.cuda_visible_devices} for this training")
        context.log.info(f"{n} training process(es): {shlex.join(command)}")
        # Cancelling the run sends SIGINT to the child: every rank stops before the same step (the last
        # complete checkpoint stays); a SIGKILL of this process ends the child too (it dies with its parent).
        client = dg.PipesSubprocessClient(env=env)
        return client.run(context=context, command=command).get_materialize_result()


def train_in_pod(
    context: dg.AssetExecutionContext, cfg: PipelineConfig, args: TrainArgs
) -> dg.MaterializeResult:
    """The entry point in a Kubernetes pod (``core/launch.k8s_pod``), through dagster-k8s Pipes."""
    try:
        from dagster_k8s import PipesK8sClient
    except ImportError:
        raise dg.Failure(
            "training.launcher k8s needs dagster-k8s: pip install 'shoe_lora_pipeline[k8s]'"
        ) from None
    k8s = cfg.training.k8s
    n = resolve_num_processes(cfg.training.num_processes, "cuda", 0)
    pod = k8s_pod(cfg, dataclasses.replace(args, config=k8s.config_path or args.config), n)
    context.log.info(
        f"pod in namespace {pod.namespace or '(current)'}, image {pod.image}: {shlex.join(pod.command)}"
    )
    return (
        PipesK8sClient()
        .run(
            context=context,
            image=pod.image,
            command=pod.command,
            namespace=pod.namespace,
            env=pod.env,
            base_pod_spec=pod.base_pod_spec,
            base_pod_meta=pod.base_pod_meta,
        )
        .get_materialize_result()
    )


def training_metadata(
    cfg: PipelineConfig,
    device_info: "DeviceInfo",
    base_model: Mapping[str, str | None],
    result: "TrainingResult",
) -> MetadataDict:
    """The materialisation's metadata, the same from every launcher (the Pipes child reports this too)."""
    metadata = {
        **config_metadata(cfg, device_info, base_model),
        # The base model's family as training resolved it (core/families.py; SD1.5 identities name none).
        "model_family": base_model.get("family") or "sd15",
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "global_step": result.global_step,
        "max_train_steps": result.max_train_steps,
        "steps_this_run": result.steps_this_run,
        "skipped_already_complete": result.skipped,
        # A fresh start has no step to name: the entry is left out and `started` says so.
        "started": (
            "already complete: skipped"
            if result.skipped
            else "fresh start"
            if result.resumed_from is None
            else f"resumed from step {result.resumed_from}"
        ),
        "resumed_from_step": result.resumed_from,
        "resume_note": result.resume_note,
        # The last optimizer step's loss, and its EMA: the one the evaluation checklist compares.
        "final_loss": result.final_loss,
        "smoothed_loss": result.smoothed_loss,
        "wall_time_s": round(result.wall_time_s, 1),
        "seconds_per_step": result.seconds_per_step,
        "images_per_second": result.images_per_second,
        "tflops_per_second": result.tflops_per_second,
        "mfu": result.mfu,
        "mfu_peak": result.mfu_peak,
        "unet_gflops_per_image": result.flops_per_image / 1e9 if result.flops_per_image else None,
        "micro_batch_size": result.micro_batch_size,
        "accumulation_steps": result.accumulation_steps,
        "num_processes": result.num_processes,
        "launcher": cfg.training.launcher,
        "gradient_checkpointing": result.gradient_checkpointing,
        "val_loss": result.val_loss,
        "best_val_step": result.best_val_step,
        "peak_memory_mb": result.peak_memory_mb,
        "checkpoint_dir": dg.MetadataValue.path(str(result.checkpoint_dir)),
        "training_log": dg.MetadataValue.path(str(result.log_path)),
    }
    if result.loss_curve_png:
        metadata["loss_curve"] = dg.MetadataValue.md(
            thumbnail_md(result.loss_curve_png, "loss curve", UI_IMAGE_SIDE)
        )
    if result.latest_grid:
        metadata["validation_grid"] = dg.MetadataValue.md(
            thumbnail_md(result.latest_grid, "validation grid", UI_IMAGE_SIDE)
        )
        metadata["validation_grid_path"] = dg.MetadataValue.path(str(result.latest_grid))
    # Dagster's metadata floats must be real numbers; drop what a skipped run could not measure. Floats are
    # rounded for the page (training_summary.json and losses.csv keep full precision).
    return rounded({k: v for k, v in metadata.items() if v is not None})
