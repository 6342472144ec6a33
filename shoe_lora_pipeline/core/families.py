"""Base-model families: the one place that knows how SD1.5 and SDXL differ.

A family is a property of the base model, read from its UNet config, never of the code: SDXL's UNet
conditions on ``text_time`` added embeddings (the pooled text embedding of the second text encoder and
the size/crop ``time_ids``), and an SDXL folder has a second text encoder (``text_encoder_2``, a CLIP
text model with projection). Stages ask the family for encoders, pipelines, resolution and file
metadata; they do not branch on strings.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ModelFamilyChoice = Literal["auto", "sd15", "sdxl"]


class ModelFamilyError(ValueError):
    """The base model is not of the family the config insists on, or its family cannot be read."""


@dataclass(frozen=True)
class ModelFamily:
    """What a stage needs to know about one family of Stable Diffusion models."""

    name: str  # "sd15" / "sdxl": the value of training.model_family
    title: str  # for people: "Stable Diffusion 1.5"
    # One (tokenizer subfolder, text encoder subfolder, transformers class) per text encoder, in order.
    tokenizer_subfolders: tuple[str, ...]
    text_encoder_subfolders: tuple[str, ...]
    text_encoder_classes: tuple[str, ...]
    # SDXL's UNet takes added conditions: the pooled text embedding and the time_ids (size/crop).
    uses_added_conditions: bool
    default_resolution: int
    text2img_pipeline: str  # diffusers class names
    img2img_pipeline: str
    kohya_base_model_version: str  # kohya's ss_base_model_version
    # kohya-ss trains SD1.x on a diffusers-named UNet and SDXL on the original LDM/SGM one, so its files
    # (and A1111's and ComfyUI's readers) name the UNet's blocks after that: core/kohya_keys.py.
    kohya_names_ldm_blocks: bool
    # The SDXL VAE overflows in fp16 (NaNs in the latents): encode in fp32 unless a fixed VAE is configured.
    vae_needs_fp32: bool

    @property
    def num_text_encoders(self) -> int:
        return len(self.text_encoder_subfolders)

    def text2img_pipeline_class(self) -> type[Any]:
        return getattr(importlib.import_module("diffusers"), self.text2img_pipeline)

    def img2img_pipeline_class(self) -> type[Any]:
        return getattr(importlib.import_module("diffusers"), self.img2img_pipeline)

    def text_encoder_class(self, index: int) -> type[Any]:
        return getattr(importlib.import_module("transformers"), self.text_encoder_classes[index])


SD15 = ModelFamily(
    name="sd15",
    title="Stable Diffusion 1.5",
    tokenizer_subfolders=("tokenizer",),
    text_encoder_subfolders=("text_encoder",),
    text_encoder_classes=("CLIPTextModel",),
    uses_added_conditions=False,
    default_resolution=512,
    text2img_pipeline="StableDiffusionPipeline",
    img2img_pipeline="StableDiffusionImg2ImgPipeline",
    kohya_base_model_version="sd_v1",
    kohya_names_ldm_blocks=False,
    vae_needs_fp32=False,
)
SDXL = ModelFamily(
    name="sdxl",
    title="Stable Diffusion XL",
    tokenizer_subfolders=("tokenizer", "tokenizer_2"),
    text_encoder_subfolders=("text_encoder", "text_encoder_2"),
    text_encoder_classes=("CLIPTextModel", "CLIPTextModelWithProjection"),
    uses_added_conditions=True,
    default_resolution=1024,
    text2img_pipeline="StableDiffusionXLPipeline",
    img2img_pipeline="StableDiffusionXLImg2ImgPipeline",
    kohya_base_model_version="sdxl_base_v1-0",
    kohya_names_ldm_blocks=True,
    vae_needs_fp32=True,
)
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD15, SDXL)}


def family_named(name: str) -> ModelFamily:
    """The family called ``name`` ("sd15" / "sdxl"); an unknown name is named in the error."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelFamilyError(
            f"training.model_family = {name!r} is not a model family; use one of auto, {', '.join(FAMILIES)}"
        ) from None


def family_of_unet_config(
    unet_config: Mapping[str, Any], has_second_text_encoder: bool | None = None
) -> ModelFamily:
    """The family of a UNet config (a dict, or a diffusers FrozenDict, e.g. of a model built on meta).

    ``addition_embed_type: text_time`` is SDXL's; where the folder's text encoders are known, an SDXL UNet
    without ``text_encoder_2`` (or the reverse) is a broken or unsupported model, said so.
    """
    text_time = unet_config.get("addition_embed_type") == "text_time"
    if has_second_text_encoder is not None and has_second_text_encoder != text_time:
        found = (
            "addition_embed_type: text_time"
            if text_time
            else (f"addition_embed_type: {unet_config.get('addition_embed_type')!r}")
        )
        raise ModelFamilyError(
            f"the model's UNet config has {found} but the model "
            f"{'has' if has_second_text_encoder else 'has no'} text_encoder_2: neither SD1.5 (one text "
            "encoder, no added conditions) nor SDXL (two text encoders, text_time conditions)"
        )
    return SDXL if text_time else SD15


def family_of_folder(folder: Path) -> ModelFamily:
    """The family of a diffusers model folder, read from ``unet/config.json`` and its text encoders."""
    config_path = folder / "unet" / "config.json"
    try:
        unet_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFamilyError(f"cannot read the base model's UNet config {config_path}: {exc}") from None
    return family_of_unet_config(unet_config, (folder / "text_encoder_2").is_dir())


def resolve_family(found: ModelFamily, insisted: str, where: str = "the base model") -> ModelFamily:
    """The family to use: ``found`` (from the model) unless ``training.model_family`` insists on another,
    which is an error naming the key, the value and what the model is."""
    if insisted == "auto":
        return found
    wanted = family_named(insisted)
    if wanted != found:
        raise ModelFamilyError(
            f"training.model_family = {insisted!r} but {where} is {found.name} ({found.title}: "
            f"{'UNet addition_embed_type text_time and text_encoder_2' if found.uses_added_conditions else 'no text_time added conditions, one text encoder'}); "
            f"set training.model_family to {found.name!r} or 'auto', or pick a {wanted.title} base model"
        )
    return found


def family_hint(base_model: str, model_family: str = "auto", revision: str | None = None) -> ModelFamily | None:
    """The family of ``training.base_model`` where it can be known without loading the model (for
    defaults such as the resolution): the insisted one, the built-in models, a local folder's UNet config,
    or the hub cache's copy of it. None when it cannot be known yet (a hub id not downloaded)."""
    from shoe_lora_pipeline.core import models

    if model_family != "auto":
        return family_named(model_family)
    known = {models.TINY_SD: SD15, models.TINY_SHOES: SD15, models.SD15_HUB_ID: SD15}
    known |= {models.TINY_SDXL: SDXL, models.SDXL_HUB_ID: SDXL}
    if base_model in known:
        return known[base_model]
    folder = Path(base_model).expanduser()
    try:
        if folder.is_dir():
            return family_of_folder(folder)
        if folder.is_absolute() or base_model.startswith((".", "~")):
            return None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "unet/config.json", revision=revision)
        if isinstance(cached, str):
            return family_of_unet_config(json.loads(Path(cached).read_text()))
    except (ModelFamilyError, OSError, ValueError):
        return None
    return None
