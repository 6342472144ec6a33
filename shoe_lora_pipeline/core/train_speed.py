"""Throughput levers of the training step and how fast it really runs.

* :func:`training_flops_per_image` counts the UNet's FLOPs of one LoRA training sample (forward + backward,
  frozen base) with ``torch.utils.flop_counter`` on the meta device: no memory, no weights, any config.
* :func:`device_peak_tflops` / :func:`mfu` put images/s against the device's dense peak (vendor datasheets).
* :func:`choose_micro_batch` probes the largest micro-batch (and whether gradient checkpointing is needed)
  that fits the device's memory, once per run.
* :func:`apply_fast_path` turns on the CUDA levers the config asks for (TF32, SDPA, channels_last,
  regional ``torch.compile``) and says what it did.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from shoe_lora_pipeline.core.config import SpeedConfig

# Dense (no sparsity) peak TFLOP/s by precision, from the vendors' datasheets. "tf32" is the fp32 matmul
# rate on tensor cores (PyTorch's allow_tf32); "fp32" the plain CUDA-core rate. Keys are matched against
# torch.cuda.get_device_name() in this order (the first match wins).
DEVICE_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"h100.*pcie", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"h200|h100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"a100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bl4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"4090", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
]


def peak_precision(mixed_precision: str, tf32: bool) -> str:
    """Which peak a step is measured against: bf16/fp16 autocast → "bf16"; fp32 → "tf32" when TF32
    matmuls are allowed, else "fp32"."""
    if mixed_precision in ("bf16", "fp16"):
        return "bf16"
    return "tf32" if tf32 else "fp32"


def device_peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's dense peak for this device and precision; None for a device not in the table."""
    name = device_name.lower()
    for pattern, peaks in DEVICE_PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks.get(precision)
    return None


@dataclass
class Throughput:
    images_per_second: float
    tflops_per_second: float | None
    mfu: float | None  # fraction of the device's peak; None when the device is not in the table
    peak_tflops: float | None
    peak_precision: str

    def as_metadata(self) -> dict[str, float | str]:
        out: dict[str, float | str] = {"images_per_second": round(self.images_per_second, 3)}
        if self.tflops_per_second is not None:
            out["tflops_per_second"] = round(self.tflops_per_second, 3)
        if self.mfu is not None:
            out["mfu"] = round(self.mfu, 4)
            out["mfu_peak"] = f"{self.peak_tflops:g} TFLOP/s {self.peak_precision}"
        return out

    def describe(self) -> str:
        text = f"{self.images_per_second:.2f} img/s"
        if self.tflops_per_second is not None:
            rate = self.tflops_per_second
            # a small model on a CPU runs at GFLOP/s: "0.0 TFLOP/s" would say nothing
            text += f", {rate:.1f} TFLOP/s" if rate >= 1 else f", {rate * 1000:.1f} GFLOP/s"
        if self.mfu is not None:
            text += f", MFU {100 * self.mfu:.1f} % of {self.peak_tflops:g} ({self.peak_precision})"
        return text


def mfu(
    images_per_second: float, flops_per_image: float | None, device_name: str, precision: str
) -> Throughput:
    tflops = flops_per_image * images_per_second / 1e12 if flops_per_image else None
    peak = device_peak_tflops(device_name, precision)
    return Throughput(
        images_per_second=images_per_second,
        tflops_per_second=tflops,
        mfu=tflops / peak if tflops is not None and peak else None,
        peak_tflops=peak,
        peak_precision=precision,
    )


