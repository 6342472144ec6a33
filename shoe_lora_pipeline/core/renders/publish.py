"""published_renders' core: approved candidates → ``published/<sku>/`` with provenance and a manifest.

``published/`` always mirrors the current approvals: it is rebuilt in a temporary sibling folder and
swapped in, so a shop syncing it never sees half a publication, and an image whose approval was withdrawn
disappears. Every PNG is written anew with the ``parameters`` and ``shoe_lora_render`` text chunks (the
pixels are the candidate's). An image identical to one rejected in reviews.csv is never published, even
when the reject was written after render_review last ran.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoe_lora_pipeline.core.fsutil import atomic_directory, atomic_write_text, file_sha256
from shoe_lora_pipeline.core.renders.generate import SAMPLERS
from shoe_lora_pipeline.core.renders.pnginfo import RENDER_SCHEMA, a1111_parameters, png_info
from shoe_lora_pipeline.core.renders.review import merge_reviews, read_reviews, rejected_images
from shoe_lora_pipeline.core.renders.store import RenderPaths, RendersStateError, read_index, read_json_record

MANIFEST_COLUMNS = (
    "sku",
    "file",
    "sha256",
    "prompt",
    "negative_prompt",
    "seed",
    "lora_sha256",
    "qa_score",
    "qa_passed",
    "approved_by",
)


@dataclass
class PublishResult:
    published_dir: Path
    manifest: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    skus_without_images: list[str] = field(default_factory=list)


def render_provenance(
    record: Mapping[str, Any],
    candidate: Mapping[str, Any],
    index: Mapping[str, Any],
    *,
    approved_by: str,
    config_hash: str | None,
    run_id: str | None,
) -> dict[str, Any]:
    """The ``shoe_lora_render`` JSON chunk of one published image."""
    lora = index["lora"]
    row = record["row"]
    return {
        "schema": RENDER_SCHEMA,
        "sku": record["sku"],
        "prompt": row["prompt"],
        "negative_prompt": row["negative_prompt"],
        "seed": candidate["seed"],
        "candidate_index": candidate["index"],
        "settings": record["settings"],
        "lora_file": lora["lora_file"],
        "lora_sha256": record["lora_sha256"],
        "pipeline": lora.get("pipeline"),
        "config_hash": config_hash,
        "dagster_run_id": run_id,  # the run that published it
        "render_run_id": record.get("dagster_run_id"),  # the run that generated it
        "render_key": record["key"],
        "approved_by": approved_by,
        "qa": candidate["qa"],
        # The LoRA's own record: its dagster_run_id leads `shoe-lora lineage` back to the training photos.
        "lora_provenance": lora.get("provenance") or {},
    }


def _write_manifest(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def publish(
    paths: RenderPaths,
    index: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    approvals: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    config_hash: str | None,
    run_id: str | None,
    version: str | None = None,
    log: Callable[[str], None] = print,
    rejected: Set[str] = frozenset(),
) -> PublishResult:
    """Write every approved candidate of ``records`` into ``paths.published_dir`` (replaced as a whole),
    except those whose ``image_sha256`` is in ``rejected``."""
    from PIL import Image

    result = PublishResult(paths.published_dir, paths.manifest_csv)
    lora = index["lora"]
    if version is None:
        from shoe_lora_pipeline.core.provenance import package_versions

        version = f"shoe_lora_pipeline {package_versions(('shoe_lora_pipeline',))['shoe_lora_pipeline']}"
    with atomic_directory(paths.published_dir) as tmp:
        for record in records:
            sku = record["sku"]
            chosen = approvals.get(sku, [])
            if not chosen:
                result.skus_without_images.append(sku)
                continue
            by_file = {c["file"]: c for c in record["candidates"]}
            refused = [a for a in chosen if by_file[a["file"]].get("image_sha256") in rejected]
            for approval in refused:
                log(f"published: {sku}/{approval['file']} not published: reviews.csv rejects this image")
            chosen = [a for a in chosen if a not in refused]
            if not chosen:
                result.skus_without_images.append(sku)
                continue
            (tmp / sku).mkdir(parents=True, exist_ok=True)
            for approval in chosen:
                c = by_file[approval["file"]]
                s = record["settings"]
                parameters = a1111_parameters(
                    prompt=record["row"]["prompt"],
                    negative_prompt=record["row"]["negative_prompt"],
                    steps=s["steps"],
                    sampler=SAMPLERS[s["sampler"]][1],
                    cfg_scale=s["guidance_scale"],
                    seed=c["seed"],
                    size=s["size"],
                    model_hash=lora.get("model_hash"),
                    model=lora.get("base_model"),
                    lora_name=lora["name"],
                    lora_hash=lora["a1111_hash"],
                    version=version,
                )
                prov = render_provenance(
                    record, c, index, approved_by=approval["source"], config_hash=config_hash, run_id=run_id
                )
                target = tmp / sku / c["file"]
                with Image.open(paths.sku_dir(sku) / c["file"]) as im:
                    im.convert("RGB").save(target, pnginfo=png_info(parameters, prov))
                result.rows.append(
                    {
                        "sku": sku,
                        "file": f"{sku}/{c['file']}",
                        "sha256": file_sha256(target),
                        "prompt": record["row"]["prompt"],
                        "negative_prompt": record["row"]["negative_prompt"],
                        "seed": c["seed"],
                        "lora_sha256": record["lora_sha256"],
                        "qa_score": c["qa"]["score"],
                        "qa_passed": c["qa"]["passed"],
                        "approved_by": approval["source"],
                    }
                )
        _write_manifest(result.rows, tmp / paths.manifest_csv.name)
    for sku in result.skus_without_images:
        log(f"published: nothing approved for {sku!r} (see contact_sheet.html / reviews.csv)")
    return result


def publish_renders(
    paths: RenderPaths,
    *,
    config_hash: str | None,
    run_id: str | None,
    version: str | None = None,
    log: Callable[[str], None] = print,
) -> PublishResult:
    """Publish what render_review approved for the candidates product_renders made."""
    index, records = read_index(paths)
    decided = read_json_record(paths.approvals_json, "render_review")
    current = {s["sku"]: s["key"] for s in index["skus"]}
    if decided.get("keys") != current:
        raise RendersStateError(
            f"{paths.approvals_json} was decided for other candidates than {paths.index_json} lists; "
            "materialize render_review again"
        )
    return publish(
        paths,
        index,
        records,
        decided["approvals"],
        config_hash=config_hash,
        run_id=run_id,
        version=version,
        log=log,
        # reviews.csv as it is now: a reject written since render_review ran is honoured too
        rejected=rejected_images(merge_reviews(read_reviews(paths.reviews_csv), records)),
    )
