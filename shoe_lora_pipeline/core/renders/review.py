"""render_review's core: the reviewer's ``reviews.csv``, the approval rule and the HTML contact sheet.

``reviews.csv`` has one row per candidate (``sku, file, decision, note, seed, image_sha256``), best first
within a SKU. A reviewer sets ``decision`` to ``approve`` or ``reject`` (``approved``/``rejected`` and any
case are accepted; empty = no decision) and may write a note; anything else stops the run with the line and
value, because a mistyped "reject" must never publish an image. Every run rewrites the file with the
current candidates and keeps every decision and note already there; rows for candidates that no longer
exist are kept (at the end) while they hold a decision or note, and dropped when empty. Excel's ``;``
separator and UTF-8 BOM are read too.

A decision belongs to the image, not to its file name: a row is matched to a candidate by (sku, seed,
image_sha256), so it follows the same image through a re-render that renames it. A row without
``image_sha256`` (files written before the column existed, or a row typed by hand) is matched by
(sku, file), also to a file the SKU had before a re-render (render.json ``previous``), and gets the image's
seed and hash written into it: old files are migrated on the first run.

Approval per SKU: every candidate a review approves, then, with ``renders.auto_approve``, the best-ranked
candidates that no review rejects up to the row's ``count`` (only QA-passing ones when
``renders.require_qa_pass``). A candidate whose pixels equal those of any rejected row is never approved
automatically.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import html
import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from shoe_lora_pipeline.core.display import render_settings_text
from shoe_lora_pipeline.core.fsutil import atomic_write_json, atomic_write_text
from shoe_lora_pipeline.core.renders.generate import SAMPLERS
from shoe_lora_pipeline.core.renders.store import RenderPaths, read_index

REVIEWS_LOCK_NAME = ".reviews.lock"
REVIEW_COLUMNS = ("sku", "file", "decision", "note", "seed", "image_sha256")
APPROVE, REJECT = "approve", "reject"
_DECISIONS = {"": "", "approve": APPROVE, "approved": APPROVE, "reject": REJECT, "rejected": REJECT}


class ReviewsError(ValueError):
    """reviews.csv cannot be used as it is; the message names the file, line and value."""


@dataclass(frozen=True)
class Review:
    sku: str
    file: str
    decision: str  # "approve" | "reject" | ""
    note: str = ""
    seed: str = ""
    image_sha256: str = ""  # the candidate's pixels (store.pixels_sha256); "" = not known (old rows)

    @property
    def key(self) -> tuple[str, ...]:
        """(sku, seed, image_sha256): the image; (sku, file) for a row that does not say which image."""
        return (self.sku, self.seed, self.image_sha256) if self.image_sha256 else (self.sku, self.file)


def candidate_key(sku: str, candidate: Mapping[str, Any]) -> tuple[str, ...]:
    """The :attr:`Review.key` a row about ``candidate`` has."""
    sha = candidate.get("image_sha256") or ""
    return (sku, str(candidate["seed"]), sha) if sha else (sku, candidate["file"])


def _decision_of(by_key: Mapping[tuple[str, ...], str], sku: str, candidate: Mapping[str, Any]) -> str:
    """A candidate's decision: by its image, else by its file name (reviews not merged yet)."""
    return by_key.get(candidate_key(sku, candidate)) or by_key.get((sku, candidate["file"])) or ""


