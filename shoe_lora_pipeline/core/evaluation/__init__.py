"""Evaluation of a trained LoRA against its base model (no Dagster here; the asset wraps :func:`evaluate`).

* :mod:`.generate` — same prompts and per-image seeds for base and LoRA.
* :mod:`.qa` — weight-free product-photo QA (white background, centring, single object, sharpness, colour
  adherence, diversity, memorisation).
* :mod:`.metrics` — FID (pytorch-fid), KID / IS / CLIP score (torchmetrics); local weights only, otherwise
  "unavailable" with the reason and the path looked for.
* :mod:`.checks` — the checklist: one table of checks (what, threshold field, comparison, severity).
* :mod:`.report` — ``metrics.json`` (``metrics.schema.json``), ``report.md``, ``report.html``.
* :mod:`.runner` — :func:`evaluate`, the one call the asset makes.

Importing this package loads none of its modules: each name is imported from its module on first use, so
the Dagster code location (which words the asset checks from :mod:`.checks`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CHECKS": "checks",
    "CheckOutcome": "checks",
    "CheckSpec": "checks",
    "EvaluationResult": "runner",
    "FeatureSet": "metrics",
    "GeneratedImage": "generate",
    "ImageQA": "qa",
    "MetricResult": "metrics",
    "MetricSuite": "metrics",
    "QASummary": "qa",
    "QAValue": "qa",
    "ReportPaths": "report",
    "SCHEMA_PATH": "report",
    "centring": "qa",
    "check_descriptions": "checks",
    "checklist": "checks",
    "colour_adherence": "qa",
    "compute_clip_score": "metrics",
    "compute_fid": "metrics",
    "compute_inception_score": "metrics",
    "compute_kid": "metrics",
    "default_inception_weights_path": "metrics",
    "diversity": "qa",
    "evaluate": "runner",
    "extract_features": "metrics",
    "generate_images": "generate",
    "image_qa": "qa",
    "image_seed": "generate",
    "inception_weights_path": "metrics",
    "load_fid_inception": "metrics",
    "load_local_clip": "metrics",
    "load_schema": "report",
    "metric_table_markdown": "report",
    "nearest_training_image": "qa",
    "prompt_colours": "qa",
    "qa_summary": "qa",
    "run_qa": "qa",
    "sharpness": "qa",
    "single_object": "qa",
    "white_background": "qa",
    "write_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
