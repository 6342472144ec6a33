"""The recipe's validation checklist, as one table: :data:`CHECKS` names each check, what it measures, the
``evaluation.thresholds`` field it is held to and how it compares. :func:`checklist` evaluates it, and
:func:`check_descriptions` words it for the Dagster asset checks, so both follow the configured numbers.

Severities (a failed ERROR check fails the evaluation; WARN is shown but does not):

* ERROR — white background, centring, colour adherence, no mode collapse: measured on every generation by
  deterministic weight-free code, so a failure is a real defect of what the LoRA produces for a catalogue.
* WARN — FID, CLIP score, Inception Score: on a few dozen images they are biased and noisy and their
  thresholds come from large-sample literature; final loss: the diffusion MSE depends mostly on the sampled
  noise levels, not on image quality (and its scale on the objective: ``final_loss_max`` is an epsilon-
  prediction number; for a v-prediction base the check asks instead that the held-out validation loss fell
  over the run, ``final_val_loss_ratio_max``); memorisation (an addition to the recipe's checklist): needs a look,
  not an automatic rejection.
* A check whose metric is unavailable never passes: ``passed`` False, severity WARN, status
  "unavailable", and the reason says why (e.g. which weights file was looked for).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shoe_lora_pipeline.core.config import EvaluationThresholds

if TYPE_CHECKING:
    from shoe_lora_pipeline.core.evaluation.metrics import MetricResult
    from shoe_lora_pipeline.core.evaluation.qa import QASummary

Severity = Literal["WARN", "ERROR"]
CheckStatus = Literal["pass", "fail", "unavailable"]
Comparator = Literal["<", ">", ">=", "<="]


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    severity: Severity
    value: float | None
    threshold: float
    reason: str
    status: CheckStatus = "fail"
    comparator: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Inputs:
    """What the checks are measured on."""

    metrics: Mapping[str, MetricResult]
    qa: QASummary | None
    training_summary: Mapping[str, Any] | None
    # The base model's objective (its scheduler's prediction_type) and the run's validation_loss.csv rows.
    prediction_type: str = "epsilon"
    validation_losses: Sequence[Mapping[str, Any]] = ()
    qa_base: QASummary | None = None  # the base model's generations (same prompts and seeds), for context


@dataclass(frozen=True)
class Measured:
    """One check's measurement: ``value`` None = unavailable (``why`` says why); ``detail`` is appended to
    the comparison in the reason, ``reason`` replaces the whole reason."""

    value: float | None
    why: str = ""
    detail: str = ""
    reason: str | None = None
    # an EvaluationThresholds field to compare with instead of the spec's, for a check whose measure
    # depends on the run (final_loss of a v-prediction base)
    threshold_field: str | None = None


@dataclass(frozen=True)
class CheckSpec:
    name: str
    measures: str  # what the check measures, for people (asset check description)
    threshold_field: str | None  # EvaluationThresholds field; None = the fixed ``threshold``
    comparator: Comparator
    severity: Severity  # what a failure means (also reported when it passes)
    measure: Callable[[Inputs], Measured]
    kind: Literal["num", "share"] = "num"  # how the threshold reads: 0.95 → "95%" for shares
    threshold: float = 0.0
    # The field a run-dependent measure compares with instead (Measured.threshold_field): final_loss of a
    # v-prediction base model.
    alt_threshold_field: str | None = None

    def threshold_of(self, thresholds: EvaluationThresholds) -> float:
        return float(getattr(thresholds, self.threshold_field)) if self.threshold_field else self.threshold

    def limit_text(self, thresholds: EvaluationThresholds) -> str:
        """The comparison for people: ``< 30``, ``>= 95%``."""
        t = self.threshold_of(thresholds)
        return f"{self.comparator} {t:.0%}" if self.kind == "share" else f"{self.comparator} {t:g}"

    def description(self, thresholds: EvaluationThresholds) -> str:
        source = f" (evaluation.thresholds.{self.threshold_field})" if self.threshold_field else ""
        return (
            f"{self.measures}: {self.limit_text(thresholds)}{source}. "
            f"{self.severity} when it fails; unavailable never passes."
        )


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------

_NO_QA = "no QA results"


def training_loss(training_summary: Mapping[str, Any] | None) -> tuple[float | None, str]:
    """(loss the checklist uses, which one): the smoothed (EMA) loss when recorded, else the last step's."""
    if not training_summary:
        return None, "no training_summary.json"
    for key in ("smoothed_loss", "final_loss"):
        v = training_summary.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return float(v), key
    return None, "training_summary.json records no final/smoothed loss"


