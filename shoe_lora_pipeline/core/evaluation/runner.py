"""One-call evaluation: generate with base and LoRA (same prompts, same seeds), QA + metrics for both,
checklist, report. The Dagster asset calls :func:`evaluate`; nothing here imports Dagster.

Memory: pipelines given as folders are loaded one at a time and released after generating; a LoRA given
as a weights folder is loaded as an adapter onto the base pipeline after the base images are made, and
removed again afterwards, so only one UNet is ever resident.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from shoe_lora_pipeline.core.config import EvaluationConfig
from shoe_lora_pipeline.core.evaluation.generate import GeneratedImage, generate_images
from shoe_lora_pipeline.core.evaluation.metrics import MetricResult, MetricSuite
from shoe_lora_pipeline.core.evaluation.qa import QASummary, hash_folder, run_qa
from shoe_lora_pipeline.core.evaluation.report import (
    CheckOutcome,
    Findings,
    ReportPaths,
    checklist,
    metric_table_markdown,
    overall,
    write_report,
)
from shoe_lora_pipeline.core.run_artifacts import (
    VALIDATION_LOSS_NAME,
    read_validation_losses,
    validation_grids,
)

logger = logging.getLogger(__name__)
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
EVAL_ADAPTER = "evaluation_lora"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
PipelineSource = Any  # a diffusers text-to-image pipeline (SD1.5 or SDXL), or a folder (str / Path)
P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class EvaluationResult:
    out_dir: Path
    paths: ReportPaths
    metric_table_markdown: str
    checks: list[CheckOutcome]
    passed: bool  # no failed ERROR check
    n_errors: int
    n_warnings: int
    metrics_lora: dict[str, MetricResult]
    metrics_base: dict[str, MetricResult]
    qa_lora: QASummary
    qa_base: QASummary
    generated_lora: list[GeneratedImage]
    generated_base: list[GeneratedImage]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Plain values for Dagster metadata (wrap the markdown with MetadataValue.md, paths with .path)."""

        def value(m: MetricResult) -> float | str:
            return m.value if m.ok and m.value is not None else m.status

        return {
            "passed": self.passed,
            "errors": self.n_errors,
            "warnings": self.n_warnings,
            "failed_checks": [c.name for c in self.checks if not c.passed],
            "metrics_lora": {k: value(m) for k, m in self.metrics_lora.items()},
            "metrics_base": {k: value(m) for k, m in self.metrics_base.items()},
            "white_background_share": self.qa_lora.white_background_share,
            "centred_share": self.qa_lora.centred_share,
            "colour_respected_share": self.qa_lora.colour_respected_share,
            "min_diversity": self.qa_lora.min_diversity,
            "memorised": len(self.qa_lora.memorised),
            "report_html": str(self.paths.report_html),
            "metrics_json": str(self.paths.metrics_json),
            "seconds": round(self.seconds, 1),
        }


def _images_dir(split_dir: Path) -> Path:
    """``split/images`` when it exists, else the folder itself (accepts either form)."""
    split_dir = Path(split_dir)
    return split_dir / "images" if (split_dir / "images").is_dir() else split_dir


