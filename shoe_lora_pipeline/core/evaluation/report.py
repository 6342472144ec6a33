"""Evaluation report: ``metrics.json`` (+ JSON Schema), ``report.md`` and a self-contained ``report.html``
(images inlined as base64 data URIs, inline CSS, no scripts, nothing external).

Both reports are rendered from one context (:func:`report_context`) by the jinja2 templates in
``templates/``; the HTML one autoescapes. The checklist itself is :mod:`.checks`.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shoe_lora_pipeline.core.config import EvaluationThresholds
from shoe_lora_pipeline.core.display import round_for_display
from shoe_lora_pipeline.core.evaluation.checks import (
    CHECKS_BY_NAME,
    CheckOutcome,
    checklist,
    overall,
    training_loss,
)
from shoe_lora_pipeline.core.evaluation.generate import GeneratedImage
from shoe_lora_pipeline.core.evaluation.metrics import (
    CLIP_SCORE_NOTE,
    FID_SMALL_SAMPLE_NOTE,
    INCEPTION_WEIGHTS_FILE,
    METRIC_INFO,
    MetricResult,
)
from shoe_lora_pipeline.core.evaluation.qa import QASummary
from shoe_lora_pipeline.core.fsutil import atomic_save_png, atomic_write_json, atomic_write_text
from shoe_lora_pipeline.core.markdown import md_table
from shoe_lora_pipeline.core.run_artifacts import (
    VALIDATION_LOSS_NAME,
    best_validation_step,
    grid_step,
    plot_loss_curve,
    read_losses_csv,
    read_validation_losses,
)

if TYPE_CHECKING:
    import jinja2
    from markupsafe import Markup

SCHEMA_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).with_name("metrics.schema.json")
TEMPLATES_DIR = Path(__file__).with_name("templates")
COMPARISON_CELL = 256  # px per image in the base-vs-LoRA grids
COMPARISON_GAP = 8  # px between tiles, so white-background tiles never run into each other
COMPARISON_BACKGROUND = (228, 228, 228)  # the grid's plain background: gaps and label bands
COMPARISON_TEXT = (20, 20, 20)
HTML_MAX_WIDTH = 1024  # px: inlined images are downscaled to this width at most


@dataclass
class ReportPaths:
    out_dir: Path
    metrics_json: Path
    report_md: Path
    report_html: Path
    loss_curve_png: Path | None = None
    comparison_grids: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Findings:
    """What the evaluation measured and decided: the input of metrics.json and of both reports."""

    metrics_lora: Mapping[str, MetricResult]
    metrics_base: Mapping[str, MetricResult]
    qa_lora: QASummary | None
    qa_base: QASummary | None
    thresholds: EvaluationThresholds
    checks: Sequence[CheckOutcome]
    training_summary: Mapping[str, Any] | None = None
    provenance: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Comparison:
    """One prompt's base-vs-LoRA grid: written to ``path``, kept in memory for the HTML."""

    index: int
    prompt: str
    path: Path
    image: Image.Image


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------


# The training loss the checklist compares, named as lora_training's metadata names it.
LOSS_LABELS = {
    "smoothed_loss": "Smoothed training loss (smoothed_loss)",
    "final_loss": "Last-step training loss (final_loss)",
}


def _fmt(value: float | None, kind: str = "num") -> str:
    if value is None:
        return "—"
    if kind == "loss":  # the same digits as lora_training's metadata (core.display)
        return f"{round_for_display(value):g}"
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


