"""One reviewer decision at a time into ``reviews.csv`` (the review studio's writes; no Dagster here).

Every write is read-modify-write of the whole file under :func:`reviews_lock`: the current reviews are read
with :func:`.review.read_reviews`, merged with the current candidates by :func:`.review.merge_reviews` (the
same rules render_review applies), the one row changed, and the file replaced atomically by
:func:`.review.write_reviews`. So two browsers deciding different candidates both keep their decision, the
same candidate decided twice keeps the later one, and a process killed mid-write leaves the previous file.
render_review takes the same lock around its own merge, so a decision made while it runs is not lost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from shoe_lora_pipeline.core.renders.review import (
    _DECISIONS,
    APPROVE,
    REJECT,
    Review,
    ReviewsError,
    candidate_key,
    decide,
    merge_reviews,
    read_reviews,
    reviews_lock,
    write_reviews,
)
from shoe_lora_pipeline.core.renders.store import RenderPaths, read_index


class CandidateGoneError(LookupError):
    """The candidate a decision names is not among the current candidates (re-rendered or removed)."""


def normalise_decision(value: str) -> str:
    """``approve`` / ``reject`` / ``""`` (no decision) from what a reviewer sent; ValueError otherwise."""
    decision = _DECISIONS.get(value.strip().lower())
    if decision is None:
        raise ValueError(f"decision {value!r}: use approve, reject or an empty value (no decision)")
    return decision


def _find(records: Sequence[Mapping[str, Any]], sku: str, seed: str, image_sha256: str) -> Mapping[str, Any]:
    for record in records:
        if record["sku"] != sku:
            continue
        for c in record["candidates"]:
            if str(c["seed"]) == str(seed) and (c.get("image_sha256") or "") == image_sha256:
                return c
        break
    raise CandidateGoneError(
        f"{sku!r}: no current candidate with seed {seed} and image {image_sha256[:12] or '(none)'}; "
        "it was re-rendered or removed since the page was loaded: reload the page"
    )


def record_decision(
    paths: RenderPaths,
    sku: str,
    seed: str,
    image_sha256: str,
    decision: str,
    note: str | None = None,
) -> Review:
    """Write one candidate's decision (and note, unless None) into reviews.csv; returns its row as saved.
    Raises :class:`CandidateGoneError` for a candidate that no longer exists (nothing is written),
    :class:`ReviewsError` when reviews.csv cannot be read (nothing is written)."""
    decision = normalise_decision(decision)
    with reviews_lock(paths):
        _, records = read_index(paths)
        candidate = _find(records, sku, seed, image_sha256)
        key = candidate_key(sku, candidate)
        reviews = merge_reviews(read_reviews(paths.reviews_csv), records)
        out, saved = [], None
        for r in reviews:
            if r.key == key:
                r = replace(r, decision=decision, note=r.note if note is None else " ".join(note.split()))
                saved = r
            out.append(r)
        if saved is None:  # merge_reviews lists every current candidate; kept for a clear failure
            raise ReviewsError(
                f"{paths.reviews_csv}: no row for {sku!r} / {candidate['file']!r} after merging"
            )
        write_reviews(out, paths.reviews_csv)
    return saved


def approve_top(paths: RenderPaths, sku: str, n: int) -> list[Review]:
    """Approve the ``n`` best-ranked candidates of ``sku`` that no review rejects (a reviewer's reject is
    never overturned in bulk); returns the rows approved."""
    if n < 1:
        raise ValueError(f"approve the top N: N = {n} must be at least 1")
    with reviews_lock(paths):
        _, records = read_index(paths)
        record = next((r for r in records if r["sku"] == sku), None)
        if record is None:
            raise CandidateGoneError(f"{sku!r} has no candidates now (removed from the specs sheet?)")
        reviews = merge_reviews(read_reviews(paths.reviews_csv), records)
        by_key = {r.key: r for r in reviews}
        chosen = []
        for c in record["candidates"]:  # best first
            if len(chosen) >= n:
                break
            if by_key[candidate_key(sku, c)].decision != REJECT:
                chosen.append(candidate_key(sku, c))
        approved = []
        out = []
        for r in reviews:
            if r.key in chosen:
                r = replace(r, decision=APPROVE)
                approved.append(r)
            out.append(r)
        write_reviews(out, paths.reviews_csv)
    return approved


@dataclass(frozen=True)
class CandidateView:
    """One candidate as a reviewer sees it."""

    sku: str
    file: str
    rank: int
    seed: str
    image_sha256: str
    qa_score: float
    qa_passed: bool
    qa_failed: tuple[str, ...]
    decision: str
    note: str
    publishes: str  # "review" | "auto" | "" (what render_review would approve now)


@dataclass(frozen=True)
class SkuView:
    sku: str
    prompt: str
    negative_prompt: str
    count: int
    candidates: tuple[CandidateView, ...]

    @property
    def undecided(self) -> bool:
        return not any(c.decision for c in self.candidates)

    @property
    def qa_failures(self) -> int:
        return sum(not c.qa_passed for c in self.candidates)


def review_state(paths: RenderPaths, *, auto_approve: bool, require_qa_pass: bool) -> list[SkuView]:
    """Every SKU of the last render with its candidates best first, their decisions (reviews.csv merged
    with the current candidates, as render_review would) and what would be published now."""
    _, records = read_index(paths)
    reviews = merge_reviews(read_reviews(paths.reviews_csv), records)
    by_key = {r.key: r for r in reviews}
    approvals = decide(records, reviews, auto_approve=auto_approve, require_qa_pass=require_qa_pass)
    out = []
    for record in records:
        sku = record["sku"]
        approved = {a["file"]: a["source"] for a in approvals.get(sku, [])}
        candidates = []
        for c in record["candidates"]:
            r = by_key.get(candidate_key(sku, c))
            qa = c["qa"]
            candidates.append(
                CandidateView(
                    sku=sku,
                    file=c["file"],
                    rank=int(c["rank"]),
                    seed=str(c["seed"]),
                    image_sha256=c.get("image_sha256") or "",
                    qa_score=float(qa["score"]),
                    qa_passed=bool(qa["passed"]),
                    qa_failed=tuple(qa.get("failed") or ()),
                    decision=r.decision if r else "",
                    note=r.note if r else "",
                    publishes=approved.get(c["file"], ""),
                )
            )
        row = record["row"]
        out.append(SkuView(sku, row["prompt"], row["negative_prompt"], int(row["count"]), tuple(candidates)))
    return out
