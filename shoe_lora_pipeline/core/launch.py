"""How a training run starts outside the Dagster step process: the entry point's command line, ``accelerate
launch`` around it for several processes, and the Kubernetes pod that runs it.

Pure functions (no Dagster, no Kubernetes client), so the commands and the pod spec are unit-tested here;
``assets/lora_training.py`` hands them to Dagster Pipes (``PipesSubprocessClient``, ``PipesK8sClient``).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shoe_lora_pipeline.core.config import ConfigError, PipelineConfig

TRAIN_MODULE = "shoe_lora_pipeline.train"
ACCELERATE_MODULE = "shoe_lora_pipeline.accelerate_launch"
GPU_RESOURCE = "nvidia.com/gpu"
DATA_VOLUME = "training-data"
SHM_VOLUME = "dshm"


@dataclass(frozen=True)
class TrainArgs:
    """The arguments of ``python -m shoe_lora_pipeline.train`` (the same in every launcher)."""

    config: str  # the YAML file
    category: str
    overrides: tuple[str, ...] = ()  # dotted ``key=value`` on top of the file
    device: str = ""  # empty: the config's ``device``
    base_model_cache: str = ""  # empty: ~/.cache/shoe_lora_pipeline (where tiny-sd is built)

    def argv(self) -> list[str]:
        out = ["--config", self.config, "--category", self.category]
        for item in self.overrides:
            out += ["--override", item]
        if self.device:
            out += ["--device", self.device]
        if self.base_model_cache:
            out += ["--base-model-cache", self.base_model_cache]
        return out


def resolve_num_processes(setting: int | Literal["auto"], device_type: str, visible_gpus: int) -> int:
    """``training.num_processes`` as a number: ``auto`` is one process per visible GPU (1 without CUDA)."""
    if setting == "auto":
        return max(1, visible_gpus) if device_type == "cuda" else 1
    return setting


def accelerate_command(
    num_processes: int, args: TrainArgs, *, python: str = sys.executable, module: str = TRAIN_MODULE
) -> list[str]:
    """The command that trains with ``num_processes`` data-parallel processes.

    One process needs no launcher: the entry point itself. Several: ``accelerate launch`` (torchrun) on the
    entry point, through :mod:`shoe_lora_pipeline.accelerate_launch` (which ends with its parent). It uses
    ``--multi_gpu`` on the CPU too: accelerate's CPU launcher starts a single process unless MPI is set up,
    while torchrun's processes pick the gloo backend themselves when the device is the CPU. A free port for
    the rendezvous, so runs of several categories on one machine do not collide.
    """
    if num_processes <= 1:
        return [python, "-m", module, *args.argv()]
    return [
        python, "-m", ACCELERATE_MODULE,
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no",  # the entry point's Accelerator sets it from the config and the device
        "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", module, *args.argv(),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Kubernetes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodRequest:
    """What ``dagster_k8s.PipesK8sClient.run`` takes (its ``image``, ``command``, ``namespace``, ``env``,
    ``base_pod_spec``, ``base_pod_meta`` arguments)."""

    image: str
    command: list[str]
    namespace: str | None
    env: dict[str, str]
    base_pod_spec: dict[str, Any]
    base_pod_meta: dict[str, Any] = field(default_factory=dict)


def _label(value: str) -> str:
    # Label values: at most 63 of [A-Za-z0-9-_.], starting and ending alphanumeric.
    return re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:63].strip("-_.") or "none"


def data_mount_path(cfg: PipelineConfig) -> Path:
    """Where the data volume is mounted: ``training.k8s.mount_path``, or the folder that holds both
    ``dataset.output_dir`` and ``training.output_dir`` (the pod sees the data at the paths the config names)."""
    outputs = [Path(cfg.dataset.output_dir), Path(cfg.training.output_dir)]
    mount = cfg.training.k8s.mount_path or Path(os.path.commonpath([str(p) for p in outputs]))
    if mount == Path(mount.anchor):
        raise ConfigError(
            f"dataset.output_dir {outputs[0]} and training.output_dir {outputs[1]} share no folder but the root: "
            "set training.k8s.mount_path"
        )
    for name, path in (("dataset.output_dir", outputs[0]), ("training.output_dir", outputs[1])):
        if not path.is_relative_to(mount):
            raise ConfigError(f"{name} {path} is not inside training.k8s.mount_path {mount}")
    return mount


def k8s_pod(cfg: PipelineConfig, args: TrainArgs, num_processes: int) -> PodRequest:
    """The pod that runs the entry point with ``num_processes`` processes: one GPU each (``nvidia.com/gpu``
    limit) unless the config's device is the CPU; the data volume at :func:`data_mount_path`; a RAM-backed
    /dev/shm (the container default of 64 MB is too small for NCCL between several GPUs); node selector,
    tolerations and service account from ``training.k8s``."""
    k8s = cfg.training.k8s
    if not k8s.image or not k8s.volume_claim:
        raise ConfigError("training.launcher k8s needs training.k8s.image and training.k8s.volume_claim")
    gpus = 0 if cfg.device == "cpu" else num_processes
    container: dict[str, Any] = {
        "volumeMounts": [
            {"name": DATA_VOLUME, "mountPath": str(data_mount_path(cfg))},
            {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        ],
    }
    if gpus:
        container["resources"] = {"limits": {GPU_RESOURCE: str(gpus)}}  # a Kubernetes quantity
    spec: dict[str, Any] = {
        "containers": [container],
        "restartPolicy": "Never",  # a failed training is retried by Dagster (resume), not by the kubelet
        "volumes": [
            {"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": k8s.volume_claim}},
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
        ],
    }
    if k8s.node_selector:
        spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        spec["tolerations"] = [dict(t) for t in k8s.tolerations]
    if k8s.service_account:
        spec["serviceAccountName"] = k8s.service_account
    return PodRequest(
        image=k8s.image,
        command=accelerate_command(num_processes, args, python="python"),
        namespace=k8s.namespace,
        env={"PYTHONUNBUFFERED": "1", **k8s.env},
        base_pod_spec=spec,
        base_pod_meta={
            "labels": {
                "app.kubernetes.io/name": "shoe-lora-pipeline",
                "app.kubernetes.io/component": "lora-training",
                "shoe-lora/category": _label(args.category),
            }
        },
    )