def metric_rows(f: Findings) -> list[list[str]]:
    """Rows [metric, base, LoRA, threshold, LoRA check] shared by the markdown and HTML tables."""
    metrics_lora, metrics_base, qa_lora, qa_base = f.metrics_lora, f.metrics_base, f.qa_lora, f.qa_base
    by_name = {c.name: c for c in f.checks}
    t = f.thresholds
    rows: list[list[str]] = []
    kinds = {"fid": "num", "kid": "small", "inception_score": "num", "clip_score": "num"}
    limits = {name: CHECKS_BY_NAME[name].limit_text(t) for name in ("fid", "inception_score", "clip_score")}
    limits["kid"] = "(lower is better)"
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

    def qa_row(label: str, attr: str, kind: str, check: str) -> None:
        limit = CHECKS_BY_NAME[check].limit_text(t) if check else "(info)"
        rows.append(
            [
                label,
                _fmt(getattr(qa_base, attr), kind) if qa_base else "—",
                _fmt(getattr(qa_lora, attr), kind) if qa_lora else "—",
                limit,
                _check_cell(by_name.get(check)),
            ]
        )

    qa_row("White background ↑", "white_background_share", "share", "white_background")
    qa_row("Centred ↑", "centred_share", "share", "centred")
    qa_row("Colour respected ↑", "colour_respected_share", "share", "colour_adherence")
    qa_row("Min diversity (pHash bits) ↑", "min_diversity", "num", "no_mode_collapse")
    qa_row("Single object ↑", "single_object_share", "share", "")
    qa_row("Mean sharpness ↑", "mean_sharpness", "num", "")
    rows.append(
        [
            "Memorised (near-copies) ↓",
            str(len(qa_base.memorised)) if qa_base else "—",
            str(len(qa_lora.memorised)) if qa_lora else "—",
            CHECKS_BY_NAME["no_memorisation"].limit_text(t),
            _check_cell(by_name.get("no_memorisation")),
        ]
    )
    loss, which = training_loss(f.training_summary)
    rows.append(
        [
            f"{LOSS_LABELS.get(which, 'Training loss')} ↓",
            "n/a",
            _fmt(loss, "loss"),
            CHECKS_BY_NAME["final_loss"].limit_text(t),
            _check_cell(by_name.get("final_loss")),
        ]
    )
    return rows


# What the demo LoRA has to show on the tiny-shoes base (issue 19): the base draws varied backdrops, the
# LoRA learns the white one from the white-background photos. Goals of the demo, not checklist gates: a
# real SD1.5 base may already draw white backgrounds often.
LORA_EFFECT_GOALS = {"white_background_share": (0.5, 0.9)}  # (base below, LoRA at least)
LORA_EFFECT_HEADER = ["Same prompts, same seeds", "Base", "LoRA", "Change", "Demo goal", "Goal met"]


def lora_effect_rows(
    qa_lora: QASummary | None,
    qa_base: QASummary | None,
    validation_losses: Sequence[Mapping[str, Any]] = (),
) -> list[list[str]]:
    """Base vs LoRA shares on the same generations' seeds, and whether the validation loss fell."""
    rows: list[list[str]] = []
    labels = {
        "white_background_share": "White background",
        "product_shot_share": "Single centred shoe-shaped object in the prompt's colour",
        "fill_share": "Product fills the frame (fill check)",
        "colour_respected_share": "Colour respected",
    }
    for attr, label in labels.items():
        base = getattr(qa_base, attr, None) if qa_base else None
        lora = getattr(qa_lora, attr, None) if qa_lora else None
        change = "—" if base is None or lora is None else f"{100 * (lora - base):+.0f} pts"
        goal, met = "—", "—"
        if attr in LORA_EFFECT_GOALS:
            below, at_least = LORA_EFFECT_GOALS[attr]
            goal = f"base < {100 * below:.0f}%, LoRA ≥ {100 * at_least:.0f}%"
            if base is not None and lora is not None:
                met = "yes" if base < below and lora >= at_least else "no"
        rows.append([label, _fmt(base, "share"), _fmt(lora, "share"), change, goal, met])
    if validation_losses:
        first, last = validation_losses[0], validation_losses[-1]
        fell = last["val_loss"] < first["val_loss"]
        rows.append(
            [
                f"Validation loss (step {first['step']} → {last['step']})",
                f"{first['val_loss']:.5f}",
                f"{last['val_loss']:.5f}",
                f"{last['val_loss'] - first['val_loss']:+.5f}",
                "falls",
                "yes" if fell else "no",
            ]
        )
    return rows


