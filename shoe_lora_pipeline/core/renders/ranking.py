"""Score and rank render candidates with the weight-free product QA of the evaluation stage.

A candidate **passes** when it has a white background, a centred product, a single object that fills the
frame sensibly (the QA's fill check) and the spec's
colour (a colour word without palette prototypes, e.g. "multicolour", is not scored and does not fail).
Sharpness is measured and adds to the score but gates nothing, as in the evaluation checklist.

The **score** (0–1) is the mean of one sub-score per check, so candidates that fail can still be ordered:
white border share; centring 1 at the centre falling to 0 at twice the allowed offset; single object and
fill 1 or 0; sharpness relative to its threshold (capped at 1); colour 1 when it passes, else falling with ΔE76.
Ranking: passing first, then higher score, then lower candidate index (stable across re-runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoe_lora_pipeline.core.evaluation.qa import (
    CENTRE_OFFSET_MAX,
    COLOUR_DELTA_E_MAX,
    SHARPNESS_MIN,
    image_qa,
)

if TYPE_CHECKING:
    from PIL import Image

GATING_CHECKS = ("white_background", "centring", "single_object", "fill", "colour")


@dataclass(frozen=True)
class CandidateQA:
    passed: bool
    score: float
    failed: tuple[str, ...]
    checks: dict[str, Any]  # check → {"value", "passed", "score", "details"}

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "score": self.score,
            "failed": list(self.failed),
            "checks": self.checks,
        }


def _clip01(x: float) -> float:
    return max(0.0, min(1.0, x))


def score_candidate(image: Image.Image, colour: str) -> CandidateQA:
    """QA one candidate against the spec's ``colour`` (the colour words are read as in prompts)."""
    qa = image_qa(image, colour)
    sub: dict[str, float | None] = {
        "white_background": _clip01(qa.white_background.value or 0.0),
        "centring": 0.0
        if qa.centring.value is None
        else _clip01(1 - qa.centring.value / (2 * CENTRE_OFFSET_MAX)),
        "single_object": 1.0 if qa.single_object.passed else 0.0,
        "fill": 1.0 if qa.fill.passed else 0.0,
        "sharpness": 0.0 if qa.sharpness.value is None else _clip01(qa.sharpness.value / SHARPNESS_MIN),
        "colour": None
        if qa.colour.passed is None
        else 1.0
        if qa.colour.passed
        else _clip01(1 - (qa.colour.value or 0.0) / (4 * COLOUR_DELTA_E_MAX)),
    }
    checks: dict[str, Any] = {}
    for name in ("white_background", "centring", "single_object", "fill", "sharpness", "colour"):
        value = getattr(qa, name)
        checks[name] = {
            "value": value.value,
            "passed": value.passed,
            "score": None if sub[name] is None else round(sub[name], 4),
            "details": value.details,
        }
    failed = tuple(n for n in GATING_CHECKS if checks[n]["passed"] is False)
    scored = [s for s in sub.values() if s is not None]
    return CandidateQA(
        passed=not failed, score=round(sum(scored) / len(scored), 4), failed=failed, checks=checks
    )


def rank_key(candidate: dict[str, Any]) -> tuple[bool, float, int]:
    """Sort key of a candidate record ``{"index", "qa": {"passed", "score"}}``: best first."""
    return (not candidate["qa"]["passed"], -candidate["qa"]["score"], candidate["index"])


def ranked(candidates: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Candidates best first, each with its 1-based ``rank``."""
    out = sorted(candidates, key=rank_key)
    return [{**c, "rank": i} for i, c in enumerate(out, 1)]
