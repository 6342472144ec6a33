"""Evaluation report: the checklist, ``metrics.json`` (+ JSON Schema), ``report.md`` and a self-contained
``report.html`` (images inlined as base64 data URIs, inline CSS, no scripts, nothing external).

Checklist severities (a failed ERROR check fails the evaluation; WARN is shown but does not):

* ERROR — white background, centring, colour adherence, no mode collapse: measured on every generation by
  deterministic weight-free code, so a failure is a real defect of what the LoRA produces for a catalogue.
* WARN — FID, CLIP score, Inception Score: on a few dozen images they are biased and noisy and their
  thresholds come from large-sample literature; final loss: the diffusion MSE depends mostly on the sampled
  noise levels, not on image quality; memorisation (an addition to the seed's checklist): needs a look,
  not an automatic rejection.
* A check whose metric is unavailable never passes: ``passed`` False, severity WARN, status
  "unavailable", and the reason says why (e.g. which weights file was looked for).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from shoe_lora_pipeline.core.config import EvaluationThresholds
from shoe_lora_pipeline.core.evaluation.generate import GeneratedImage
from shoe_lora_pipeline.core.evaluation.metrics import (
    CLIP_SCORE_NOTE,
    FID_SMALL_SAMPLE_NOTE,
    INCEPTION_WEIGHTS_FILE,
    METRIC_INFO,
    MetricResult,
)
from shoe_lora_pipeline.core.evaluation.qa import QASummary

SCHEMA_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).with_name("metrics.schema.json")
COMPARISON_CELL = 256  # px per image in the base-vs-LoRA grids
HTML_MAX_WIDTH = 1024  # px: inlined images are downscaled to this width at most
EMA_DECAY = 0.9  # same smoothing as training's smoothed_loss

Severity = Literal["WARN", "ERROR"]
CheckStatus = Literal["pass", "fail", "unavailable"]


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


@dataclass
class ReportPaths:
    out_dir: Path
    metrics_json: Path
    report_md: Path
    report_html: Path
    loss_curve_png: Path | None = None
    comparison_grids: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Checklist
# ----------------------------------------------------------------------------------------------


def _compare(value: float, comparator: str, threshold: float) -> bool:
    return {"<": value < threshold, ">": value > threshold, ">=": value >= threshold}[comparator]


def _check(
    name: str,
    value: float | None,
    comparator: str,
    threshold: float,
    fail_severity: Severity,
    unavailable_reason: str,
    detail: str = "",
) -> CheckOutcome:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return CheckOutcome(
            name,
            False,
            "WARN",
            None,
            threshold,
            f"unavailable: {unavailable_reason}",
            "unavailable",
            comparator,
        )
    ok = _compare(float(value), comparator, threshold)
    text = (
        f"{value:.4g} {comparator} {threshold:g}" if ok else f"{value:.4g} is not {comparator} {threshold:g}"
    )
    if detail:
        text += f"; {detail}"
    # severity is the check's class (what a failure means), also reported when it passes.
    return CheckOutcome(
        name, ok, fail_severity, float(value), threshold, text, "pass" if ok else "fail", comparator
    )


def _metric_value(metrics: Mapping[str, MetricResult], name: str) -> tuple[float | None, str]:
    m = metrics.get(name)
    if m is None:
        return None, f"{name} was not computed"
    if not m.ok:
        return None, (m.reason or m.status) if m.status == "unavailable" else f"{m.status}: {m.reason}"
    return m.value, ""


def training_loss(training_summary: Mapping[str, Any] | None) -> tuple[float | None, str]:
    """(loss the checklist uses, which one): the smoothed (EMA) loss when recorded, else the last step's."""
    if not training_summary:
        return None, "no training_summary.json"
    for key in ("smoothed_loss", "final_loss"):
        v = training_summary.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return float(v), key
    return None, "training_summary.json records no final/smoothed loss"