def dummy_added_conditions(
    config: Any, batch: int, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> dict[str, dict[str, torch.Tensor]]:
    """``added_cond_kwargs`` of zeros for a UNet with SDXL's ``text_time`` added conditions (pooled text
    embedding + 6 time_ids), as keyword arguments of its forward; empty for any other UNet."""
    if getattr(config, "addition_embed_type", None) != "text_time":
        return {}
    time_ids = 6
    pooled = int(config.projection_class_embeddings_input_dim) - time_ids * int(config.addition_time_embed_dim)
    return {
        "added_cond_kwargs": {
            "text_embeds": torch.zeros((batch, pooled), device=device, dtype=dtype),
            "time_ids": torch.zeros((batch, time_ids), device=device, dtype=dtype),
        }
    }


def training_flops_per_image(
    unet: torch.nn.Module, lora_settings: dict[str, object], latent_shape: tuple[int, ...]
) -> float:
    """Model FLOPs of one training sample through the UNet (forward + backward with the LoRA adapter and
    a frozen base; recomputation by gradient checkpointing is not counted), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from shoe_lora_pipeline.core.models import lora_config

    config = unet.config
    with torch.device("meta"):
        ghost = type(unet).from_config(config)
    ghost.requires_grad_(False)
    ghost.add_adapter(lora_config(**lora_settings))  # type: ignore[arg-type]
    sample = torch.zeros((1, *latent_shape), device="meta")
    text = torch.zeros((1, 77, int(config.cross_attention_dim)), device="meta")
    timestep = torch.zeros((1,), dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        extra = dummy_added_conditions(config, 1, "meta")
        out = ghost(sample, timestep, encoder_hidden_states=text, return_dict=False, **extra)[0]
        out.float().square().mean().backward()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------
# micro-batch and gradient checkpointing: what fits
# ----------------------------------------------------------------------------------------------


@dataclass
class BatchLayout:
    micro_batch: int
    gradient_checkpointing: bool
    notes: list[str] = field(default_factory=list)


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def choose_micro_batch(
    candidates: list[int],
    fits: Callable[[int, bool], bool],
    checkpointing: bool | str,
) -> BatchLayout:
    """The first (largest) of ``candidates`` for which ``fits(micro, checkpointing)`` holds.

    With ``checkpointing == "auto"`` each size is tried without gradient checkpointing first and with it
    only when that does not fit: checkpointing (≈ a third more compute) is used only where it is the way
    to a larger micro-batch.
    """
    notes: list[str] = []
    for micro in candidates:
        options = [False, True] if checkpointing == "auto" else [bool(checkpointing)]
        for ckpt in options:
            if fits(micro, ckpt):
                notes.append(f"micro-batch {micro} fits (gradient checkpointing {'on' if ckpt else 'off'})")
                return BatchLayout(micro, ckpt, notes)
            notes.append(
                f"micro-batch {micro} with gradient checkpointing {'on' if ckpt else 'off'}: does not fit"
            )
    raise RuntimeError(
        "not even a micro-batch of 1 fits on the device: " + "; ".join(notes) + " — free GPU memory or use "
        "a smaller resolution"
    )


def cuda_fit_probe(
    unet: torch.nn.Module,
    latent_shape: tuple[int, ...],
    text_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    headroom: float = 0.9,
) -> Callable[[int, bool], bool]:
    """A ``fits`` function for :func:`choose_micro_batch` on CUDA: one forward + backward of dummy inputs
    (RNG state preserved, gradients cleared); a size fits when it runs and its peak stays under
    ``headroom`` of the device memory (room for the optimizer and the allocator's fragmentation)."""
    total = torch.cuda.get_device_properties(device).total_memory

    def fits(micro: int, checkpointing: bool) -> bool:
        set_gradient_checkpointing(unet, checkpointing)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with (
                torch.random.fork_rng(devices=[device]),
                torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32),
            ):
                x = torch.zeros((micro, *latent_shape), device=device, dtype=dtype)
                t = torch.full((micro,), 500, device=device, dtype=torch.long)
                text = torch.zeros((micro, *text_shape), device=device, dtype=dtype)
                extra = dummy_added_conditions(unet.config, micro, device, dtype)
                out = unet(x, t, encoder_hidden_states=text, return_dict=False, **extra)[0]
                out.float().square().mean().backward()
                torch.cuda.synchronize(device)
            ok = torch.cuda.max_memory_allocated(device) <= headroom * total
        except torch.cuda.OutOfMemoryError:
            ok = False
        finally:
            for p in unet.parameters():
                p.grad = None
            torch.cuda.empty_cache()
        return ok

    return fits


def set_gradient_checkpointing(unet: torch.nn.Module, on: bool) -> None:
    if on:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()


# ----------------------------------------------------------------------------------------------
# the CUDA fast path
# ----------------------------------------------------------------------------------------------


def attention_processors(unet: torch.nn.Module) -> list[str]:
    """The attention processor classes the UNet actually runs (e.g. ``AttnProcessor2_0`` = SDPA)."""
    return sorted({type(p).__name__ for p in unet.attn_processors.values()})


def compiled_regions(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's repeated blocks: compiled one by one (regional compilation) instead of the whole model,
    which keeps compile time down and leaves the glue between blocks eager."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [b for b in blocks if b is not None]


def apply_fast_path(unet: torch.nn.Module, speed: SpeedConfig, device: torch.device) -> list[str]:
    """Apply the configured CUDA levers to the (LoRA-carrying) UNet; returns a line per lever for the log.

    On CPU and MPS nothing changes except the attention processor choice: the recipe's behaviour there.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    notes = []
    unet.set_attn_processor(AttnProcessor2_0() if speed.sdpa else AttnProcessor())
    notes.append(f"attention processors: {', '.join(attention_processors(unet))}")
    if device.type != "cuda":
        return notes
    torch.backends.cuda.matmul.allow_tf32 = speed.tf32
    torch.backends.cudnn.allow_tf32 = speed.tf32
    notes.append(f"TF32 matmuls {'allowed' if speed.tf32 else 'off'}")
    if speed.channels_last:
        unet.to(memory_format=torch.channels_last)
        notes.append("channels_last memory format")
    if speed.compile:
        for block in compiled_regions(unet):
            # Static shapes: blocks of one class share their forward's code, so without this the second
            # block of a class (other widths) would switch dynamo to dynamic shapes and recompile slower code.
            block.compile(dynamic=False)
        notes.append(f"torch.compile: {len(compiled_regions(unet))} UNet blocks compiled one by one")
    return notes


@contextlib.contextmanager
def eager(compiled: bool) -> Iterator[None]:
    """Run compiled regions eagerly (validation images, validation loss: other batch sizes and no grad,
    which would otherwise trigger recompilations)."""
    if not compiled:
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield
