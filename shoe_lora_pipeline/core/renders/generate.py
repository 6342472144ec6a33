"""Generation for product renders: which LoRA, which pipeline, which seeds, batched calls.

* Seeds come from ``(renders.seed, sku, candidate index)`` alone (:func:`candidate_seed`), so a re-run, a
  re-ordered sheet or another SKU changing never changes a SKU's images; each image gets its own CPU
  ``torch.Generator`` (same starting noise on every device, as in the evaluation stage).
* The pipeline is the fused ``final_pipeline`` when it was fused from the current LoRA file, else the base
  model with the LoRA loaded and fused in memory: either way no peft layer runs at inference.
* :func:`render_batches` fills every pipeline call with up to ``batch_size`` images across SKUs.
* :func:`optimise_pipeline` applies the levers that pay on a GPU (channels_last, fused QKV projections,
  optionally ``torch.compile``); on a CPU they do not (``benchmarks/renders.py`` measures both).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoe_lora_pipeline.core.fsutil import file_sha256
from shoe_lora_pipeline.core.lora_io import (
    DIFFUSERS_WEIGHTS_NAME,
    PROVENANCE_NAME,
    kohya_tensor_hash,
    kohya_weights_name,
    lora_content_sha256,
)

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

SEED_SPACE = 2**32  # A1111 and most tools show 32-bit seeds
# renders.sampler → (diffusers scheduler class, the name A1111 writes in `parameters`)
SAMPLERS: dict[str, tuple[str, str]] = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "pndm": ("PNDMScheduler", "PNDM"),
    "ddim": ("DDIMScheduler", "DDIM"),
    "euler": ("EulerDiscreteScheduler", "Euler"),
}


class RenderSourceError(RuntimeError):
    """No usable LoRA to render with; the message names the folder and the stage to materialise."""


def candidate_seed(base_seed: int, sku: str, index: int) -> int:
    """Seed of candidate ``index`` of ``sku``: a hash, so it depends on nothing else in the sheet."""
    digest = hashlib.sha256(f"{int(base_seed)}\x00{sku}\x00{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_SPACE


@dataclass(frozen=True)
class RenderJob:
    sku: str
    index: int
    prompt: str
    negative_prompt: str
    seed: int


@dataclass(frozen=True)
class LoraSource:
    """The LoRA the renders come from, and what the PNG provenance says about it."""

    lora_dir: Path
    lora_file: Path  # the diffusers weights file
    lora_sha256: str  # the file's sha256 (what an auditor checks)
    content_sha256: str  # its tensors + adapter metadata (lora_io.lora_content_sha256): keys the renders
    name: str  # the kohya file's stem, as A1111 lists it
    a1111_hash: str  # A1111's LoRA short hash: sha256 of the kohya file's tensor bytes, 12 hex
    model_hash: str | None  # base model fingerprint, 10 hex (A1111's "Model hash" field)
    base_model: str | None
    fused_dir: Path | None  # final_pipeline, when fused from exactly this LoRA file
    fused_scale: float | None
    provenance: dict[str, Any] = field(default_factory=dict)  # the LoRA's own provenance record

    def to_json(self) -> dict[str, Any]:
        return {
            "lora_dir": str(self.lora_dir),
            "lora_file": self.lora_file.name,
            "lora_sha256": self.lora_sha256,
            "content_sha256": self.content_sha256,
            "name": self.name,
            "a1111_hash": self.a1111_hash,
            "model_hash": self.model_hash,
            "base_model": self.base_model,
            "pipeline": "final_pipeline" if self.fused_dir else "base + LoRA",
            "fused_scale": self.fused_scale,
            "provenance": self.provenance,
        }


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lora_source(lora_dir: Path, final_pipeline_dir: Path | None) -> LoraSource:
    """Describe the exported LoRA in ``lora_dir``; ``final_pipeline_dir`` is used only when its
    ``provenance.json`` says it was fused from this very file (a stale fused pipeline is ignored)."""
    lora_dir = Path(lora_dir)
    weights = lora_dir / DIFFUSERS_WEIGHTS_NAME
    if not weights.is_file():
        raise RenderSourceError(f"{weights}: no exported LoRA; materialize lora_weights first")
    record = _json_or_empty(lora_dir / PROVENANCE_NAME)
    provenance = record.get("provenance") or {}
    name = kohya_weights_name(str(provenance.get("dataset_name") or "lora"))
    kohya = lora_dir / name
    sha = file_sha256(weights)
    a1111 = (kohya_tensor_hash(kohya) if kohya.is_file() else sha)[:12]
    fused, scale = None, None
    if final_pipeline_dir is not None and (Path(final_pipeline_dir) / "model_index.json").is_file():
        fuse = _json_or_empty(Path(final_pipeline_dir) / PROVENANCE_NAME).get("fuse") or {}
        if fuse.get("source_lora_sha256") == sha:
            fused, scale = Path(final_pipeline_dir), fuse.get("lora_scale")
    fingerprint = provenance.get("base_model_fingerprint")
    return LoraSource(
        lora_dir=lora_dir,
        lora_file=weights,
        lora_sha256=sha,
        content_sha256=lora_content_sha256(weights),
        name=Path(name).stem,
        a1111_hash=a1111,
        model_hash=str(fingerprint)[:10] if fingerprint else None,
        base_model=provenance.get("base_model"),
        fused_dir=fused,
        fused_scale=scale,
        provenance=provenance,
    )


def render_dtype(device_type: str, precision: str) -> torch.dtype:
    """renders.precision → dtype; ``auto`` is bf16 on CUDA (inference needs no fp32 master weights)."""
    import torch

    if device_type != "cuda":
        return torch.float32  # half precision on CPU/MPS is slow or unreliable
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        precision, torch.float32
    )


def set_sampler(pipe: StableDiffusionPipeline, sampler: str) -> str:
    """Swap the pipeline's scheduler for ``sampler`` (same betas); returns the A1111 sampler name."""
    import diffusers

    class_name, a1111_name = SAMPLERS[sampler]
    if type(pipe.scheduler).__name__ != class_name:
        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config)
    return a1111_name