def checklist(
    metrics: Mapping[str, MetricResult],
    qa: QASummary | None,
    training_summary: Mapping[str, Any] | None,
    thresholds: EvaluationThresholds,
) -> list[CheckOutcome]:
    """The seed's checklist on the LoRA's metrics and QA (plus a memorisation WARN); see module doc."""
    t = thresholds
    checks: list[CheckOutcome] = []
    loss, which = training_loss(training_summary)
    checks.append(
        _check("final_loss", loss, "<", t.final_loss_max, "WARN", which, f"({which})" if loss else "")
    )
    no_qa = "no QA results"
    checks.append(
        _check(
            "white_background",
            qa.white_background_share if qa else None,
            ">=",
            t.white_background_min,
            "ERROR",
            "no images" if qa else no_qa,
            "share of generations whose border is near-white",
        )
    )
    checks.append(
        _check(
            "centred",
            qa.centred_share if qa else None,
            ">=",
            t.centred_min,
            "ERROR",
            "no images" if qa else no_qa,
            "share of generations with the product centred",
        )
    )
    checks.append(
        _check(
            "colour_adherence",
            qa.colour_respected_share if qa else None,
            ">=",
            t.colour_adherence_min,
            "ERROR",
            "no prompt names a scorable colour" if qa else no_qa,
            f"share of {qa.n_colour_scored if qa else 0} colour-prompted generations matching the colour",
        )
    )
    collapse = (
        f"mode collapse in prompt(s) {qa.mode_collapse_prompts}" if qa and qa.mode_collapse_prompts else ""
    )
    checks.append(
        _check(
            "no_mode_collapse",
            qa.min_diversity if qa else None,
            ">=",
            t.diversity_min_hamming,
            "ERROR",
            "needs >= 2 images per prompt" if qa else no_qa,
            collapse or "lowest mean pHash distance within a prompt",
        )
    )
    for name, comparator, threshold in (
        ("fid", "<", t.fid_max),
        ("clip_score", ">", t.clip_score_min),
        ("inception_score", ">", t.inception_score_min),
    ):
        value, why = _metric_value(metrics, name)
        detail = "small-sample estimate" if name != "clip_score" else ""
        checks.append(_check(name, value, comparator, threshold, "WARN", why, detail))
    if qa is not None:
        n_mem = len(qa.memorised)
        checks.append(
            CheckOutcome(
                "no_memorisation",
                n_mem == 0,
                "WARN",
                float(n_mem),
                0.0,
                f"no generation within pHash distance {qa.memorisation_max_distance} of a training image"
                if n_mem == 0
                else f"{n_mem} generation(s) within pHash distance {qa.memorisation_max_distance} of a "
                "training image (near-copies): "
                + ", ".join(f"{Path(m['image']).name}≈{m['nearest_train']}" for m in qa.memorised[:5]),
                "pass" if n_mem == 0 else "fail",
                "<=",
            )
        )
    return checks


def overall(checks: Sequence[CheckOutcome]) -> dict[str, Any]:
    errors = [c.name for c in checks if not c.passed and c.severity == "ERROR"]
    warnings = [c.name for c in checks if not c.passed and c.severity == "WARN"]
    return {
        "passed": not errors,
        "errors": len(errors),
        "warnings": len(warnings),
        "failed_checks": errors + warnings,
    }


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------


def _fmt(value: float | None, kind: str = "num") -> str:
    if value is None:
        return "—"
    if kind == "share":
        return f"{100 * value:.0f}%"
    if kind == "small":
        return f"{value:.4f}"
    if kind == "int":
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"


def _metric_cell(m: MetricResult | None, kind: str = "num") -> str:
    if m is None:
        return "—"
    if not m.ok:
        return m.status
    text = _fmt(m.value, kind)
    if m.name == "kid" and m.extras.get("kid_std") is not None:
        text += f" ± {_fmt(m.extras['kid_std'], 'small')}"
    return text


def _check_cell(check: CheckOutcome | None) -> str:
    if check is None:
        return ""
    if check.status == "unavailable":
        return "unavailable (WARN)"
    return "pass" if check.passed else f"FAIL ({check.severity})"


