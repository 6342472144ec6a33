"""Evaluation of a trained LoRA against its base model (no Dagster here; the asset wraps :func:`evaluate`).

* :mod:`.generate` — same prompts and per-image seeds for base and LoRA.
* :mod:`.qa` — weight-free product-photo QA (white background, centring, single object, sharpness, colour
  adherence, diversity, memorisation).
* :mod:`.metrics` — FID (pytorch-fid), KID / IS / CLIP score (torchmetrics); local weights only, otherwise
  "unavailable" with the reason and the path looked for.
* :mod:`.checks` — the checklist: one table of checks (what, threshold field, comparison, severity).
* :mod:`.report` — ``metrics.json`` (``metrics.schema.json``), ``report.md``, ``report.html``.
* :mod:`.runner` — :func:`evaluate`, the one call the asset makes.
"""

from shoe_lora_pipeline.core.evaluation.checks import (
    CHECKS,
    CheckOutcome,
    CheckSpec,
    check_descriptions,
    checklist,
)
from shoe_lora_pipeline.core.evaluation.generate import GeneratedImage, generate_images, image_seed
from shoe_lora_pipeline.core.evaluation.metrics import (
    FeatureSet,
    MetricResult,
    MetricSuite,
    compute_clip_score,
    compute_fid,
    compute_inception_score,
    compute_kid,
    default_inception_weights_path,
    extract_features,
    inception_weights_path,
    load_fid_inception,
    load_local_clip,
)
from shoe_lora_pipeline.core.evaluation.qa import (
    ImageQA,
    QASummary,
    QAValue,
    centring,
    colour_adherence,
    diversity,
    image_qa,
    nearest_training_image,
    prompt_colours,
    qa_summary,
    run_qa,
    sharpness,
    single_object,
    white_background,
)
from shoe_lora_pipeline.core.evaluation.report import (
    SCHEMA_PATH,
    ReportPaths,
    load_schema,
    metric_table_markdown,
    write_report,
)
from shoe_lora_pipeline.core.evaluation.runner import EvaluationResult, evaluate

__all__ = [
    "CHECKS",
    "SCHEMA_PATH",
    "CheckOutcome",
    "CheckSpec",
    "EvaluationResult",
    "FeatureSet",
    "GeneratedImage",
    "ImageQA",
    "MetricResult",
    "MetricSuite",
    "QASummary",
    "QAValue",
    "ReportPaths",
    "centring",
    "check_descriptions",
    "checklist",
    "colour_adherence",
    "compute_clip_score",
    "compute_fid",
    "compute_inception_score",
    "compute_kid",
    "default_inception_weights_path",
    "diversity",
    "evaluate",
    "extract_features",
    "generate_images",
    "image_qa",
    "image_seed",
    "inception_weights_path",
    "load_fid_inception",
    "load_local_clip",
    "load_schema",
    "metric_table_markdown",
    "nearest_training_image",
    "prompt_colours",
    "qa_summary",
    "run_qa",
    "sharpness",
    "single_object",
    "white_background",
    "write_report",
]
