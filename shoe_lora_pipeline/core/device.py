"""Device choice: MPS, then CUDA, then CPU, and the dtype policy that goes with it.

The reference recipe trains in fp32 on Apple MPS (fp16 training on MPS is unreliable); on CUDA the frozen
weights may be fp16/bf16 when ``mixed_precision`` asks, while the LoRA parameters always stay fp32.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from typing import Any

import torch


class DeviceError(RuntimeError):
    """The requested device is not available on this machine."""


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "mps" | "cuda" | "cpu"
    name: str  # human name, e.g. "NVIDIA H100 80GB HBM3" or "Apple MPS" or the CPU model
    mixed_precision: str  # what training actually uses: "no" | "fp16" | "bf16"
    dtype_policy: str  # one line a person can read in the Dagster UI
    requested: str
    requested_mixed_precision: str

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type)

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the frozen base weights (LoRA parameters are always fp32)."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.mixed_precision, torch.float32)

    def as_metadata(self) -> dict[str, Any]:
        return asdict(self)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def choose_device(
    preference: str = "auto",
    mixed_precision: str = "no",
    *,
    mps_available: bool | None = None,
    cuda_available: bool | None = None,
) -> DeviceInfo:
    """Pick the training device. ``auto`` prefers MPS, then CUDA, then CPU.

    Availability can be injected (tests patch it); by default it is read from torch.
    """
    if preference not in {"auto", "mps", "cuda", "cpu"}:
        raise DeviceError(f"device = {preference!r}: expected one of auto, mps, cuda, cpu")
    if mixed_precision not in {"no", "fp16", "bf16"}:
        raise DeviceError(f"training.mixed_precision = {mixed_precision!r}: expected no, fp16 or bf16")
    mps = _mps_available() if mps_available is None else mps_available
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available

    if preference == "auto":
        kind = "mps" if mps else "cuda" if cuda else "cpu"
    else:
        kind = preference
        if kind == "mps" and not mps:
            raise DeviceError("device = 'mps' but MPS is not available here (needs Apple silicon + macOS)")
        if kind == "cuda" and not cuda:
            raise DeviceError(
                "device = 'cuda' but no CUDA GPU is visible (torch.cuda.is_available() is False)"
            )

    if kind == "cuda":
        name = torch.cuda.get_device_name(0) if cuda_available is None else "CUDA GPU"
        effective = mixed_precision
        if effective == "no":
            policy = "fp32 weights and LoRA parameters"
        else:
            policy = f"{effective} frozen weights and autocast; LoRA parameters and optimizer state fp32"
    elif kind == "mps":
        name = "Apple MPS"
        effective = "no"
        policy = "fp32 everywhere (recipe: fp32 on MPS)"
        if mixed_precision != "no":
            policy += f"; mixed_precision={mixed_precision} ignored on MPS"
    else:
        name = _cpu_name()
        effective = "no"
        policy = "fp32 everywhere (CPU)"
        if mixed_precision != "no":
            policy += f"; mixed_precision={mixed_precision} applies on CUDA only"
    return DeviceInfo(
        type=kind,
        name=name,
        mixed_precision=effective,
        dtype_policy=policy,
        requested=preference,
        requested_mixed_precision=mixed_precision,
    )
