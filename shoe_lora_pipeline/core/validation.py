"""Validation images during training: fixed prompts × fixed seeds, one PNG each plus a grid per step.

Design choices:

* The pipeline is built around the *training* UNet (adapter attached), the VAE, text encoder and tokenizer:
  no second UNet copy. The UNet is switched to ``eval()`` under ``torch.no_grad()`` and back to ``train()``.
* Prompt embeddings are computed once before training (:func:`encode_validation_prompts`), so with cached
  latents the text encoder is used once and otherwise stays on the CPU. The VAE (decoder) is moved to the
  training device only for the duration of a validation and moved back afterwards.
* Each (prompt, image) has its own seed derived from the training seed (:func:`validation_seed`) and its own
  CPU ``torch.Generator``: the same cell shows the same starting noise at every validation step (grids are
  comparable across steps and devices), and the training RNG is never touched. The global torch RNG state
  is saved and restored around generation as well, so validation cannot shift training (resume stays
  bit-identical whether or not validation ran).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageDraw, ImageFont

from shoe_lora_pipeline.core.display import UI_IMAGE_SIDE
from shoe_lora_pipeline.core.fsutil import atomic_save_png
from shoe_lora_pipeline.core.latents import encode_text

if TYPE_CHECKING:
    from shoe_lora_pipeline.core.models import SDComponents

MAX_GRID_CELL = 256  # px; keeps a 4×4 grid of 512px images around 1 MB


@dataclass
class ValidationPrompts:
    prompts: list[str]
    embeddings: torch.Tensor  # [P, 77, D], CPU
    negative: torch.Tensor  # [1, 77, D], CPU: the unconditional input of classifier-free guidance
    empty: torch.Tensor  # [1, 77, D], CPU: the empty caption (caption dropout trains with it)
    # SDXL: the pooled embeddings of the prompts [P, P'], of the unconditional input and of "" [1, P'].
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    empty_pooled: torch.Tensor | None = None

    def pipeline_inputs(self, index: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The embeddings of prompt ``index`` as the family's pipeline takes them."""
        inputs = {
            "prompt_embeds": self.embeddings[index : index + 1].to(device, dtype),
            "negative_prompt_embeds": self.negative.to(device, dtype),
        }
        if self.pooled is not None and self.negative_pooled is not None:
            inputs["pooled_prompt_embeds"] = self.pooled[index : index + 1].to(device, dtype)
            inputs["negative_pooled_prompt_embeds"] = self.negative_pooled.to(device, dtype)
        return inputs


@dataclass
class ValidationResult:
    step: int
    epoch: int
    grid_path: Path
    image_paths: list[Path]
    seconds: float

    def as_callback_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "grid_path": self.grid_path,
            "image_paths": list(self.image_paths),
            "seconds": self.seconds,
        }