def metric_rows(
    metrics_lora: Mapping[str, MetricResult],
    metrics_base: Mapping[str, MetricResult],
    qa_lora: QASummary | None,
    qa_base: QASummary | None,
    checks: Sequence[CheckOutcome],
    thresholds: EvaluationThresholds,
    training_summary: Mapping[str, Any] | None = None,
) -> list[list[str]]:
    """Rows [metric, base, LoRA, threshold, LoRA check] shared by the markdown and HTML tables."""
    by_name = {c.name: c for c in checks}
    t = thresholds
    rows: list[list[str]] = []
    kinds = {"fid": "num", "kid": "small", "inception_score": "num", "clip_score": "num"}
    limits = {
        "fid": f"< {t.fid_max:g}",
        "kid": "(lower is better)",
        "inception_score": f"> {t.inception_score_min:g}",
        "clip_score": f"> {t.clip_score_min:g}",
    }
    for name, (label, higher) in METRIC_INFO.items():
        arrow = "↑" if higher else "↓"
        rows.append(
            [
                f"{label} {arrow}",
                _metric_cell(metrics_base.get(name), kinds[name]),
                _metric_cell(metrics_lora.get(name), kinds[name]),
                limits[name],
                _check_cell(by_name.get(name)),
            ]
        )

    def qa_row(label: str, attr: str, kind: str, limit: str, check: str) -> None:
        rows.append(
            [
                label,
                _fmt(getattr(qa_base, attr), kind) if qa_base else "—",
                _fmt(getattr(qa_lora, attr), kind) if qa_lora else "—",
                limit,
                _check_cell(by_name.get(check)),
            ]
        )

    qa_row(
        "White background ↑",
        "white_background_share",
        "share",
        f">= {t.white_background_min:.0%}",
        "white_background",
    )
    qa_row("Centred ↑", "centred_share", "share", f">= {t.centred_min:.0%}", "centred")
    qa_row(
        "Colour respected ↑",
        "colour_respected_share",
        "share",
        f">= {t.colour_adherence_min:.0%}",
        "colour_adherence",
    )
    qa_row(
        "Min diversity (pHash bits) ↑",
        "min_diversity",
        "num",
        f">= {t.diversity_min_hamming:g}",
        "no_mode_collapse",
    )
    qa_row("Single object ↑", "single_object_share", "share", "(info)", "")
    qa_row("Mean sharpness ↑", "mean_sharpness", "num", "(info)", "")
    rows.append(
        [
            "Memorised (near-copies) ↓",
            str(len(qa_base.memorised)) if qa_base else "—",
            str(len(qa_lora.memorised)) if qa_lora else "—",
            "0",
            _check_cell(by_name.get("no_memorisation")),
        ]
    )
    loss, which = training_loss(training_summary)
    rows.append(
        [
            "Final training loss ↓",
            "n/a",
            _fmt(loss, "small"),
            f"< {t.final_loss_max:g}",
            _check_cell(by_name.get("final_loss")),
        ]
    )
    return rows


METRIC_TABLE_HEADER = ["Metric", "Base", "LoRA", "Threshold", "LoRA check"]
CHECK_TABLE_HEADER = ["Check", "Result", "Severity (on failure)", "Value", "Threshold", "Reason"]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def metric_table_markdown(
    metrics_lora: Mapping[str, MetricResult],
    metrics_base: Mapping[str, MetricResult],
    qa_lora: QASummary | None,
    qa_base: QASummary | None,
    checks: Sequence[CheckOutcome],
    thresholds: EvaluationThresholds,
    training_summary: Mapping[str, Any] | None = None,
) -> str:
    """The base-vs-LoRA metric table as markdown (for Dagster metadata and report.md)."""
    rows = metric_rows(metrics_lora, metrics_base, qa_lora, qa_base, checks, thresholds, training_summary)
    return _md_table(METRIC_TABLE_HEADER, rows)


def _qa_rows(qa_lora: QASummary | None, qa_base: QASummary | None) -> list[list[str]]:
    rows = []
    pl = {p["prompt_index"]: p for p in (qa_lora.per_prompt if qa_lora else [])}
    pb = {p["prompt_index"]: p for p in (qa_base.per_prompt if qa_base else [])}
    for idx in sorted(set(pl) | set(pb)):
        ref = pl.get(idx) or pb[idx]

        def pair(key: str, kind: str, idx: int = idx) -> str:
            b = pb.get(idx, {}).get(key)
            lo = pl.get(idx, {}).get(key)
            return f"{_fmt(b, kind)} / {_fmt(lo, kind)}"

        rows.append(
            [
                str(idx),
                ref["prompt"],
                ", ".join(ref.get("prompt_colours") or []) or "—",
                pair("white_background_share", "share"),
                pair("centred_share", "share"),
                pair("single_object_share", "share"),
                pair("colour_respected_share", "share"),
                ", ".join(str(c) for c in pl.get(idx, {}).get("measured_colours", [])) or "—",
                pair("diversity_mean_hamming", "num"),
                pair("memorised", "int"),
            ]
        )
    return rows


