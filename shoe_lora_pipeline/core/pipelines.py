"""diffusers pipelines of a model folder, of the folder's own family (SD1.5 or SDXL).

The family is read from the folder (``families.family_of_folder``) and names the pipeline classes, so the
fused ``final_pipeline``, the evaluation and the renders load an SDXL folder with
``StableDiffusionXLPipeline`` and its hires pass with ``StableDiffusionXLImg2ImgPipeline`` without a
branch of their own.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from shoe_lora_pipeline.core.families import ModelFamily


def _plain(requires_safety_checker: bool) -> dict[str, Any]:
    """Our pipelines run without SD1.5's safety checker (product photos, filtered by our own QA) and
    without SDXL's invisible watermark (published files carry the IPTC/C2PA marks instead, and an optional
    package being installed must not change the pixels); each is passed only to a class that takes it."""
    return {
        "safety_checker": None,
        "requires_safety_checker": requires_safety_checker,
        "add_watermarker": False,
    }


def _accepted(cls: type[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def family_of_pipeline(pipe: Any) -> ModelFamily:
    """The family of a loaded pipeline, from its UNet config and its text encoders."""
    from shoe_lora_pipeline.core.families import family_of_unet_config

    return family_of_unet_config(pipe.unet.config, getattr(pipe, "text_encoder_2", None) is not None)


def pipeline_from_folder(
    folder: Path,
    dtype: torch.dtype | None = None,
    *,
    local_files_only: bool = True,
    requires_safety_checker: bool = False,
) -> Any:
    """The family's text-to-image pipeline of a diffusers folder (``model_index.json``), on the CPU.

    ``requires_safety_checker`` is what an SD1.5 pipeline records in its ``model_index.json`` when saved
    (the fused ``final_pipeline`` has always kept diffusers' default, True)."""
    from shoe_lora_pipeline.core.families import family_of_folder

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    cls = family_of_folder(folder).text2img_pipeline_class()
    # fp32 is the default everywhere; a dtype is passed only when asked (its keyword changed in diffusers 0.42).
    kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
    return cls.from_pretrained(
        folder,
        local_files_only=local_files_only,
        **_accepted(cls, _plain(requires_safety_checker)),
        **kwargs,
    )


def img2img_of(pipe: Any) -> Any:
    """The family's img2img pipeline sharing ``pipe``'s components (UNet with the LoRA fused, VAE, …):
    no new weights (``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionXLImg2ImgPipeline``)."""
    cls = family_of_pipeline(pipe).img2img_pipeline_class()
    components = _accepted(cls, dict(pipe.components))
    img2img = cls(
        **components, **_accepted(cls, {k: v for k, v in _plain(False).items() if k not in components})
    )
    img2img.set_progress_bar_config(disable=True)
    return img2img
