"""product_renders' core: render every accepted row of a specs sheet, incrementally, QA-ranked.

A SKU's candidates are keyed by :func:`render_key`: what changes their pixels (the row's hash, the LoRA's
tensors and adapter settings, the base model, the settings), not the LoRA file's bytes, so re-exporting the
same LoRA (or one with other provenance) re-renders nothing. A SKU whose key and files are unchanged is
reused without loading a model;
a changed row re-renders only its SKU; SKUs that left the sheet are removed. Each SKU's folder is replaced
atomically once all its candidates are generated and scored, so an interrupted run leaves every SKU either
as it was or complete.

Each candidate records ``image_sha256`` (its pixels), which reviews.csv keys decisions on. A re-rendered
SKU's render.json keeps the file, seed and image hash of the candidates it replaced under ``previous``, so
a reviews.csv row written before rows carried image hashes still finds its image after a rename.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoe_lora_pipeline.core.fsutil import atomic_directory, atomic_write_json, disk_full_guard
from shoe_lora_pipeline.core.renders.generate import (
    SAMPLERS,
    BatchStats,
    LoraSource,
    RenderJob,
    candidate_seed,
    render_batches,
)
from shoe_lora_pipeline.core.renders.pnginfo import a1111_parameters, png_info
from shoe_lora_pipeline.core.renders.ranking import ranked, score_candidate
from shoe_lora_pipeline.core.renders.specs import SpecRow, SpecsSheet, write_rejected
from shoe_lora_pipeline.core.renders.store import (
    INDEX_SCHEMA,
    RenderPaths,
    pixels_sha256,
    png_pixels_sha256,
)

if TYPE_CHECKING:
    from PIL import Image

    from shoe_lora_pipeline.core.config import PipelineConfig

CANDIDATES_SCHEMA = "shoe_lora_pipeline/render-candidates/v1"
# How many replaced candidates a render.json remembers (file → image) for old reviews.csv rows.
MAX_PREVIOUS = 256


@dataclass(frozen=True)
class RenderSettings:
    """What decides the pixels (part of every key) plus the batch size (which does not)."""

    steps: int
    guidance_scale: float
    size: int
    sampler: str
    seed: int
    candidates_per_image: int
    batch_size: int = 8
    lora_scale: float = 1.0  # export.fuse_lora_scale: the LoRA's strength in the render pipeline

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> RenderSettings:
        r = cfg.renders
        return cls(
            steps=r.num_inference_steps,
            guidance_scale=r.guidance_scale,
            size=r.resolution or cfg.dataset.resolution,
            sampler=r.sampler,
            seed=r.seed,
            candidates_per_image=r.candidates_per_image,
            batch_size=r.batch_size,
            lora_scale=cfg.export.fuse_lora_scale,
        )

    def keyed(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "size": self.size,
            "sampler": self.sampler,
            "seed": self.seed,
            "candidates_per_image": self.candidates_per_image,
            "lora_scale": self.lora_scale,
        }


def render_key(row: SpecRow, settings: RenderSettings, lora: LoraSource) -> str:
    """Hash of what decides a SKU's pixels (seeds follow from the row's SKU and the settings' seed)."""
    payload = {
        "row": row.row_hash(),
        "lora": lora.content_sha256,
        "base_model": lora.model_hash,
        "settings": settings.keyed(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def candidate_file(index: int, key: str) -> str:
    """``NNN-<key prefix>.png``: a re-rendered SKU gets new names (reviews follow the image, not the name)."""
    return f"{index:03d}-{key[:10]}.png"


@dataclass
class RenderRunResult:
    paths: RenderPaths
    sheet: SpecsSheet
    rendered: list[str] = field(default_factory=list)  # SKUs generated this run
    reused: list[str] = field(default_factory=list)  # SKUs whose key and files were unchanged
    removed: list[str] = field(default_factory=list)  # SKU folders of rows no longer in the sheet
    stats: BatchStats = field(default_factory=BatchStats)
    records: list[dict[str, Any]] = field(default_factory=list)  # render.json of every SKU, sheet order
    levers: list[str] = field(default_factory=list)

    @property
    def n_passing(self) -> int:
        return sum(1 for r in self.records for c in r["candidates"] if c["qa"]["passed"])


def _reusable(paths: RenderPaths, sku: str, key: str) -> dict[str, Any] | None:
    try:
        record = json.loads(paths.render_json(sku).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    try:
        complete = all((paths.sku_dir(sku) / c["file"]).is_file() for c in record["candidates"])
    except (KeyError, TypeError):  # a hand-edited or truncated record: render again
        return None
    return record if complete else None


def _previous_candidates(paths: RenderPaths, sku: str) -> list[dict[str, Any]]:
    """File, seed and image hash of the candidates about to be replaced (then those they remembered):
    render_review maps a reviews.csv row that names an old file and no image hash to its image."""
    try:
        old = json.loads(paths.render_json(sku).read_text(encoding="utf-8"))
        entries = [
            {
                "file": c["file"],
                "seed": c["seed"],
                "image_sha256": c.get("image_sha256") or png_pixels_sha256(paths.sku_dir(sku) / c["file"]),
            }
            for c in old["candidates"]
        ]
        seen = {e["file"] for e in entries}
        entries += [p for p in old.get("previous") or [] if p["file"] not in seen]
    except (OSError, ValueError, KeyError, TypeError):  # no earlier render, or a hand-edited record
        return []
    return [e for e in entries if e["image_sha256"]][:MAX_PREVIOUS]


def _jobs(row: SpecRow, settings: RenderSettings) -> list[RenderJob]:
    n = row.count * settings.candidates_per_image
    return [
        RenderJob(row.sku, i, row.prompt, row.negative_prompt, candidate_seed(settings.seed, row.sku, i))
        for i in range(n)
    ]


class _SkuCollector:
    """Receives batches (which mix SKUs) and finishes a SKU as soon as all its candidates are in."""

    def __init__(
        self,
        paths: RenderPaths,
        staging: Path,
        rows: Mapping[str, SpecRow],
        keys: Mapping[str, str],
        settings: RenderSettings,
        lora: LoraSource,
        run_id: str | None,
    ) -> None:
        self.paths, self.staging, self.rows, self.keys = paths, staging, rows, keys
        self.settings, self.lora, self.run_id = settings, lora, run_id
        self.pending = {sku: rows[sku].count * settings.candidates_per_image for sku in keys}
        self.candidates: dict[str, list[dict[str, Any]]] = {sku: [] for sku in keys}
        self.records: dict[str, dict[str, Any]] = {}

    def __call__(self, jobs: list[RenderJob], images: list[Image.Image]) -> None:
        for job, image in zip(jobs, images, strict=True):
            row, key = self.rows[job.sku], self.keys[job.sku]
            name = candidate_file(job.index, key)
            folder = self.staging / job.sku
            folder.mkdir(parents=True, exist_ok=True)
            rgb = image.convert("RGB")
            rgb.save(folder / name, pnginfo=png_info(self._parameters(job)))
            qa = score_candidate(rgb, row.colour)
            self.candidates[job.sku].append(
                {
                    "index": job.index,
                    "file": name,
                    "seed": job.seed,
                    "image_sha256": pixels_sha256(rgb),
                    "qa": qa.to_json(),
                }
            )
            self.pending[job.sku] -= 1
            if self.pending[job.sku] == 0:
                self._finish(job.sku)

    def _parameters(self, job: RenderJob) -> str:
        s = self.settings
        return a1111_parameters(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            steps=s.steps,
            sampler=SAMPLERS[s.sampler][1],
            cfg_scale=s.guidance_scale,
            seed=job.seed,
            size=s.size,
            model_hash=self.lora.model_hash,
            model=self.lora.base_model,
            lora_name=self.lora.name,
            lora_hash=self.lora.a1111_hash,
        )

    def _finish(self, sku: str) -> None:
        row = self.rows[sku]
        record = {
            "schema": CANDIDATES_SCHEMA,
            "sku": sku,
            "key": self.keys[sku],
            "row": asdict(row),
            "row_hash": row.row_hash(),
            "lora_sha256": self.lora.lora_sha256,
            "lora_content_sha256": self.lora.content_sha256,
            "settings": self.settings.keyed(),
            "dagster_run_id": self.run_id,
            "candidates": ranked(self.candidates[sku]),
            "previous": _previous_candidates(self.paths, sku),
        }
        with atomic_directory(self.paths.sku_dir(sku)) as tmp:
            for c in record["candidates"]:
                shutil.move(str(self.staging / sku / c["file"]), tmp / c["file"])
            atomic_write_json(tmp / "render.json", record, ensure_ascii=False)
        self.records[sku] = record


def render_sheet(
    sheet: SpecsSheet,
    renders_dir: Path,
    settings: RenderSettings,
    lora: LoraSource,
    load_pipeline: Callable[[], tuple[Any, list[str]]],
    *,
    run_id: str | None = None,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
) -> RenderRunResult:
    """Render the sheet's accepted rows under ``renders_dir``; ``load_pipeline`` → (pipeline, levers) is
    called only when some SKU needs generating."""
    warn = warn or log
    paths = RenderPaths(Path(renders_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    result = RenderRunResult(paths=paths, sheet=sheet)
    write_rejected(sheet.rejected, paths.rejected_csv)
    for r in sheet.rejected:
        warn(f"specs row refused: {r.describe()}")
    for note in sheet.notes:
        log(note)

    rows = {r.sku: r for r in sheet.rows}
    keys = {sku: render_key(row, settings, lora) for sku, row in rows.items()}
    existing = {sku: _reusable(paths, sku, key) for sku, key in keys.items()}
    todo = [sku for sku in rows if existing[sku] is None]
    result.reused = [sku for sku in rows if existing[sku] is not None]
    log(
        f"renders: {len(rows)} SKUs ({len(result.reused)} unchanged, {len(todo)} to render), {len(sheet.rejected)} rows refused"
    )

    if todo:
        pipe, result.levers = load_pipeline()
        jobs = [job for sku in todo for job in _jobs(rows[sku], settings)]
        # A full disk mid-batch: the staging folder goes, the candidates of earlier runs stay.
        with disk_full_guard(paths.root):
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=paths.root))
            try:
                collect = _SkuCollector(
                    paths, staging, rows, {s: keys[s] for s in todo}, settings, lora, run_id
                )
                result.stats = render_batches(
                    pipe,
                    jobs,
                    steps=settings.steps,
                    guidance_scale=settings.guidance_scale,
                    size=settings.size,
                    batch_size=settings.batch_size,
                    on_batch=collect,
                    log=log,
                )
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        existing.update(collect.records)
        result.rendered = todo

    if paths.candidates_dir.is_dir():
        for folder in sorted(paths.candidates_dir.iterdir()):
            if folder.is_dir() and folder.name not in rows:
                shutil.rmtree(folder)
                result.removed.append(folder.name)
    if result.removed:
        log(f"renders: removed the candidates of {len(result.removed)} SKUs no longer in the sheet")

    result.records = [existing[sku] for sku in rows]
    index = {
        "schema": INDEX_SCHEMA,
        "specs_csv": str(sheet.path) if sheet.path else None,
        "specs_sha256": sheet.sha256,
        "lora": lora.to_json(),
        "settings": settings.keyed(),
        "dagster_run_id": run_id,
        "rejected": len(sheet.rejected),
        "skus": [
            {"sku": sku, "key": keys[sku], "count": rows[sku].count, "rendered": sku in result.rendered}
            for sku in rows
        ],
    }
    atomic_write_json(paths.index_json, index, ensure_ascii=False)
    return result