def load_render_pipeline(
    source: LoraSource,
    base_dir: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    *,
    lora_scale: float = 1.0,
) -> Any:
    """The fused pipeline, or ``base_dir`` with the LoRA fused in memory (``lora_scale`` as export's)."""
    from shoe_lora_pipeline.core.evaluation.runner import load_pipeline
    from shoe_lora_pipeline.core.lora_io import check_lora_fits
    from shoe_lora_pipeline.core.pipelines import family_of_pipeline

    if source.fused_dir is not None:
        pipe = load_pipeline(source.fused_dir, device, dtype)
    else:
        if base_dir is None:
            raise RenderSourceError(
                f"final_pipeline was not fused from {source.lora_file} and no base model was given"
            )
        pipe = load_pipeline(base_dir, device, dtype)
        check_lora_fits(source.lora_file, pipe.unet, family_of_pipeline(pipe), model=f"base model {base_dir}")
        pipe.load_lora_weights(str(source.lora_dir), weight_name=DIFFUSERS_WEIGHTS_NAME)
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()  # keeps the fused weights, drops the peft layers
    pipe.set_progress_bar_config(disable=True)
    return pipe


def optimise_pipeline(
    pipe: StableDiffusionPipeline, device: torch.device, *, compile_unet: bool = False
) -> list[str]:
    """Apply the inference levers that pay on ``device``; returns their names (for the run log).

    SDPA attention is diffusers' default with torch 2 already. On CUDA: channels_last (NHWC is what the
    tensor-core convolutions want), fused QKV projections (one matmul instead of three) and, when asked,
    ``torch.compile`` of the UNet (a warm-up of tens of seconds that a large sheet pays back). On a CPU
    none of them helped the tiny model, so nothing is changed there.
    """
    import torch

    if torch.device(device).type != "cuda":
        return []
    levers = []
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    levers.append("channels_last")
    pipe.fuse_qkv_projections()
    levers.append("fused_qkv")
    if compile_unet:
        levers.append(compile_pipeline_unet(pipe))
    return levers


def compile_pipeline_unet(pipe: StableDiffusionPipeline) -> str:
    """``torch.compile`` the UNet (default inductor mode; the first call at each batch size compiles)."""
    import torch

    pipe.unet = torch.compile(pipe.unet)
    return "torch.compile(unet)"


@dataclass
class BatchStats:
    images: int = 0
    calls: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float | None:
        return round(self.images / self.seconds, 3) if self.seconds > 0 else None


def render_batches(
    pipe: StableDiffusionPipeline,
    jobs: Sequence[RenderJob],
    *,
    steps: int,
    guidance_scale: float,
    size: int,
    batch_size: int,
    on_batch: Callable[[list[RenderJob], list[Image.Image]], None],
    log: Callable[[str], None] | None = None,
) -> BatchStats:
    """Generate ``jobs`` in calls of up to ``batch_size`` images (one prompt and seed per image)."""
    from shoe_lora_pipeline.core.evaluation.generate import seeded_images

    stats = BatchStats()
    started = time.perf_counter()
    for start in range(0, len(jobs), batch_size):
        chunk = list(jobs[start : start + batch_size])
        images = seeded_images(
            pipe,
            [j.seed for j in chunk],
            prompt=[j.prompt for j in chunk],
            negative_prompt=[j.negative_prompt for j in chunk],
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
        )
        on_batch(chunk, images)
        stats.calls += 1
        stats.images += len(chunk)
        if log is not None:
            log(f"renders: {stats.images}/{len(jobs)} images ({time.perf_counter() - started:.1f}s)")
    stats.seconds = time.perf_counter() - started
    return stats


def pipeline_loader(
    source: LoraSource,
    base_dir: Callable[[], Path],
    device: torch.device,
    dtype: torch.dtype,
    *,
    sampler: str,
    lora_scale: float = 1.0,
    compile_unet: bool = False,
) -> Callable[[], tuple[Any, list[str]]]:
    """A deferred :func:`load_render_pipeline` + :func:`optimise_pipeline` (nothing loads until called;
    ``base_dir`` is asked for only when the fused pipeline cannot be used)."""

    def load() -> tuple[Any, list[str]]:
        base = None if source.fused_dir is not None else base_dir()
        pipe = load_render_pipeline(source, base, device, dtype, lora_scale=lora_scale)
        set_sampler(pipe, sampler)
        return pipe, optimise_pipeline(pipe, device, compile_unet=compile_unet)

    return load
