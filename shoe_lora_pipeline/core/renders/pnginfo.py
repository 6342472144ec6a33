"""Provenance inside each rendered PNG.

* ``parameters``: the Automatic1111 convention that A1111's PNG Info, civitai and most image tools read::

      <prompt>
      Negative prompt: <negative prompt>
      Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 123, Size: 512x512, Model hash: …, Model: …,
      Lora hashes: "casual_shoes_lora: 0123456789ab", Version: shoe_lora_pipeline 0.1.0

  (one line after the negative prompt). Values with a comma, colon or quote are JSON-quoted as A1111 does.
  Prompts are single-line by construction (the specs sheet refuses control characters).
* ``shoe_lora_render``: one JSON object (ASCII-escaped, so always a plain ``tEXt`` chunk): the LoRA file's
  sha256, the config hash, the Dagster run ids, seed, prompt, QA, and the LoRA's own provenance record
  (whose ``dagster_run_id`` is what ``shoe-lora lineage`` follows back to the training photos).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PARAMETERS_KEY = "parameters"
RENDER_KEY = "shoe_lora_render"
RENDER_SCHEMA = "shoe_lora_pipeline/render/v1"


class PngProvenanceError(ValueError):
    """A PNG carries no render provenance; the message names the file."""


def a1111_quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def a1111_parameters(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    size: int,
    model_hash: str | None,
    model: str | None,
    lora_name: str,
    lora_hash: str,
    version: str | None = None,
    extra_fields: Sequence[tuple[str, Any]] = (),
) -> str:
    """``extra_fields`` (e.g. the hires pass's ``Denoising strength``, ``Hires upscale``, ``Hires steps``,
    ``Hires upscaler``) go after the model, where A1111 writes them."""
    fields: list[tuple[str, Any]] = [
        ("Steps", steps),
        ("Sampler", sampler),
        ("CFG scale", f"{cfg_scale:g}"),
        ("Seed", seed),
        ("Size", f"{size}x{size}"),
    ]
    if model_hash:
        fields.append(("Model hash", model_hash))
    if model:
        fields.append(("Model", model))
    fields += list(extra_fields)
    fields.append(("Lora hashes", f"{lora_name}: {lora_hash}"))
    if version:
        fields.append(("Version", version))
    line = ", ".join(f"{k}: {a1111_quote(v)}" for k, v in fields)
    return f"{prompt}\nNegative prompt: {negative_prompt}\n{line}"


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """The ``parameters`` text back as a dict: ``prompt``, ``negative_prompt`` and the settings line."""
    lines = text.split("\n")
    out: dict[str, str] = {"prompt": lines[0]}
    rest = lines[1:]
    if rest and rest[0].startswith("Negative prompt: "):
        out["negative_prompt"] = rest.pop(0)[len("Negative prompt: ") :]
    settings = "\n".join(rest)
    i = 0
    while i < len(settings):
        colon = settings.find(": ", i)
        if colon < 0:
            break
        key = settings[i:colon].strip(" ,")
        j = colon + 2
        if settings.startswith('"', j):
            value, end = json.JSONDecoder().raw_decode(settings, j)
        else:
            end = settings.find(", ", j)
            end = len(settings) if end < 0 else end
            value = settings[j:end]
        out[key] = str(value)
        i = end + 2 if end < len(settings) else end
    return out


def png_info(parameters: str, render: Mapping[str, Any] | None = None) -> Any:
    """A ``PngInfo`` with ``parameters`` (tEXt, or iTXt when the prompt is not Latin-1) and the JSON."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    if render is not None:
        info.add_text(RENDER_KEY, json.dumps(dict(render), sort_keys=True, ensure_ascii=True, default=str))
    return info


def read_png_provenance(path: Path) -> dict[str, Any]:
    """``{"parameters": str | None, "render": dict | None}`` from a PNG's text chunks."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            text = dict(getattr(im, "text", {}) or {})
    except (OSError, UnidentifiedImageError) as exc:
        raise PngProvenanceError(f"{path}: not a readable PNG: {exc}") from None
    render = None
    if RENDER_KEY in text:
        try:
            render = json.loads(text[RENDER_KEY])
        except ValueError:
            raise PngProvenanceError(f"{path}: the {RENDER_KEY} chunk is not valid JSON") from None
    return {"parameters": text.get(PARAMETERS_KEY), "render": render}