def read_reviews(path: Path) -> list[Review]:
    """The reviews in ``path`` (none when the file does not exist yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReviewsError(f"{path}: not UTF-8 ({exc}); save it as CSV UTF-8") from None
    first = text.split("\n", 1)[0]
    delimiter = ";" if ";" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header: list[str] | None = None
    seen: dict[tuple[str, ...], tuple[int, Review]] = {}
    out: list[Review] = []
    for fields in reader:
        if not fields or all(not f.strip() for f in fields):
            continue
        if header is None:
            header = [h.strip().lower() for h in fields]
            missing = [c for c in REVIEW_COLUMNS[:3] if c not in header]
            if missing:
                raise ReviewsError(f"{path}: header {fields!r} lacks the column(s) {', '.join(missing)}")
            continue
        values = {name: fields[i].strip() if i < len(fields) else "" for i, name in enumerate(header)}
        raw = values.get("decision", "")
        decision = _DECISIONS.get(raw.lower())
        if decision is None:
            raise ReviewsError(
                f"{path}: line {reader.line_num}: decision {raw!r} for {values.get('sku')!r} / "
                f"{values.get('file')!r}: use approve, reject or leave it empty"
            )
        review = Review(
            values.get("sku", ""),
            values.get("file", ""),
            decision,
            values.get("note", ""),
            values.get("seed", ""),
            values.get("image_sha256", ""),
        )
        if review.key in seen:
            line, other = seen[review.key]
            if other.decision != review.decision:
                raise ReviewsError(
                    f"{path}: lines {line} and {reader.line_num} give {review.sku!r} / {review.file!r} "
                    f"different decisions ({other.decision or 'none'} vs {review.decision or 'none'})"
                )
            continue
        seen[review.key] = (reader.line_num, review)
        out.append(review)
    return out


def _known_images(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[str, str]]:
    """(sku, file) → (seed, image_sha256) for every current candidate and every file a SKU had before a
    re-render (render.json ``previous``); the current candidates win."""
    known: dict[tuple[str, str], tuple[str, str]] = {}
    for record in records:
        sku = record["sku"]
        for c in [*(record.get("previous") or []), *record["candidates"]]:
            if c.get("image_sha256"):
                known[(sku, c["file"])] = (str(c["seed"]), c["image_sha256"])
    return known


def merge_reviews(existing: Iterable[Review], records: Sequence[Mapping[str, Any]]) -> list[Review]:
    """One row per current candidate (sheet order, best first) with its decision and note kept, then the
    rows of vanished candidates that still hold a decision or note. Rows are matched by image; a row
    without an image hash first gets the one of the file it names (see the module docstring)."""
    known = _known_images(records)
    by_key: dict[tuple[str, ...], Review] = {}
    for r in existing:
        if not r.image_sha256 and (r.sku, r.file) in known:
            seed, sha = known[(r.sku, r.file)]
            r = replace(r, seed=seed, image_sha256=sha)
        other = by_key.get(r.key)
        if other is not None and other.decision and r.decision and other.decision != r.decision:
            raise ReviewsError(
                f"reviews.csv: {r.sku!r} / {other.file!r} and {r.sku!r} / {r.file!r} are the same image "
                f"with different decisions ({other.decision} vs {r.decision}); keep one of the two rows"
            )
        if other is None or (r.decision and not other.decision):
            by_key[r.key] = r
    out: list[Review] = []
    current: set[tuple[str, ...]] = set()
    for record in records:
        sku = record["sku"]
        for c in record["candidates"]:
            key = candidate_key(sku, c)
            current.add(key)
            found = by_key.get(key)
            seed, sha = str(c["seed"]), c.get("image_sha256") or ""
            out.append(
                replace(found, file=c["file"], seed=seed, image_sha256=sha)
                if found
                else Review(sku, c["file"], "", "", seed, sha)
            )
    out += [r for k, r in by_key.items() if k not in current and (r.decision or r.note)]
    return out


@contextlib.contextmanager
def reviews_lock(paths: RenderPaths) -> Iterator[None]:
    """Exclusive ``flock`` on ``renders/.reviews.lock`` for one read-modify-write of reviews.csv (held for
    milliseconds; the kernel releases it if the holder dies)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.root / REVIEWS_LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_reviews(reviews: Iterable[Review], path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(REVIEW_COLUMNS)
    for r in reviews:
        writer.writerow([r.sku, r.file, r.decision, r.note, r.seed, r.image_sha256])
    return atomic_write_text(path, buf.getvalue())


def _approval(c: Mapping[str, Any], source: str) -> dict[str, Any]:
    return {
        "file": c["file"],
        "source": source,
        "rank": c["rank"],
        "qa_passed": c["qa"]["passed"],
        "qa_score": c["qa"]["score"],
        "image_sha256": c.get("image_sha256"),
    }


def decide(
    records: Sequence[Mapping[str, Any]],
    reviews: Iterable[Review],
    *,
    auto_approve: bool,
    require_qa_pass: bool,
) -> dict[str, list[dict[str, Any]]]:
    """Approved candidates per SKU: ``{"file", "source": "review"|"auto", "rank", "qa_passed", "qa_score",
    "image_sha256"}``. No candidate identical to a rejected image is approved automatically."""
    reviews = list(reviews)
    by_key = {r.key: r.decision for r in reviews}
    rejected = rejected_images(reviews)
    approvals: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        sku, wanted = record["sku"], int(record["row"]["count"])
        chosen = [
            _approval(c, "review") for c in record["candidates"] if _decision_of(by_key, sku, c) == APPROVE
        ]
        if auto_approve:
            taken = {a["file"] for a in chosen}
            for c in record["candidates"]:  # best first
                if len(chosen) >= wanted:
                    break
                if c["file"] in taken or _decision_of(by_key, sku, c) == REJECT:
                    continue
                if c.get("image_sha256") and c["image_sha256"] in rejected:
                    continue
                if require_qa_pass and not c["qa"]["passed"]:
                    continue
                chosen.append(_approval(c, "auto"))
        approvals[sku] = chosen
    return approvals


def rejected_images(reviews: Iterable[Review]) -> set[str]:
    """The image hashes of every rejected row, current or not."""
    return {r.image_sha256 for r in reviews if r.decision == REJECT and r.image_sha256}


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h2{margin:1.4em 0 .2em;font-size:1.1em}
.prompt{color:#555;font-size:.9em;margin:.2em 0 .6em}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:200px;border:3px solid #ddd;padding:4px;font-size:.78em}
figure.approved{border-color:#2a8a3e} figure.rejected{border-color:#b33;opacity:.6}
figure img{width:200px;height:200px;object-fit:contain;background:#fff;display:block}
.pass{color:#2a8a3e;font-weight:600} .fail{color:#b33;font-weight:600}
table{border-collapse:collapse;font-size:.85em} td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
code{font-size:.9em} .note{color:#444;font-style:italic;white-space:pre-wrap}
.publish code{background:#f3f3f3;padding:2px 4px;user-select:all}
"""


def _figure(
    sku: str, c: Mapping[str, Any], decision: str, approved: Mapping[str, str], note: str = ""
) -> str:
    qa = c["qa"]
    status = (
        '<span class="pass">QA pass</span>'
        if qa["passed"]
        else (f'<span class="fail">QA fail</span>: {html.escape(", ".join(qa["failed"]))}')
    )
    state = f"approved ({approved[c['file']]})" if c["file"] in approved else (decision or "no decision")
    css = "approved" if c["file"] in approved else "rejected" if decision == REJECT else ""
    src = f"candidates/{quote(sku)}/{quote(c['file'])}"
    note_html = f'<br><span class="note">note: {html.escape(note)}</span>' if note else ""
    return (
        f'<figure class="{css}"><img src="{html.escape(src)}" alt="{html.escape(c["file"])}" loading="lazy">'
        f"<figcaption>#{c['rank']} · score {qa['score']:.3f} · {status}<br>seed <code>{c['seed']}</code>"
        f"<br><code>{html.escape(c['file'])}</code><br>{html.escape(state)}{note_html}</figcaption></figure>"
    )


def contact_sheet_html(
    index: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    reviews: Iterable[Review],
    approvals: Mapping[str, Sequence[Mapping[str, Any]]],
    rejected_rows: Sequence[Mapping[str, str]],
    *,
    run_id: str | None,
    publish_command: str | None = None,
    sampler_names: Mapping[str, str] | None = None,
) -> str:
    """A self-contained page (inline CSS, images by path relative to the renders folder).

    ``publish_command`` is the exact command that re-runs the review and publishes (the Dagster layer
    knows the asset keys and the instance); ``sampler_names`` maps the config's sampler ids to the names
    people know (``dpmpp_2m`` → ``DPM++ 2M``)."""
    reviews = list(reviews)
    decisions: dict[tuple[str, ...], str] = {r.key: r.decision for r in reviews}
    notes: dict[tuple[str, ...], str] = {r.key: r.note for r in reviews}
    esc = html.escape
    lora = index.get("lora") or {}
    n_approved = sum(len(v) for v in approvals.values())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Product renders: review</title>",
        f"<style>{_CSS}</style></head><body><h1>Product renders: review</h1>",
        f"<p>Run <code>{esc(str(run_id))}</code> · specs sha256 <code>{esc(str(index.get('specs_sha256'))[:16])}</code>"
        f" · {len(records)} SKUs · {n_approved} images approved</p>",
        # The file whose hash is shown: the same file and sha256 as manifest.csv and each PNG's chunk.
        f"<p>LoRA file <code>{esc(str(lora.get('lora_file')))}</code> sha256 "
        f"<code>{esc(str(lora.get('lora_sha256')))}</code> (A1111 lists it as "
        f"<code>{esc(str(lora.get('name')))}</code>)</p>",
        f"<p>Settings: {esc(render_settings_text(index.get('settings') or {}, sampler_names))}</p>",
        "<p class='publish'>Edit <code>reviews.csv</code> (decision: approve / reject, and a note if you like), "
        "then publish: "
        + (
            f"<code>{esc(publish_command)}</code>"
            if publish_command
            else "materialize <code>render_review</code> and <code>published_renders</code>"
        )
        + "</p>",
    ]
    if rejected_rows:
        parts.append(
            f"<h2>{len(rejected_rows)} specs rows refused</h2><table><tr><th>line</th><th>sku</th><th>problem</th></tr>"
        )
        parts += [
            f"<tr><td>{esc(r.get('line', ''))}</td><td>{esc(r.get('sku', ''))}</td><td>{esc(r.get('problem', ''))}</td></tr>"
            for r in rejected_rows
        ]
        parts.append("</table>")
    for record in records:
        sku = record["sku"]
        approved = {a["file"]: a["source"] for a in approvals.get(sku, [])}
        parts.append(
            f"<h2>{esc(sku)} — {len(approved)} of {record['row']['count']} approved</h2>"
            f"<p class='prompt'>{esc(record['row']['prompt'])}<br>negative: {esc(record['row']['negative_prompt'])}</p>"
            "<div class='grid'>"
        )
        parts += [
            _figure(sku, c, _decision_of(decisions, sku, c), approved, _decision_of(notes, sku, c))
            for c in record["candidates"]
        ]
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


@dataclass
class ReviewResult:
    contact_sheet: Path
    reviews_csv: Path
    approvals: dict[str, list[dict[str, Any]]]
    n_candidates: int
    n_approved_by_review: int
    n_rejected_by_review: int
    skus_without_approval: list[str]


def _read_rejected(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def review_renders(
    paths: RenderPaths,
    *,
    auto_approve: bool,
    require_qa_pass: bool,
    run_id: str | None = None,
    publish_command: str | None = None,
) -> ReviewResult:
    """Merge reviews.csv with the current candidates, decide approvals, write approvals.json and the page."""
    index, records = read_index(paths)
    with reviews_lock(paths):  # the review studio writes decisions under the same lock
        reviews = merge_reviews(read_reviews(paths.reviews_csv), records)
        write_reviews(reviews, paths.reviews_csv)
    approvals = decide(records, reviews, auto_approve=auto_approve, require_qa_pass=require_qa_pass)
    atomic_write_json(
        paths.approvals_json,
        {
            "dagster_run_id": run_id,
            "specs_sha256": index.get("specs_sha256"),
            "keys": {s["sku"]: s["key"] for s in index["skus"]},
            "auto_approve": auto_approve,
            "require_qa_pass": require_qa_pass,
            "approvals": approvals,
        },
        ensure_ascii=False,
    )
    page = contact_sheet_html(
        index,
        records,
        reviews,
        approvals,
        _read_rejected(paths.rejected_csv),
        run_id=run_id,
        publish_command=publish_command,
        sampler_names={k: v[1] for k, v in SAMPLERS.items()},
    )
    atomic_write_text(paths.contact_sheet, page)
    current = {candidate_key(r["sku"], c) for r in records for c in r["candidates"]}
    live = [r for r in reviews if r.key in current]
    return ReviewResult(
        contact_sheet=paths.contact_sheet,
        reviews_csv=paths.reviews_csv,
        approvals=approvals,
        n_candidates=len(current),
        n_approved_by_review=sum(r.decision == APPROVE for r in live),
        n_rejected_by_review=sum(r.decision == REJECT for r in live),
        skus_without_approval=[sku for sku, a in approvals.items() if not a],
    )