def _final_loss(x: Inputs) -> Measured:
    if x.prediction_type != "epsilon":
        return _val_loss_ratio(x)
    loss, which = training_loss(x.training_summary)
    return Measured(loss, which, f"({which})" if loss is not None else "")


def _val_loss_ratio(x: Inputs) -> Measured:
    """For a non-epsilon objective: last / first held-out validation loss of the run.

    The v-prediction MSE has another scale than the epsilon one (its target keeps unit variance at every
    noise level, so even a good model's loss stays near 0.1-0.3 at SD's latent scale), so no absolute number
    like ``final_loss_max`` (0.02, an epsilon-prediction figure) means "trained". What does is the run against
    its own start, on fixed noise and timesteps: the validation loss (validation_loss.csv, measured every
    training.validation_steps: its first row against its last)."""
    rows = [r for r in x.validation_losses if isinstance(r.get("val_loss"), int | float)]
    if len(rows) < 2:
        return Measured(
            None,
            f"{x.prediction_type} objective: final_loss_max is an epsilon-prediction number, and the run "
            "recorded fewer than two validation losses to compare (training.validation_steps, a val split)",
        )
    first, last = rows[0], rows[-1]
    ratio = float(last["val_loss"]) / float(first["val_loss"]) if first["val_loss"] else float("nan")
    return Measured(
        ratio,
        detail=f"{x.prediction_type} objective: validation loss {first['val_loss']:.4f} at step {first['step']} "
        f"→ {last['val_loss']:.4f} at step {last['step']} (last / first)",
        threshold_field="final_val_loss_ratio_max",
    )


def _qa_share(attr: str, detail: str) -> Callable[[Inputs], Measured]:
    def measure(x: Inputs) -> Measured:
        if x.qa is None:
            return Measured(None, _NO_QA)
        return Measured(getattr(x.qa, attr), "no images", detail)

    return measure


def _colour(x: Inputs) -> Measured:
    if x.qa is None:
        return Measured(None, _NO_QA)
    return Measured(
        x.qa.colour_respected_share,
        "no prompt names a scorable colour",
        f"share of {x.qa.n_colour_scored} colour-prompted generations matching the colour",
    )


def _diversity(x: Inputs) -> Measured:
    if x.qa is None:
        return Measured(None, _NO_QA)
    collapse = x.qa.mode_collapse_prompts
    detail = f"mode collapse in prompt(s) {collapse}" if collapse else ""
    return Measured(
        x.qa.min_diversity,
        "needs >= 2 images per prompt",
        detail or "lowest mean pHash distance within a prompt",
    )


def _metric(name: str, detail: str = "") -> Callable[[Inputs], Measured]:
    def measure(x: Inputs) -> Measured:
        m = x.metrics.get(name)
        if m is None:
            return Measured(None, f"{name} was not computed")
        if not m.ok:
            return Measured(
                None, (m.reason or m.status) if m.status == "unavailable" else f"{m.status}: {m.reason}"
            )
        return Measured(m.value, detail=detail)

    return measure


def _memorisation(x: Inputs) -> Measured:
    if x.qa is None:
        return Measured(None, _NO_QA)
    n_mem, distance = len(x.qa.memorised), x.qa.memorisation_max_distance
    # The base model never saw the training photos: its count is what pHash finds without any copying
    # (the layout every centred product shot on a plain backdrop shares), to read the LoRA's against.
    base = "" if x.qa_base is None else f"; the base model on the same seeds: {len(x.qa_base.memorised)}"
    if n_mem == 0:
        return Measured(
            0.0, reason=f"no generation within pHash distance {distance} of a training image{base}"
        )
    examples = ", ".join(f"{Path(m['image']).name}≈{m['nearest_train']}" for m in x.qa.memorised[:5])
    return Measured(
        float(n_mem),
        reason=f"{n_mem} generation(s) within pHash distance {distance} of a training image (near-copies): "
        + examples
        + base,
    )