def validation_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """Seed of one validation cell: stable across steps and runs, unrelated to the training streams."""
    digest = hashlib.sha256(f"validation/{seed}/{prompt_index}/{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """Temporarily move a frozen module to ``device``; back where it was afterwards."""
    home = next(module.parameters()).device
    if home == device or (home.type == device.type and device.index is None):
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Save and restore the global torch RNG (CPU and the accelerator's) around a block."""
    cuda = [torch.cuda.current_device()] if device.type == "cuda" else []
    mps_state = torch.mps.get_rng_state() if device.type == "mps" else None
    with torch.random.fork_rng(devices=cuda):
        yield
    if mps_state is not None:
        torch.mps.set_rng_state(mps_state)


def encode_validation_prompts(
    components: SDComponents, prompts: list[str], device: torch.device
) -> ValidationPrompts:
    """CLIP embeddings of the prompts and of "" (the empty caption), computed once.

    The unconditional input is what the family's pipeline uses for an absent negative prompt: the empty
    caption's embedding for SD1.5; zeros for SDXL (``force_zeros_for_empty_prompt``), so validation images
    are made as ``StableDiffusionXLPipeline`` makes them from a prompt."""
    with contextlib.ExitStack() as stack:
        for text_encoder in components.text_encoders:
            stack.enter_context(on_device(text_encoder, device))
        emb, pooled = encode_text(components, list(prompts) + [""])
    emb = emb.cpu()
    if pooled is None:
        return ValidationPrompts(prompts=list(prompts), embeddings=emb[:-1], negative=emb[-1:], empty=emb[-1:])
    pooled = pooled.cpu()
    return ValidationPrompts(
        prompts=list(prompts),
        embeddings=emb[:-1],
        negative=torch.zeros_like(emb[-1:]),
        empty=emb[-1:],
        pooled=pooled[:-1],
        negative_pooled=torch.zeros_like(pooled[-1:]),
        empty_pooled=pooled[-1:],
    )


def _label_font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def short_labels(prompts: list[str]) -> list[str]:
    """The words that tell the prompts apart (shared leading/trailing words replaced by "…")."""
    words = [p.split() for p in prompts]
    if len(words) < 2:
        return list(prompts)
    head = 0
    while all(len(w) > head for w in words) and len({w[head] for w in words}) == 1:
        head += 1
    tail = 0
    while all(len(w) > head + tail for w in words) and len({w[-1 - tail] for w in words}) == 1:
        tail += 1
    labels = []
    for w in words:
        middle = " ".join(w[head : len(w) - tail]) or " ".join(w)
        labels.append(("… " if head else "") + middle + (" …" if tail else ""))
    return labels


# Labels are drawn so that they are LABEL_PX tall in the UI's thumbnail (longer side UI_IMAGE_SIDE),
# however large the grid is.
LABEL_PX = 12


def make_grid(rows: list[list[Image.Image]], labels: list[str], title: str) -> Image.Image:
    """Rows = prompts, columns = images; a title bar and a one-line label above each row, large enough to
    read at the size the Dagster UI shows the grid."""
    cell = min(MAX_GRID_CELL, max(img.width for row in rows for img in row))
    cols = max(len(r) for r in rows)
    pad = 2
    width = cols * (cell + pad) + pad
    # The scale at which the UI shrinks the grid (its height grows with the labels, hence two passes).
    scale = max(1.0, width / UI_IMAGE_SIDE, (len(rows) * (cell + pad)) / UI_IMAGE_SIDE)
    for _ in range(2):
        font_px = round(LABEL_PX * scale)
        label_h, title_h = round(font_px * 1.4), round(font_px * 1.6)
        height = title_h + len(rows) * (label_h + cell + pad) + pad
        scale = max(1.0, width / UI_IMAGE_SIDE, height / UI_IMAGE_SIDE)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    font = _label_font(font_px)
    draw.text((pad + 2, round(font_px * 0.2)), title, fill="black", font=font)
    max_chars = max(8, int(width / (0.6 * font_px)))
    y = title_h
    for r, row in enumerate(rows):
        text = labels[r] if r < len(labels) else ""
        if len(text) > max_chars:
            text = text[: max_chars - 1] + "…"
        draw.text((pad + 2, y + round(font_px * 0.15)), text, fill=(60, 60, 60), font=font)
        y += label_h
        for c, img in enumerate(row):
            grid.paste(img.resize((cell, cell), Image.BICUBIC), (pad + c * (cell + pad), y))
        y += cell + pad
    return grid


def decode_fp32(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Decode a pipeline's latents with its VAE in fp32, outside any autocast (the SDXL VAE overflows in fp16)."""
    vae = pipe.vae
    with torch.autocast(latents.device.type, enabled=False):
        home = next(vae.parameters()).dtype
        vae.to(dtype=torch.float32)
        try:
            image = vae.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
        finally:
            vae.to(dtype=home)
    return pipe.image_processor.postprocess(image, output_type="pil")


def run_validation(
    unet: torch.nn.Module,
    components: SDComponents,
    prompts: ValidationPrompts,
    *,
    out_dir: Path,
    step: int,
    epoch: int,
    seed: int,
    num_images: int,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
    device: torch.device,
) -> ValidationResult:
    """Generate ``len(prompts) × num_images`` images with the training UNet and write them plus a grid.

    Files: ``validation/epoch{E:03d}_step{S:05d}_prompt{P}_img{I}.png`` and ``validation/grid_step{S:05d}.png``.
    """
    import time


    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(components.text_encoder.parameters()).dtype  # the pipeline casts embeddings to this
    fp32_decode = components.family.vae_needs_fp32 and dtype != torch.float32
    was_training = unet.training
    rows: list[list[Image.Image]] = []
    paths: list[Path] = []
    try:
        unet.eval()
        # Same autocast as training under mixed precision: accelerate's wrapper returns the UNet output in
        # fp32, which the half-precision VAE decoder would otherwise refuse.
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16))
        with preserved_rng(device), torch.no_grad(), on_device(components.vae, device), autocast:
            pipe = components.pipeline(unet)
            pipe.set_progress_bar_config(disable=True)
            for p in range(len(prompts.prompts)):
                generators = [
                    torch.Generator("cpu").manual_seed(validation_seed(seed, p, i)) for i in range(num_images)
                ]
                images = pipe(
                    **prompts.pipeline_inputs(p, device, dtype),
                    num_images_per_prompt=num_images,
                    generator=generators,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=resolution,
                    width=resolution,
                    # A VAE that overflows in fp16 decodes outside the autocast, in fp32.
                    output_type="latent" if fp32_decode else "pil",
                ).images
                if fp32_decode:
                    images = decode_fp32(pipe, images)
                rows.append(images)
                for i, img in enumerate(images):
                    path = out_dir / f"epoch{epoch:03d}_step{step:05d}_prompt{p}_img{i}.png"
                    atomic_save_png(path, img)
                    paths.append(path)
    finally:
        unet.train(was_training)

    labels = [f"P{p}: {text}" for p, text in enumerate(short_labels(prompts.prompts))]
    grid_path = out_dir / f"grid_step{step:05d}.png"
    grid = make_grid(rows, labels, title=f"step {step} (epoch {epoch})")
    atomic_save_png(grid_path, grid)
    return ValidationResult(
        step=step, epoch=epoch, grid_path=grid_path, image_paths=paths, seconds=time.perf_counter() - start
    )
