"""Product renders: a specs sheet in, QA-ranked, reviewed and published product photos out (no Dagster here;
the ``renders`` assets and ``shoe-lora render`` wrap these calls).

* :mod:`.specs` — read and validate the specs sheet; refused rows with reasons.
* :mod:`.generate` — which LoRA and pipeline, seeds per (sku, index), batched generation, speed levers.
* :mod:`.ranking` — product QA per candidate (the evaluation stage's checks), score and rank.
* :mod:`.render` — :func:`render_sheet`: incremental rendering keyed by row hash + LoRA weights + settings.
* :mod:`.review` — ``reviews.csv`` (decisions keyed on the image), the approval rule, the HTML contact
  sheet: :func:`review_renders`.
* :mod:`.publish` — ``published/<sku>/`` with provenance in each PNG and a manifest: :func:`publish_renders`.
* :mod:`.pnginfo` — the A1111 ``parameters`` chunk and the JSON provenance chunk.
* :mod:`.store` — the folder layout and the records the stages share.
"""

from shoe_lora_pipeline.core.renders.generate import (
    LoraSource,
    RenderSourceError,
    candidate_seed,
    lora_source,
    pipeline_loader,
    render_dtype,
)
from shoe_lora_pipeline.core.renders.pnginfo import parse_a1111_parameters, read_png_provenance
from shoe_lora_pipeline.core.renders.publish import PublishResult, publish_renders
from shoe_lora_pipeline.core.renders.render import RenderRunResult, RenderSettings, render_sheet
from shoe_lora_pipeline.core.renders.review import ReviewResult, ReviewsError, review_renders
from shoe_lora_pipeline.core.renders.specs import (
    SpecsError,
    SpecsSheet,
    parse_specs_text,
    read_specs,
    spec_rules,
)
from shoe_lora_pipeline.core.renders.store import RenderPaths, RendersStateError

__all__ = [
    "LoraSource",
    "PublishResult",
    "RenderPaths",
    "RenderRunResult",
    "RenderSettings",
    "RenderSourceError",
    "RendersStateError",
    "ReviewResult",
    "ReviewsError",
    "SpecsError",
    "SpecsSheet",
    "candidate_seed",
    "lora_source",
    "parse_a1111_parameters",
    "parse_specs_text",
    "pipeline_loader",
    "publish_renders",
    "read_png_provenance",
    "read_specs",
    "render_dtype",
    "render_sheet",
    "review_renders",
    "spec_rules",
]