# The checklist, in report order.
CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec(
        "final_loss",
        # Names the number it compares: lora_training shows final_loss (the last step's) and smoothed_loss.
        "lora_training's smoothed_loss (EMA of the per-step losses; its final_loss, the last step's, when "
        "no EMA was recorded); for a v-prediction base model, whose loss has another scale, the run's last "
        "validation loss over its first instead (evaluation.thresholds.final_val_loss_ratio_max)",
        "final_loss_max",
        "<",
        "WARN",
        _final_loss,
        alt_threshold_field="final_val_loss_ratio_max",
    ),
    CheckSpec(
        "white_background",
        "Share of LoRA generations whose border is near-white",
        "white_background_min",
        ">=",
        "ERROR",
        _qa_share("white_background_share", "share of generations whose border is near-white"),
        kind="share",
    ),
    CheckSpec(
        "centred",
        "Share of LoRA generations with the product centred",
        "centred_min",
        ">=",
        "ERROR",
        _qa_share("centred_share", "share of generations with the product centred"),
        kind="share",
    ),
    CheckSpec(
        "colour_adherence",
        "Share of colour-prompted LoRA generations whose product colour matches the prompt's colour",
        "colour_adherence_min",
        ">=",
        "ERROR",
        _colour,
        kind="share",
    ),
    CheckSpec(
        "no_mode_collapse",
        "Images of the same prompt differ: lowest mean pHash distance within a prompt (bits)",
        "diversity_min_hamming",
        ">=",
        "ERROR",
        _diversity,
    ),
    CheckSpec(
        "fid",
        "FID of the LoRA generations against the held-out test split (needs Inception weights)",
        "fid_max",
        "<",
        "WARN",
        _metric("fid", "small-sample estimate"),
    ),
    CheckSpec(
        "clip_score",
        "CLIP score of the LoRA generations against their prompts (needs a local CLIP model)",
        "clip_score_min",
        ">",
        "WARN",
        _metric("clip_score"),
    ),
    CheckSpec(
        "inception_score",
        "Inception Score of the LoRA generations (needs Inception weights)",
        "inception_score_min",
        ">",
        "WARN",
        _metric("inception_score", "small-sample estimate"),
    ),
    CheckSpec(
        "no_memorisation",
        "LoRA generations that are near-copies of a training image (pHash)",
        None,
        "<=",
        "WARN",
        _memorisation,
        threshold=0.0,
    ),
)
CHECKS_BY_NAME = {spec.name: spec for spec in CHECKS}


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<": lambda v, t: v < t,
    ">": lambda v, t: v > t,
    ">=": lambda v, t: v >= t,
    "<=": lambda v, t: v <= t,
}


def evaluate_check(spec: CheckSpec, measured: Measured, thresholds: EvaluationThresholds) -> CheckOutcome:
    threshold = spec.threshold_of(thresholds)
    if measured.threshold_field is not None:
        assert measured.threshold_field == spec.alt_threshold_field, (spec.name, measured.threshold_field)
        threshold = float(getattr(thresholds, measured.threshold_field))
    value = measured.value
    if value is None or not math.isfinite(value):
        reason = f"unavailable: {measured.why}"
        return CheckOutcome(spec.name, False, "WARN", None, threshold, reason, "unavailable", spec.comparator)
    ok = _COMPARE[spec.comparator](float(value), threshold)
    if measured.reason is not None:
        text = measured.reason
    else:
        text = f"{value:.4g} {'' if ok else 'is not '}{spec.comparator} {threshold:g}"
        if measured.detail:
            text += f"; {measured.detail}"
    status: CheckStatus = "pass" if ok else "fail"
    return CheckOutcome(spec.name, ok, spec.severity, float(value), threshold, text, status, spec.comparator)


def checklist(
    metrics: Mapping[str, MetricResult],
    qa: QASummary | None,
    training_summary: Mapping[str, Any] | None,
    thresholds: EvaluationThresholds,
    *,
    prediction_type: str = "epsilon",
    validation_losses: Sequence[Mapping[str, Any]] = (),
    qa_base: QASummary | None = None,
) -> list[CheckOutcome]:
    """Every check of :data:`CHECKS` on the LoRA's metrics, QA and training summary, in table order.
    ``prediction_type``: the base model's objective; ``validation_losses``: the run's validation_loss.csv;
    ``qa_base``: the base model's QA on the same prompts and seeds (context for the memorisation check)."""
    inputs = Inputs(metrics, qa, training_summary, prediction_type, validation_losses, qa_base)
    return [evaluate_check(spec, spec.measure(inputs), thresholds) for spec in CHECKS]


def overall(checks: Sequence[CheckOutcome]) -> dict[str, Any]:
    errors = [c.name for c in checks if not c.passed and c.severity == "ERROR"]
    warnings = [c.name for c in checks if not c.passed and c.severity == "WARN"]
    return {
        "passed": not errors,
        "errors": len(errors),
        "warnings": len(warnings),
        "failed_checks": errors + warnings,
    }


def check_descriptions(thresholds: EvaluationThresholds) -> dict[str, str]:
    """Check name → description with the configured threshold (for Dagster's asset check specs)."""
    return {spec.name: spec.description(thresholds) for spec in CHECKS}