def list_images(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def is_lora_dir(path: Path) -> bool:
    return (Path(path) / LORA_WEIGHTS_NAME).is_file() and not (Path(path) / "model_index.json").is_file()


def load_pipeline(folder: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """A diffusers folder (e.g. ``final_pipeline/`` or the base model) as its family's text-to-image
    pipeline (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``)."""
    from shoe_lora_pipeline.core.pipelines import pipeline_from_folder

    pipe = pipeline_from_folder(Path(folder), None if dtype == torch.float32 else dtype)
    return pipe.to(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _preserving_global_rng(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` under ``torch.random.fork_rng``: evaluating (peft adapter init, KID/IS subset sampling)
    never shifts the caller's global RNG (generation itself uses its own CPU generators)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return wrapper


def _resolve_device(base: PipelineSource, device: str | torch.device | None) -> torch.device:
    """``device``, else the given base pipeline's, else the best available."""
    if device is None:
        existing = getattr(base, "device", None) if not isinstance(base, str | Path) else None
        if existing is not None:
            return torch.device(existing)
        from shoe_lora_pipeline.core.device import choose_device

        return torch.device(choose_device("auto").torch_device)
    return torch.device(device)


def _generation_kwargs(config: EvaluationConfig, side: int, out_dir: Path) -> dict[str, Any]:
    """The keyword arguments of :func:`generate_images`, the same for base and LoRA."""
    return {
        "prompts": list(config.prompts),
        "images_per_prompt": config.images_per_prompt,
        "seed": config.seed,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "height": side,
        "width": side,
        "out_dir": out_dir,
    }


def _generate_both(
    lora: PipelineSource,
    base: PipelineSource,
    dev: torch.device,
    dtype: torch.dtype,
    gen_kwargs: Mapping[str, Any],
    timings: dict[str, float],
    say: Callable[[str], None],
) -> tuple[list[GeneratedImage], list[GeneratedImage], str]:
    """(base images, LoRA images, the base's prediction_type): base first, then the LoRA — as an adapter on
    the base when given as a weights folder, else as its own pipeline once the base one is released."""
    n = len(gen_kwargs["prompts"]) * gen_kwargs["images_per_prompt"]
    t = time.perf_counter()
    base_pipe = load_pipeline(Path(base), dev, dtype) if isinstance(base, str | Path) else base
    side, steps = gen_kwargs["height"], gen_kwargs["num_inference_steps"]
    say(f"evaluation: generating {n} base images at {side}px, {steps} steps")
    generated_base = generate_images(base_pipe, tag="base", **gen_kwargs)
    from shoe_lora_pipeline.core.lora_io import base_objective  # the one reader of a scheduler's objective

    prediction_type = base_objective(base_pipe.scheduler.config).prediction_type
    timings["generate_base_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    say(f"evaluation: generating {n} LoRA images")
    if isinstance(lora, str | Path) and is_lora_dir(Path(lora)):
        from shoe_lora_pipeline.core.lora_io import check_lora_fits
        from shoe_lora_pipeline.core.pipelines import family_of_pipeline

        check_lora_fits(
            Path(lora), base_pipe.unet, family_of_pipeline(base_pipe), model=f"base {_describe(base)}"
        )
        base_pipe.load_lora_weights(str(lora), adapter_name=EVAL_ADAPTER)
        try:
            generated_lora = generate_images(base_pipe, tag="lora", **gen_kwargs)
        finally:
            base_pipe.delete_adapters(EVAL_ADAPTER)  # leave a caller's pipeline as it was given
        del base_pipe
    else:
        del base_pipe  # free the base UNet (when loaded here) before loading the LoRA pipeline
        _release(dev)
        lora_pipe = load_pipeline(Path(lora), dev, dtype) if isinstance(lora, str | Path) else lora
        generated_lora = generate_images(lora_pipe, tag="lora", **gen_kwargs)
        del lora_pipe
    _release(dev)
    timings["generate_lora_s"] = round(time.perf_counter() - t, 2)
    return generated_base, generated_lora, prediction_type


def _metrics_both(
    config: EvaluationConfig,
    reference: list[Path],
    generated: tuple[list[GeneratedImage], list[GeneratedImage]],
    dev: torch.device,
    feature_extractor: torch.nn.Module | None,
    clip_loader: Callable[[], tuple[Any, Any]] | None,
    say: Callable[[str], None],
) -> tuple[dict[str, MetricResult], dict[str, MetricResult]]:
    """(base metrics, LoRA metrics) against the ``reference`` images; the metric models are released after."""
    suite = MetricSuite(
        reference,
        inception_weights=config.inception_weights,
        clip_model_dir=config.clip_model_dir,
        feature_extractor=feature_extractor,
        clip_loader=clip_loader,
        reference_label=f"test split ({len(reference)} images)",
        device=dev,
    )
    metrics_base, metrics_lora = [
        suite.compute(
            [g.path for g in images],
            [g.prompt for g in images],
            label,
            group_ids=[g.prompt_index for g in images],
        )
        for images, label in zip(generated, ("base", "LoRA"), strict=True)
    ]
    del suite
    _release(dev)
    for name, m in metrics_lora.items():
        say(
            f"evaluation: {name} LoRA = {m.value if m.ok else m.status}"
            + (f" ({m.reason})" if m.reason else "")
        )
    return metrics_base, metrics_lora


def _pairs(
    generated_base: list[GeneratedImage], generated_lora: list[GeneratedImage]
) -> list[tuple[GeneratedImage, GeneratedImage]]:
    """(base, LoRA) generations of the same prompt and seed."""
    base_by_cell = {(g.prompt_index, g.image_index): g for g in generated_base}
    return [
        (base_by_cell[(g.prompt_index, g.image_index)], g)
        for g in generated_lora
        if (g.prompt_index, g.image_index) in base_by_cell
    ]


def _describe(source: PipelineSource) -> str:
    return str(source) if isinstance(source, str | Path) else type(source).__name__


@_preserving_global_rng
def evaluate(
    *,
    lora: PipelineSource,
    base: PipelineSource,
    config: EvaluationConfig,
    test_dir: Path,
    train_dir: Path,
    training_output_dir: Path,
    out_dir: Path | None = None,
    resolution: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    provenance: Mapping[str, Any] | None = None,
    feature_extractor: torch.nn.Module | None = None,
    clip_loader: Callable[[], tuple[Any, Any]] | None = None,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Evaluate a LoRA against its base model and write ``{training_output_dir}/evaluation/``.

    ``lora``: a pipeline, a full pipeline folder (``final_pipeline/``) or a LoRA weights folder
    (``lora_weights/``, loaded onto ``base``). ``base``: a pipeline or a diffusers folder. ``test_dir`` /
    ``train_dir``: dataset split folders (``…/test`` or ``…/test/images``). ``resolution`` is used when
    ``config.resolution`` is None (pass ``dataset.resolution``; default 512). ``device`` is used for
    pipelines loaded from folders and for the metric models (default: the pipeline's device, else auto).
    ``feature_extractor`` / ``clip_loader`` replace the Inception / CLIP models (tests).
    """
    say = log or logger.info
    started = time.perf_counter()
    timings: dict[str, float] = {}
    training_output_dir = Path(training_output_dir)
    out_dir = Path(out_dir) if out_dir is not None else training_output_dir / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    side = int(config.resolution or resolution or 512)
    dev = _resolve_device(base, device)
    gen_kwargs = _generation_kwargs(config, side, out_dir / "images")
    generated_base, generated_lora, prediction_type = _generate_both(
        lora, base, dev, dtype, gen_kwargs, timings, say
    )

    # ---- QA (weight-free)
    t = time.perf_counter()
    train_hashes = hash_folder(_images_dir(train_dir)) if _images_dir(train_dir).is_dir() else {}
    min_hamming = config.thresholds.diversity_min_hamming
    qa_base = run_qa(generated_base, config.prompts, min_hamming, train_hashes)
    qa_lora = run_qa(generated_lora, config.prompts, min_hamming, train_hashes)
    timings["qa_s"] = round(time.perf_counter() - t, 2)

    # ---- metrics (Inception / CLIP weights when present; unavailable otherwise)
    t = time.perf_counter()
    reference = list_images(_images_dir(test_dir))
    metrics_base, metrics_lora = _metrics_both(
        config, reference, (generated_base, generated_lora), dev, feature_extractor, clip_loader, say
    )
    timings["metrics_s"] = round(time.perf_counter() - t, 2)

    # ---- checklist + report
    summary = _read_json(training_output_dir / "training_summary.json")
    losses = training_output_dir / "losses.csv"
    checks = checklist(
        metrics_lora,
        qa_lora,
        summary,
        config.thresholds,
        prediction_type=prediction_type,
        validation_losses=read_validation_losses(training_output_dir / VALIDATION_LOSS_NAME),
        qa_base=qa_base,
    )
    settings = {
        "prompts": list(config.prompts),
        "images_per_prompt": config.images_per_prompt,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "seed": config.seed,
        "resolution": side,
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "lora": _describe(lora),
        "base": _describe(base),
        "test_dir": str(test_dir),
        "train_dir": str(train_dir),
        "n_reference": len(reference),
        "n_train_hashed": len(train_hashes),
        "timings": timings,
    }
    paths = write_report(
        out_dir,
        metrics_lora=metrics_lora,
        metrics_base=metrics_base,
        qa_lora=qa_lora,
        qa_base=qa_base,
        thresholds=config.thresholds,
        losses_csv=losses if losses.is_file() else None,
        validation_grids=validation_grids(training_output_dir),
        base_vs_lora_pairs=_pairs(generated_base, generated_lora),
        provenance=provenance,
        training_summary=summary,
        checks=checks,
        settings=settings,
    )
    verdict = overall(checks)
    seconds = time.perf_counter() - started
    say(
        f"evaluation: {'passed' if verdict['passed'] else 'FAILED'} ({verdict['errors']} errors, "
        f"{verdict['warnings']} warnings) in {seconds:.1f}s; report {paths.report_html}"
    )
    return EvaluationResult(
        out_dir=out_dir,
        paths=paths,
        metric_table_markdown=metric_table_markdown(
            Findings(metrics_lora, metrics_base, qa_lora, qa_base, config.thresholds, checks, summary)
        ),
        checks=checks,
        passed=verdict["passed"],
        n_errors=verdict["errors"],
        n_warnings=verdict["warnings"],
        metrics_lora=metrics_lora,
        metrics_base=metrics_base,
        qa_lora=qa_lora,
        qa_base=qa_base,
        generated_lora=generated_lora,
        generated_base=generated_base,
        seconds=seconds,
        timings=timings,
    )
