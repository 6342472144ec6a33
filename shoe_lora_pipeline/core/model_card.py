"""Hugging Face model card (``README.md``) for an exported LoRA.

The YAML front matter follows the Hub's model-card metadata (``base_model``, ``library_name``, ``tags``,
``license``, ``instance_prompt``, ``widget``) and additionally carries the full provenance under the key
``shoe_lora`` so that ``shoe-lora audit README.md`` can read it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shoe_lora_pipeline.core.families import SD15, ModelFamily
from shoe_lora_pipeline.core.markdown import md_cell

TAGS = ["stable-diffusion", "lora", "text-to-image", "diffusers", "product-photography"]
# The Hub needs a license; which one applies depends on the training photos, so the user must choose.
LICENSE_LINE = "license: other  # TODO: choose a license (and add license_name / license_link for 'other')"
FRONT_MATTER_KEY = "shoe_lora"


class ModelCardError(ValueError):
    """A README.md has no readable front matter."""


@dataclass
class ModelCardInfo:
    """Everything the card states. Unknown numbers stay ``None`` and are shown as "n/a"."""

    dataset_name: str
    base_model: str
    base_model_revision: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    dropout: float = 0.0
    steps: int | None = None
    learning_rate: float | None = None
    lr_scheduler: str | None = None
    train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    resolution: int | None = None
    final_loss: float | None = None
    val_loss: float | None = None  # held-out validation loss at this step, when measured
    # min-SNR-γ, noise offset, input perturbation, caption dropout (None / 0 = off, as in the recipe)
    objective: dict[str, float | None] = field(default_factory=dict)
    num_train_images: int | None = None
    instance_prompt: str | None = None
    widget_prompts: list[str] = field(default_factory=list)
    # Names of the exported files, relative to the card's folder.
    peft_config_file: str = "adapter_config.json"
    peft_weights_file: str = "adapter_model.safetensors"
    diffusers_weights_file: str = "pytorch_lora_weights.safetensors"
    kohya_weights_file: str | None = None
    validation_grid_file: str | None = None
    file_sha256: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    family: ModelFamily = SD15  # of the base model: names the pipeline and the checkpoints it fits

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def front_matter(info: ModelCardInfo) -> dict[str, Any]:
    """The YAML metadata block (without the license line, which carries a comment)."""
    meta: dict[str, Any] = {
        "base_model": info.base_model,
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": list(TAGS),
    }
    if info.instance_prompt:
        meta["instance_prompt"] = info.instance_prompt
    if info.widget_prompts:
        widget = []
        for prompt in info.widget_prompts:
            item: dict[str, Any] = {"text": prompt}
            if info.validation_grid_file:
                item["output"] = {"url": info.validation_grid_file}
            widget.append(item)
        meta["widget"] = widget
    meta[FRONT_MATTER_KEY] = {
        "lora": {
            "rank": info.rank,
            "alpha": info.alpha,
            "scale": info.scale,
            "dropout": info.dropout,
            "target_modules": list(info.target_modules),
        },
        "provenance": info.provenance,
        "files": dict(info.file_sha256),
    }
    return meta


def render_model_card(info: ModelCardInfo) -> str:
    """The README.md text."""
    meta = yaml.safe_dump(front_matter(info), sort_keys=False, allow_unicode=True, width=1000)
    name = f"{info.dataset_name} LoRA"
    revision = f" (revision `{info.base_model_revision}`)" if info.base_model_revision else ""
    batch = (
        f"{info.train_batch_size} × {info.gradient_accumulation_steps} accumulation = "
        f"{info.train_batch_size * info.gradient_accumulation_steps}"
        if info.train_batch_size and info.gradient_accumulation_steps
        else "n/a"
    )
    kohya = info.kohya_weights_file or f"{info.dataset_name}_lora.safetensors"
    objective = " / ".join(
        _fmt(info.objective.get(k)) if info.objective.get(k) else "off"
        for k in ("snr_gamma", "noise_offset", "input_perturbation", "caption_dropout")
    )
    example_prompt = (
        info.widget_prompts[0]
        if info.widget_prompts
        else "A professional product photo of black casual shoes on white background, product photography"
    )

    lines = [
        "---",
        LICENSE_LINE,
        meta.rstrip("\n"),
        "---",
        "",
        f"# {name}",
        "",
        f"A LoRA adapter for **{info.base_model}**{revision} that produces e-commerce style product "
        f"photographs of shoes on a plain white background, trained on the `{info.dataset_name}` dataset "
        "by `shoe_lora_pipeline`. Only the UNet attention projections "
        f"({', '.join(f'`{m}`' for m in info.target_modules)}) are adapted; the text encoder is unchanged.",
        "",
        *(
            [f"Training captions follow the template `{info.instance_prompt}`.", ""]
            if info.instance_prompt
            else []
        ),
        "## Files",
        "",
        "| File | Format | Use with |",
        "|---|---|---|",
        f"| `{info.diffusers_weights_file}` | diffusers LoRA (keys `unet.…`, alpha in the header) "
        "| `pipe.load_lora_weights` |",
        f"| `{info.peft_config_file}` + `{info.peft_weights_file}` | PEFT adapter | `PeftModel.from_pretrained` |",
        f"| `{kohya}` | kohya-ss / A1111 (`lora_unet_…`, `.alpha`) | AUTOMATIC1111, ComfyUI, Forge, InvokeAI |",
        "",
        "## How to use",
        "",
        "### diffusers",
        "",
        "```python",
        "import torch",
        f"from diffusers import {info.family.text2img_pipeline}",
        "",
        f'pipe = {info.family.text2img_pipeline}.from_pretrained("{info.base_model}", torch_dtype=torch.float16)',
        f'pipe.load_lora_weights("path/to/this/folder", weight_name="{info.diffusers_weights_file}")',
        'pipe.to("cuda")',
        f'image = pipe("{example_prompt}", num_inference_steps=30, guidance_scale=7.5).images[0]',
        "```",
        "",
        "### PEFT",
        "",
        "```python",
        "from peft import PeftModel",
        "",
        'pipe.unet = PeftModel.from_pretrained(pipe.unet, "path/to/this/folder")',
        "```",
        "",
        "### AUTOMATIC1111 / ComfyUI",
        "",
        f"Copy `{kohya}` into `models/Lora/` (A1111) or `models/loras/` (ComfyUI) and use it with a "
        f"{info.family.title} checkpoint, e.g. `<lora:{Path(kohya).stem}:1>` in an A1111 prompt. The file stores "
        f"alpha = {_fmt(info.alpha)} with rank {info.rank}, so a weight of 1.0 reproduces the training "
        f"scale of {_fmt(info.scale)}.",
        "",
        "## Training",
        "",
        "| Setting | Value |",
        "|---|---|",
        f"| Base model | `{info.base_model}`{revision} |",
        f"| Steps | {_fmt(info.steps)} |",
        f"| LoRA rank / alpha (scale) | {info.rank} / {_fmt(info.alpha)} ({_fmt(info.scale)}) |",
        f"| LoRA dropout | {_fmt(info.dropout)} |",
        f"| Learning rate / schedule | {_fmt(info.learning_rate)} / {_fmt(info.lr_scheduler)} |",
        f"| Batch | {batch} |",
        f"| Resolution | {_fmt(info.resolution)} |",
        f"| Training images | {_fmt(info.num_train_images)} |",
        f"| Final training loss | {_fmt(info.final_loss)} |",
        f"| Validation loss (held-out split) | {_fmt(info.val_loss)} |",
        f"| Min-SNR-γ / noise offset / input perturbation / caption dropout | {objective} |",
        "",
    ]
    if info.validation_grid_file:
        lines += [
            "## Validation images",
            "",
            f"Validation grid at step {_fmt(info.steps)}:",
            "",
            f"![validation grid]({info.validation_grid_file})",
            "",
        ]
    lines += ["## Provenance", "", "| Key | Value |", "|---|---|"]
    for key, value in info.provenance.items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                lines.append(f"| {md_cell(f'{key}.{sub}')} | {md_cell(_fmt(subvalue))} |")
        else:
            lines.append(f"| {md_cell(key)} | {md_cell(_fmt(value))} |")
    for fname, digest in info.file_sha256.items():
        lines.append(f"| sha256 `{md_cell(fname)}` | `{digest}` |")
    lines += [
        "",
        "Read it back with `shoe-lora audit <file or folder>`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(path: Path, info: ModelCardInfo) -> Path:
    """Write README.md (``path`` may be the file or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "README.md"
    path.write_text(render_model_card(info), encoding="utf-8")
    return path


def read_front_matter(path: Path) -> dict[str, Any]:
    """Parse the YAML front matter of a model card."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---"):
        raise ModelCardError(f"{path}: no YAML front matter (the file does not start with '---')")
    end = text.find("\n---", 3)
    if end < 0:
        raise ModelCardError(f"{path}: YAML front matter is not closed by '---'")
    try:
        meta = yaml.safe_load(text[3:end])
    except yaml.YAMLError as exc:
        raise ModelCardError(f"{path}: front matter is not valid YAML: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelCardError(f"{path}: front matter is not a mapping")
    return meta
