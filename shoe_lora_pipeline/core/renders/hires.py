"""The hires pass (A1111's "hires fix") for approved images only.

Candidates are generated at the render size; an image a reviewer (or the approval rule) chose is upscaled
``scale``× in pixel space (Lanczos) and re-rendered with an img2img pass of the *same* pipeline and LoRA
(the family's img2img pipeline of ``pipe.components``: no extra weights), the same prompt and seed, at
``denoise`` strength. The result is cached under ``renders/hires/<sku>/`` keyed by the candidate's render
key and the hires settings, so publishing again costs nothing, and only what is published pays for it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoe_lora_pipeline.core.fsutil import atomic_write_file

if TYPE_CHECKING:
    from PIL import Image

    from shoe_lora_pipeline.core.config import PipelineConfig

HIRES_UPSCALER = "Lanczos"  # the pixel-space upscaler before the img2img pass, as A1111 names it


@dataclass(frozen=True)
class HiresSettings:
    scale: float
    denoise: float
    steps: int  # sampler steps before strength (diffusers runs int(steps × denoise) of them)
    guidance_scale: float

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> HiresSettings | None:
        h = cfg.renders.hires
        if not h.enabled:
            return None
        steps = h.steps or cfg.renders.num_inference_steps
        # img2img runs int(steps × denoise) steps: at least one.
        return cls(h.scale, h.denoise, max(steps, math.ceil(1 / h.denoise)), cfg.renders.guidance_scale)

    def size(self, base: int) -> int:
        """The hires side for a ``base`` render: a multiple of 8 (latents are 1/8)."""
        return max(8, round(base * self.scale / 8) * 8)

    def key(self, render_key: str, file: str) -> str:
        payload = {"render_key": render_key, "file": file, **self.__dict__}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def a1111_fields(self) -> list[tuple[str, Any]]:
        """A1111's own field names and order."""
        return [
            ("Denoising strength", f"{self.denoise:g}"),
            ("Hires upscale", f"{self.scale:g}"),
            ("Hires steps", self.steps),
            ("Hires upscaler", HIRES_UPSCALER),
        ]


def img2img_from(pipe: Any) -> Any:
    """diffusers' img2img pipeline of ``pipe``'s family sharing its components (UNet with the LoRA fused,
    VAE, …): ``StableDiffusionImg2ImgPipeline`` or ``StableDiffusionXLImg2ImgPipeline``."""
    from shoe_lora_pipeline.core.pipelines import img2img_of

    return img2img_of(pipe)


class HiresPass:
    """Callable ``(sku, render_key, file, image, prompt, negative_prompt, seed) → (hires image, path)``;
    the img2img pipeline is built on first use from ``load_pipeline`` and cached files are reused."""

    def __init__(
        self,
        settings: HiresSettings,
        cache_dir: Path,
        load_pipeline: Callable[[], tuple[Any, list[str]]],
        log: Callable[[str], None] = print,
    ) -> None:
        self.settings, self.cache_dir, self.load_pipeline, self.log = (
            settings,
            Path(cache_dir),
            load_pipeline,
            log,
        )
        self._img2img: Any = None
        self.generated = 0
        self.reused = 0
        self.used: set[Path] = set()

    def path(self, sku: str, render_key: str, file: str) -> Path:
        return (
            self.cache_dir / sku / f"{Path(file).stem}-hires-{self.settings.key(render_key, file)[:10]}.png"
        )

    def __call__(
        self,
        sku: str,
        render_key: str,
        file: str,
        image: Image.Image,
        prompt: str,
        negative_prompt: str,
        seed: int,
    ) -> Image.Image:
        from PIL import Image as PILImage

        target = self.path(sku, render_key, file)
        self.used.add(target)
        if target.is_file():
            try:
                with PILImage.open(target) as im:
                    im.load()
                    self.reused += 1
                    return im.convert("RGB")
            except OSError:
                pass  # a damaged cache file: render it again
        import torch

        if self._img2img is None:
            pipe, _ = self.load_pipeline()
            self._img2img = img2img_from(pipe)
        side = self.settings.size(max(image.size))
        up = image.convert("RGB").resize((side, side), PILImage.Resampling.LANCZOS)
        out = self._img2img(
            prompt=prompt,
            negative_prompt=negative_prompt,
            image=up,
            strength=self.settings.denoise,
            num_inference_steps=self.settings.steps,
            guidance_scale=self.settings.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(int(seed)),
        ).images[0]
        atomic_write_file(target, lambda p: out.save(p, format="PNG"))
        self.generated += 1
        self.log(f"hires: {sku}/{file} → {side}×{side} (denoise {self.settings.denoise:g})")
        return out

    def prune(self) -> int:
        """Remove cached hires images this publication did not use (withdrawn approvals, old settings)."""
        removed = 0
        if not self.cache_dir.is_dir():
            return removed
        for path in sorted(self.cache_dir.rglob("*.png")):
            if path not in self.used:
                path.unlink()
                removed += 1
        for folder in sorted(self.cache_dir.iterdir()):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return removed
