"""Evaluation generations: the same prompts and the same per-image seeds for the base model and the LoRA.

Each (prompt, image) cell gets its own seed (:func:`image_seed`) and its own CPU ``torch.Generator``:
diffusers draws the initial latents on the generator's device and moves them, so a seed gives the same
starting noise on CPU, CUDA and MPS, and cell (p, i) of the base model starts from exactly the same noise
as cell (p, i) of the LoRA. Side-by-side images therefore differ only by the weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shoe_lora_pipeline.core.fsutil import atomic_save_png, atomic_write_text

MAX_IMAGES_PER_PROMPT = 1000  # image_seed packs the image index below this

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from PIL import Image


@dataclass(frozen=True)
class GeneratedImage:
    prompt_index: int
    image_index: int
    prompt: str
    path: Path
    seed: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """Seed of cell (prompt, image): readable (``seed + 1000·p + i``) so a report cell can be re-run by hand."""
    if not 0 <= image_index < MAX_IMAGES_PER_PROMPT:
        raise ValueError(f"image_index {image_index} outside [0, {MAX_IMAGES_PER_PROMPT})")
    return int(seed) + MAX_IMAGES_PER_PROMPT * int(prompt_index) + int(image_index)


def image_filename(prompt_index: int, image_index: int) -> str:
    return f"prompt{prompt_index}_img{image_index}.png"


def seeded_images(pipe: StableDiffusionPipeline, seeds: Sequence[int], **call: Any) -> list[Image.Image]:
    """One pipeline call (``call``: its arguments) in which image ``i`` starts from the noise of
    ``seeds[i]``: one CPU generator per image, so a seed gives the same image on every device and in a
    batch the same as alone. PIL images, without autograd."""
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    with torch.inference_mode():
        return pipe(**call, generator=generators, output_type="pil").images


def generate_images(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    images_per_prompt: int,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    out_dir: Path,
    tag: str,
) -> list[GeneratedImage]:
    """Generate ``images_per_prompt`` images per prompt into ``out_dir/{tag}/prompt{P}_img{I}.png``.

    One pipeline call per prompt, with one CPU generator per image (a list of generators gives every
    batch element its own noise, identical to generating it alone). The progress bar is disabled for
    the call and the pipeline's previous progress-bar settings restored afterwards. An ``index.json``
    in the folder lists prompt, seed and file of every image.
    """
    if images_per_prompt < 1:
        raise ValueError("images_per_prompt must be >= 1")
    folder = Path(out_dir) / tag
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("prompt*_img*.png"):  # a previous run with more prompts must not linger
        stale.unlink()
    previous_bar = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    out: list[GeneratedImage] = []
    started = time.perf_counter()
    try:
        for p, prompt in enumerate(prompts):
            seeds = [image_seed(seed, p, i) for i in range(images_per_prompt)]
            images = seeded_images(
                pipe,
                seeds,
                prompt=prompt,
                num_images_per_prompt=images_per_prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            )
            for i, (img, s) in enumerate(zip(images, seeds, strict=True)):
                path = folder / image_filename(p, i)
                atomic_save_png(path, img.convert("RGB"))
                out.append(GeneratedImage(p, i, prompt, path, s))
    finally:
        if hasattr(pipe, "_progress_bar_config"):
            pipe._progress_bar_config = previous_bar
    index = {
        "tag": tag,
        "seconds": round(time.perf_counter() - started, 2),
        "settings": {
            "images_per_prompt": images_per_prompt,
            "seed": seed,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
        },
        "images": [dict(g.to_dict(), path=g.path.name) for g in out],
    }
    atomic_write_text(folder / "index.json", json.dumps(index, indent=2) + "\n")
    return out