QA_TABLE_HEADER = [
    "#",
    "Prompt",
    "Prompt colour",
    "White bg (base / LoRA)",
    "Centred",
    "Single object",
    "Colour respected",
    "LoRA measured colours",
    "Diversity (pHash)",
    "Memorised",
]


def how_to_enable(metrics: Sequence[Mapping[str, MetricResult]]) -> list[str]:
    """Instructions for metrics that were unavailable (empty when everything was computed)."""
    lines: list[str] = []
    merged: dict[str, MetricResult] = {}
    for side in metrics:
        for name, m in side.items():
            if not m.ok and name not in merged:
                merged[name] = m
    inception = [merged[n] for n in ("fid", "kid", "inception_score") if n in merged]
    # Only when the Inception *weights* were missing; an injected extractor (tests) has other reasons.
    if any(not (m.weights or "").startswith("injected") for m in inception):
        m = inception[0]
        lines.append(
            f"FID / KID / IS need pytorch-fid's Inception weights `{INCEPTION_WEIGHTS_FILE}` (one file for "
            f"all three). This run looked for: `{m.weights}`. On a machine with internet, running "
            '`python -c "from pytorch_fid.inception import fid_inception_v3; fid_inception_v3()"` downloads it '
            "into `$TORCH_HOME/hub/checkpoints/` (the file pytorch-fid names in `FID_WEIGHTS_URL`); copy it to "
            "the path above or set `evaluation.inception_weights: /path/to/file` in the config. Nothing is "
            "downloaded by the pipeline."
        )
    if "clip_score" in merged:
        lines.append(
            "CLIP score needs a local transformers CLIP folder: on a machine with internet save one, e.g. "
            "`CLIPModel.from_pretrained('openai/clip-vit-base-patch16').save_pretrained(DIR)` and the same for "
            "`CLIPProcessor`, copy DIR here and set `evaluation.clip_model_dir: DIR`. "
            f"Reason this run: {merged['clip_score'].reason}"
        )
    return lines


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def read_losses(losses_csv: Path | None) -> list[dict[str, float]]:
    if losses_csv is None or not Path(losses_csv).is_file():
        return []
    rows = []
    with open(losses_csv, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            try:
                rows.append({"step": float(r["step"]), "loss": float(r["loss"])})
            except (KeyError, TypeError, ValueError):
                continue  # a torn last line of a run that was killed
    return rows


def plot_loss_curve(losses_csv: Path | None, path: Path, threshold: float | None = None) -> Path | None:
    """Loss and its EMA against the step, with the checklist threshold; Agg canvas (no pyplot state)."""
    rows = read_losses(losses_csv)
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    smooth: list[float] = []
    for v in losses:
        smooth.append(v if not smooth else EMA_DECAY * smooth[-1] + (1 - EMA_DECAY) * v)
    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"EMA ({EMA_DECAY})")
    if threshold is not None:
        ax.axhline(
            threshold, color="tab:red", linestyle="--", linewidth=1, label=f"checklist < {threshold:g}"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def grid_step(path: Path) -> int:
    m = re.search(r"step(\d+)", Path(path).stem)
    return int(m.group(1)) if m else -1


def comparison_grid(pairs: Sequence[tuple[GeneratedImage, GeneratedImage]], title: str) -> Image.Image:
    """Two rows (base, LoRA), one column per seed, labelled."""
    pairs = sorted(pairs, key=lambda p: p[1].image_index)
    cells: list[list[Image.Image]] = [[], []]
    for base, lora in pairs:
        for row, g in enumerate((base, lora)):
            with Image.open(g.path) as img:
                im = img.convert("RGB")
                im.thumbnail((COMPARISON_CELL, COMPARISON_CELL), Image.Resampling.LANCZOS)
                cells[row].append(im.copy())
    cell_w = max((im.width for row in cells for im in row), default=COMPARISON_CELL)
    cell_h = max((im.height for row in cells for im in row), default=COMPARISON_CELL)
    label_w = 60
    width = label_w + cell_w * max(1, len(pairs))
    lines = textwrap.wrap(title, width=max(20, (width - 8) // 6))[:4]  # default PIL font: ~6 px a character
    title_h = 8 + 13 * len(lines)
    grid = Image.new("RGB", (width, title_h + 2 * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    draw.multiline_text((4, 4), "\n".join(lines), fill="black", spacing=2)
    for r, name in enumerate(("base", "LoRA")):
        draw.text((4, title_h + r * cell_h + cell_h // 2 - 6), name, fill="black")
        for c, im in enumerate(cells[r]):
            grid.paste(im, (label_w + c * cell_w, title_h + r * cell_h))
    for c, (_, lora) in enumerate(pairs):
        draw.text((label_w + c * cell_w + 3, title_h + 2), f"seed {lora.seed}", fill=(200, 0, 0))
    return grid


def _data_uri(image: Image.Image | Path, max_width: int = HTML_MAX_WIDTH, fmt: str = "JPEG") -> str:
    if isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        with Image.open(image) as im:
            img = im.convert("RGB")
    if img.width > max_width:
        img = img.resize(
            (max_width, max(1, round(img.height * max_width / img.width))), Image.Resampling.LANCZOS
        )
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, format="PNG", optimize=True)
    else:
        img.save(buf, format="JPEG", quality=85)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


# ----------------------------------------------------------------------------------------------
# metrics.json
# ----------------------------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite(obj: Any) -> Any:
    """NaN/inf are not JSON: replace them with null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def metrics_document(
    *,
    metrics_lora: Mapping[str, MetricResult],
    metrics_base: Mapping[str, MetricResult],
    qa_lora: QASummary | None,
    qa_base: QASummary | None,
    thresholds: EvaluationThresholds,
    checks: Sequence[CheckOutcome],
    provenance: Mapping[str, Any] | None,
    training_summary: Mapping[str, Any] | None,
    settings: Mapping[str, Any] | None,
    artefacts: Mapping[str, Any],
) -> dict[str, Any]:
    loss, which = training_loss(training_summary)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "overall": overall(checks),
        "thresholds": thresholds.model_dump(mode="json"),
        "settings": dict(settings or {}),
        "metrics": {
            "base": {k: v.to_dict() for k, v in metrics_base.items()},
            "lora": {k: v.to_dict() for k, v in metrics_lora.items()},
        },
        "qa": {
            "base": qa_base.to_dict() if qa_base else None,
            "lora": qa_lora.to_dict() if qa_lora else None,
        },
        "checks": [c.to_dict() for c in checks],
        "training": {
            "final_loss": (training_summary or {}).get("final_loss"),
            "smoothed_loss": (training_summary or {}).get("smoothed_loss"),
            "checked_loss": loss,
            "checked_loss_source": which,
        },
        "artefacts": dict(artefacts),
        "provenance": dict(provenance or {}),
    }
    # Round-trip through JSON so the document is exactly what the file holds.
    return json.loads(json.dumps(_finite(doc), default=_json_default))


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# report.md / report.html
# ----------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.pass{color:#11772c;font-weight:600}.fail{color:#b00020;font-weight:600}
.unavailable{color:#a66300;font-weight:600}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}
img{max-width:100%;border:1px solid #eee}.verdict{font-size:1.2em;padding:.4em .8em;display:inline-block}
code{background:#f5f5f5;padding:0 3px}
"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        low = text.lower()
        cls = (
            "fail"
            if low.startswith("fail")
            else "pass"
            if low == "pass"
            else "unavailable"
            if low.startswith("unavailable")
            else ""
        )
        return f'<td class="{cls}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(str(c)) for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _check_rows(checks: Sequence[CheckOutcome]) -> list[list[str]]:
    return [
        [
            c.name,
            "pass" if c.passed else ("unavailable" if c.status == "unavailable" else "FAIL"),
            c.severity,
            _fmt(c.value, "small" if c.name in {"final_loss"} else "num"),
            f"{c.comparator} {c.threshold:g}",
            c.reason,
        ]
        for c in checks
    ]


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def write_report(
    out_dir: Path,
    *,
    metrics_lora: Mapping[str, MetricResult],
    metrics_base: Mapping[str, MetricResult],
    qa_lora: QASummary | None,
    qa_base: QASummary | None,
    thresholds: EvaluationThresholds,
    losses_csv: Path | None,
    validation_grids: Sequence[Path],
    base_vs_lora_pairs: Sequence[tuple[GeneratedImage, GeneratedImage]],
    provenance: Mapping[str, Any] | None,
    training_summary: Mapping[str, Any] | None = None,
    checks: Sequence[CheckOutcome] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> ReportPaths:
    """Write metrics.json, report.md, report.html, loss_curve.png and comparisons/prompt{P}.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if checks is None:
        checks = checklist(metrics_lora, qa_lora, training_summary, thresholds)
    checks = list(checks)
    loss_png = plot_loss_curve(losses_csv, out_dir / "loss_curve.png", thresholds.final_loss_max)
    grids = sorted(
        (Path(g) for g in validation_grids if Path(g).is_file()), key=lambda p: (grid_step(p), p.name)
    )

    by_prompt: dict[int, list[tuple[GeneratedImage, GeneratedImage]]] = {}
    for base, lora in base_vs_lora_pairs:
        by_prompt.setdefault(lora.prompt_index, []).append((base, lora))
    comp_dir = out_dir / "comparisons"
    comparison_paths: list[Path] = []
    comparison_images: list[tuple[int, str, Image.Image]] = []
    if by_prompt:
        comp_dir.mkdir(exist_ok=True)
    for p in sorted(by_prompt):
        prompt = by_prompt[p][0][1].prompt
        grid = comparison_grid(by_prompt[p], f"prompt {p}: {prompt}")
        path = comp_dir / f"prompt{p}.png"
        grid.save(path)
        comparison_paths.append(path)
        comparison_images.append((p, prompt, grid))

    paths = ReportPaths(
        out_dir=out_dir,
        metrics_json=out_dir / "metrics.json",
        report_md=out_dir / "report.md",
        report_html=out_dir / "report.html",
        loss_curve_png=loss_png,
        comparison_grids=comparison_paths,
    )
    artefacts = {
        "report_md": paths.report_md.name,
        "report_html": paths.report_html.name,
        "loss_curve": _rel(loss_png, out_dir) if loss_png else None,
        "comparison_grids": [_rel(p, out_dir) for p in comparison_paths],
        "validation_grids": [str(g) for g in grids],
        "losses_csv": str(losses_csv) if losses_csv else None,
    }
    doc = metrics_document(
        metrics_lora=metrics_lora,
        metrics_base=metrics_base,
        qa_lora=qa_lora,
        qa_base=qa_base,
        thresholds=thresholds,
        checks=checks,
        provenance=provenance,
        training_summary=training_summary,
        settings=settings,
        artefacts=artefacts,
    )
    _write_text(paths.metrics_json, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")

    verdict = doc["overall"]
    table = metric_rows(metrics_lora, metrics_base, qa_lora, qa_base, checks, thresholds, training_summary)
    qa_rows = _qa_rows(qa_lora, qa_base)
    notes = how_to_enable([metrics_lora, metrics_base])
    memorised = qa_lora.memorised if qa_lora else []
    verdict_text = (
        "PASSED" if verdict["passed"] else "FAILED"
    ) + f" — {verdict['errors']} error(s), {verdict['warnings']} warning(s)"
    small_note = (
        f"FID/KID/IS here use {(metrics_lora.get('fid') or MetricResult('fid', None, 'unavailable')).n_generated} "
        f"generations per model: {FID_SMALL_SAMPLE_NOTE} {CLIP_SCORE_NOTE}"
    )

    # ---- markdown
    md = [f"# Evaluation report\n\n**{verdict_text}**\n"]
    md += [
        "## Checklist (LoRA)\n",
        _md_table(CHECK_TABLE_HEADER, _check_rows(checks)),
        "",
    ]
    md += ["## Metrics: base vs LoRA\n", _md_table(METRIC_TABLE_HEADER, table), "", f"_{small_note}_", ""]
    if notes:
        md += ["## How to get FID / IS / CLIP numbers\n"] + [f"- {n}" for n in notes] + [""]
    md += ["## Training loss\n"]
    md += [f"![loss curve]({_rel(loss_png, out_dir)})\n" if loss_png else "_No losses.csv found._\n"]
    md += ["## Validation grids across checkpoints\n"]
    md += [f"### step {grid_step(g)}\n\n![step {grid_step(g)}]({_rel(g, out_dir)})\n" for g in grids] or [
        "_No validation grids._\n"
    ]
    md += ["## Base vs LoRA (same prompt, same seed)\n"]
    md += [
        f"### Prompt {p}: {prompt}\n\n![prompt {p}]({_rel(comp_dir / f'prompt{p}.png', out_dir)})\n"
        for p, prompt, _ in comparison_images
    ] or ["_No generations._\n"]
    md += ["## QA per prompt (base / LoRA)\n", _md_table(QA_TABLE_HEADER, qa_rows), ""]
    if memorised:
        md += (
            ["## Possible memorisation (LoRA)\n"]
            + [
                f"- `{Path(m['image']).name}` ≈ training `{m['nearest_train']}` (pHash distance {m['distance']})"
                for m in memorised
            ]
            + [""]
        )
    md += [
        "## Provenance\n",
        _md_table(
            ["Key", "Value"],
            [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in (provenance or {}).items()],
        ),
        "",
    ]
    _write_text(paths.report_md, "\n".join(md) + "\n")

    # ---- html (self-contained)
    h = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Evaluation report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Evaluation report</h1>",
        f"<p class='verdict {'pass' if verdict['passed'] else 'fail'}'>{html.escape(verdict_text)}</p>",
        "<h2>Checklist (LoRA)</h2>",
        _html_table(CHECK_TABLE_HEADER, _check_rows(checks)),
        "<h2>Metrics: base vs LoRA</h2>",
        _html_table(METRIC_TABLE_HEADER, table),
        f"<p><small>{html.escape(small_note)}</small></p>",
    ]
    if notes:
        h.append("<h2>How to get FID / IS / CLIP numbers</h2><div class='note'><ul>")
        h += [f"<li>{html.escape(n)}</li>" for n in notes]
        h.append("</ul></div>")
    h.append("<h2>Training loss</h2>")
    h.append(
        f"<img alt='loss curve' src='{_data_uri(loss_png, fmt='PNG')}'>"
        if loss_png
        else "<p>No losses.csv found.</p>"
    )
    h.append("<h2>Validation grids across checkpoints</h2>")
    if grids:
        for g in grids:
            h.append(
                f"<h3>step {grid_step(g)}</h3><img alt='validation grid step {grid_step(g)}' src='{_data_uri(g)}'>"
            )
    else:
        h.append("<p>No validation grids.</p>")
    h.append("<h2>Base vs LoRA (same prompt, same seed)</h2>")
    for p, prompt, grid in comparison_images:
        h.append(f"<h3>Prompt {p}: {html.escape(prompt)}</h3><img alt='prompt {p}' src='{_data_uri(grid)}'>")
    if not comparison_images:
        h.append("<p>No generations.</p>")
    h += ["<h2>QA per prompt (base / LoRA)</h2>", _html_table(QA_TABLE_HEADER, qa_rows)]
    if memorised:
        h.append("<h2>Possible memorisation (LoRA)</h2><ul>")
        h += [
            f"<li>{html.escape(Path(m['image']).name)} ≈ training {html.escape(str(m['nearest_train']))} "
            f"(pHash distance {m['distance']})</li>"
            for m in memorised
        ]
        h.append("</ul>")
    h += [
        "<h2>Provenance</h2>",
        _html_table(
            ["Key", "Value"],
            [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in (provenance or {}).items()],
        ),
        "</body></html>",
    ]
    _write_text(paths.report_html, "\n".join(h) + "\n")
    return paths


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