METRIC_TABLE_HEADER = ["Metric", "Base", "LoRA", "Threshold", "LoRA check"]
CHECK_TABLE_HEADER = ["Check", "Result", "Severity (on failure)", "Value", "Threshold", "Reason"]


def metric_table_markdown(f: Findings) -> str:
    """The base-vs-LoRA metric table as markdown (for Dagster metadata and report.md)."""
    return md_table(METRIC_TABLE_HEADER, metric_rows(f))


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


_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> _Font:
    """PIL's bundled font at ``size`` px (Pillow >= 10.1 with FreeType), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # older Pillow (no size argument) or no FreeType
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: _Font, width: float, max_lines: int = 4) -> list[str]:
    """Greedy word wrap to ``width`` px (a word longer than a line is left to overflow)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [textwrap.shorten(" ".join(lines[max_lines - 1 :]), 60)]
    return lines or [""]


def comparison_grid(pairs: Sequence[tuple[GeneratedImage, GeneratedImage]], title: str) -> Image.Image:
    """Two rows (base, LoRA), one column per seed. Tiles are separated by gaps and every label (title,
    row names, seeds) sits on the plain background, never on an image, so it stays readable however
    noisy the generations are."""
    pairs = sorted(pairs, key=lambda p: p[1].image_index)
    cells: list[list[Image.Image]] = [[], []]
    for base, lora in pairs:
        for row, g in enumerate((base, lora)):
            with Image.open(g.path) as img:
                im = img.convert("RGB")
                im.thumbnail((COMPARISON_CELL, COMPARISON_CELL), Image.Resampling.LANCZOS)
                cells[row].append(im.copy())
    gap = COMPARISON_GAP
    cell_w = max((im.width for row in cells for im in row), default=COMPARISON_CELL)
    cell_h = max((im.height for row in cells for im in row), default=COMPARISON_CELL)
    font = _font(14)
    line_h = 18
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    seeds = [f"seed {lora.seed}" for _, lora in pairs]
    col_w = max([cell_w] + [round(probe.textlength(s, font=font)) for s in seeds])  # labels never overlap
    n_cols = max(1, len(pairs))
    label_w = gap + round(max(probe.textlength(n, font=font) for n in ("base", "LoRA"))) + gap
    width = label_w + n_cols * col_w + (n_cols - 1) * gap + gap
    lines = _wrap(probe, title, font, width - 2 * gap)
    title_h = gap + line_h * len(lines) + gap
    top = title_h + line_h + gap // 2  # tiles start below the title and the band of seed labels
    grid = Image.new("RGB", (width, top + 2 * cell_h + gap + gap), COMPARISON_BACKGROUND)
    draw = ImageDraw.Draw(grid)
    draw.multiline_text((gap, gap), "\n".join(lines), fill=COMPARISON_TEXT, font=font, spacing=4)
    for c, seed in enumerate(seeds):
        draw.text((label_w + c * (col_w + gap), title_h), seed, fill=COMPARISON_TEXT, font=font)
    for r, name in enumerate(("base", "LoRA")):
        y = top + r * (cell_h + gap)
        draw.text((gap, y + cell_h // 2 - line_h // 2), name, fill=COMPARISON_TEXT, font=font)
        for c, im in enumerate(cells[r]):
            grid.paste(im, (label_w + c * (col_w + gap), y))
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
    f: Findings, *, settings: Mapping[str, Any] | None, artefacts: Mapping[str, Any]
) -> dict[str, Any]:
    loss, which = training_loss(f.training_summary)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "overall": overall(f.checks),
        "thresholds": f.thresholds.model_dump(mode="json"),
        "settings": dict(settings or {}),
        "metrics": {
            "base": {k: v.to_dict() for k, v in f.metrics_base.items()},
            "lora": {k: v.to_dict() for k, v in f.metrics_lora.items()},
        },
        "qa": {
            "base": f.qa_base.to_dict() if f.qa_base else None,
            "lora": f.qa_lora.to_dict() if f.qa_lora else None,
        },
        "checks": [c.to_dict() for c in f.checks],
        "training": {
            "final_loss": (f.training_summary or {}).get("final_loss"),
            "smoothed_loss": (f.training_summary or {}).get("smoothed_loss"),
            "checked_loss": loss,
            "checked_loss_source": which,
        },
        "artefacts": dict(artefacts),
        "provenance": dict(f.provenance or {}),
    }
    # Round-trip through JSON so the document is exactly what the file holds.
    return json.loads(json.dumps(_finite(doc), default=_json_default))


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# report.md / report.html
# ----------------------------------------------------------------------------------------------

_CODE_SPAN = re.compile(r"`([^`]+)`")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> dict[str, Any]:
    return {"header": list(header), "rows": [[str(c) for c in row] for row in rows]}


def _md_table_filter(table: Mapping[str, Any]) -> str:
    return md_table(table["header"], table["rows"])


def _code_spans(text: str) -> Markup:
    """Escaped ``text`` with its markdown code spans (`` `x` ``) as ``<code>x</code>``."""
    from markupsafe import Markup, escape

    parts = _CODE_SPAN.split(str(text))  # even indices: plain text; odd: the inside of a code span
    return Markup("").join(
        escape(p) if i % 2 == 0 else Markup("<code>%s</code>") % p for i, p in enumerate(parts)
    )


def _status_class(text: str) -> str:
    """CSS class of a table cell: pass / fail / unavailable, else none."""
    low = str(text).lower()
    if low.startswith("fail"):
        return "fail"
    if low == "pass":
        return "pass"
    return "unavailable" if low.startswith("unavailable") else ""


@functools.cache
def _templates() -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        md_table=_md_table_filter, code_spans=_code_spans, status_class=_status_class, data_uri=_data_uri
    )
    return env


def render_report(template: str, context: Mapping[str, Any]) -> str:
    """Render ``templates/{template}`` (``report.md.j2`` or ``report.html.j2``) with ``context``."""
    return _templates().get_template(template).render(context)


def _check_rows(checks: Sequence[CheckOutcome]) -> list[list[str]]:
    return [
        [
            c.name,
            "pass" if c.passed else ("unavailable" if c.status == "unavailable" else "FAIL"),
            c.severity,
            _fmt(c.value, "loss" if c.name in {"final_loss"} else "num"),
            f"{c.comparator} {c.threshold:g}",
            c.reason,
        ]
        for c in checks
    ]


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _validation_loss_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The held-out validation loss in one line: the lowest (and its step) and the last."""
    if not rows:
        return None
    best = best_validation_step(rows)
    lowest = next(r for r in rows if r["step"] == best)
    return {
        "best_step": best,
        "best": f"{lowest['val_loss']:.5f}",
        "last_step": rows[-1]["step"],
        "last": f"{rows[-1]['val_loss']:.5f}",
    }


def report_context(
    out_dir: Path,
    f: Findings,
    *,
    loss_png: Path | None,
    validation_grids: Sequence[Path],
    comparisons: Sequence[Comparison],
    validation_losses: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Everything report.md and report.html show, once. Images carry ``path`` (relative to ``out_dir``,
    for the markdown) and ``source`` (file or image, inlined by the HTML's ``data_uri`` filter)."""
    verdict = overall(f.checks)
    fid = f.metrics_lora.get("fid") or MetricResult("fid", None, "unavailable")
    rows = metric_rows(f)
    return {
        "verdict": {
            "passed": verdict["passed"],
            "text": ("PASSED" if verdict["passed"] else "FAILED")
            + f" — {verdict['errors']} error(s), {verdict['warnings']} warning(s)",
        },
        "checks": _table(CHECK_TABLE_HEADER, _check_rows(f.checks)),
        "metrics": _table(METRIC_TABLE_HEADER, rows),
        "small_note": f"FID/KID/IS here use {fid.n_generated} generations per model: "
        f"{FID_SMALL_SAMPLE_NOTE} {CLIP_SCORE_NOTE}",
        "notes": how_to_enable([f.metrics_lora, f.metrics_base]),
        "loss_curve": {"path": _rel(loss_png, out_dir), "source": loss_png} if loss_png else None,
        "validation_loss": _validation_loss_summary(validation_losses),
        "validation_grids": [
            {"step": grid_step(g), "path": _rel(g, out_dir), "source": g} for g in validation_grids
        ],
        "comparisons": [
            {"index": c.index, "prompt": c.prompt, "path": _rel(c.path, out_dir), "source": c.image}
            for c in comparisons
        ],
        "qa": _table(QA_TABLE_HEADER, _qa_rows(f.qa_lora, f.qa_base)),
        "lora_effect": _table(LORA_EFFECT_HEADER, lora_effect_rows(f.qa_lora, f.qa_base, validation_losses)),
        "memorised": [
            {
                "image": Path(m["image"]).name,
                "nearest_train": str(m["nearest_train"]),
                "distance": m["distance"],
            }
            for m in (f.qa_lora.memorised if f.qa_lora else [])
        ],
        "provenance": _table(
            ["Key", "Value"],
            [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in (f.provenance or {}).items()],
        ),
    }


def write_comparison_grids(
    folder: Path, pairs: Sequence[tuple[GeneratedImage, GeneratedImage]]
) -> list[Comparison]:
    """One base-vs-LoRA grid per prompt, ``folder/prompt{P}.png``, in prompt order."""
    by_prompt: dict[int, list[tuple[GeneratedImage, GeneratedImage]]] = {}
    for base, lora in pairs:
        by_prompt.setdefault(lora.prompt_index, []).append((base, lora))
    comparisons = []
    for p in sorted(by_prompt):
        prompt = by_prompt[p][0][1].prompt
        grid = comparison_grid(by_prompt[p], f"prompt {p}: {prompt}")
        path = folder / f"prompt{p}.png"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_png(path, grid)
        comparisons.append(Comparison(p, prompt, path, grid))
    return comparisons


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
    findings = Findings(
        metrics_lora, metrics_base, qa_lora, qa_base, thresholds, list(checks), training_summary, provenance
    )
    validation = read_validation_losses(losses_csv.parent / VALIDATION_LOSS_NAME) if losses_csv else []
    loss_png = plot_loss_curve(
        read_losses_csv(losses_csv),
        out_dir / "loss_curve.png",
        validation=validation,
        threshold=thresholds.final_loss_max,
    )
    grids = sorted(
        (Path(g) for g in validation_grids if Path(g).is_file()), key=lambda p: (grid_step(p), p.name)
    )
    comparisons = write_comparison_grids(out_dir / "comparisons", base_vs_lora_pairs)
    paths = ReportPaths(
        out_dir=out_dir,
        metrics_json=out_dir / "metrics.json",
        report_md=out_dir / "report.md",
        report_html=out_dir / "report.html",
        loss_curve_png=loss_png,
        comparison_grids=[c.path for c in comparisons],
    )
    artefacts = {
        "report_md": paths.report_md.name,
        "report_html": paths.report_html.name,
        "loss_curve": _rel(loss_png, out_dir) if loss_png else None,
        "comparison_grids": [_rel(p, out_dir) for p in paths.comparison_grids],
        "validation_grids": [str(g) for g in grids],
        "losses_csv": str(losses_csv) if losses_csv else None,
    }
    doc = metrics_document(findings, settings=settings, artefacts=artefacts)
    atomic_write_json(paths.metrics_json, doc, indent=2, ensure_ascii=False)
    context = report_context(
        out_dir,
        findings,
        loss_png=loss_png,
        validation_grids=grids,
        comparisons=comparisons,
        validation_losses=validation,
    )
    atomic_write_text(paths.report_md, render_report("report.md.j2", context))
    atomic_write_text(paths.report_html, render_report("report.html.j2", context))
    return paths
