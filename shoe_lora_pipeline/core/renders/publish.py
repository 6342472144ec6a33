"""published_renders' core: approved candidates → ``published/<profile>/<sku>/`` files a marketplace
accepts, marked as AI-generated, and ``published/manifest.csv``.

Per approved candidate: the hires pass (:mod:`.hires`, when on), then for each marketplace profile
(:mod:`core.marketplace`) the deterministic finishing (:mod:`core.finishing`), the marking — XMP
DigitalSourceType, A1111 parameters, the JSON provenance, an sRGB ICC profile and, with ``publish.c2pa``, a
signed C2PA manifest (:mod:`core.marking`) — and the compliance check read back from the written file
(:mod:`core.compliance`). A file that fails is not kept in that profile's folder; the manifest says why.

Each profile folder always mirrors the current approvals: it is rebuilt in a temporary sibling folder and
swapped in, so a shop syncing it never sees half a publication, and an image whose approval was withdrawn
disappears. Candidates are only read. An image identical to one rejected in reviews.csv is never
published, even when the reject was written after render_review last ran.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoe_lora_pipeline.core.compliance import check_file
from shoe_lora_pipeline.core.finishing import (
    DEFAULT_MAX_UPSCALE,
    DEFAULT_NEAR_WHITE,
    DEFAULT_TOLERANCE,
    ShadowMode,
    finish,
)
from shoe_lora_pipeline.core.fsutil import atomic_directory, atomic_write_text, file_sha256
from shoe_lora_pipeline.core.marketplace import MarketplaceProfile
from shoe_lora_pipeline.core.marking import (
    TRAINED_ALGORITHMIC_MEDIA,
    SigningCredentials,
    c2pa_manifest,
    c2pa_sign,
    encode_marked,
    make_test_certificate,
)
from shoe_lora_pipeline.core.renders.generate import SAMPLERS
from shoe_lora_pipeline.core.renders.hires import HiresPass
from shoe_lora_pipeline.core.renders.pnginfo import RENDER_SCHEMA, a1111_parameters
from shoe_lora_pipeline.core.renders.review import merge_reviews, read_reviews, rejected_images
from shoe_lora_pipeline.core.renders.store import RenderPaths, RendersStateError, read_index, read_json_record

if TYPE_CHECKING:
    from PIL import Image

    from shoe_lora_pipeline.core.config import PipelineConfig

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
    "hires",
)  # then one column per profile: the published file (relative to published/) or "flagged: <why>"


@dataclass
class ProfileOutcome:
    """One profile's share of a publication: the files written and the images refused, with why."""

    profile: MarketplaceProfile
    published: list[str] = field(default_factory=list)  # paths relative to published/
    failures: list[dict[str, Any]] = field(default_factory=list)  # {"file", "reasons": [...]}


@dataclass
class PublishResult:
    published_dir: Path
    manifest: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    skus_without_images: list[str] = field(default_factory=list)
    profiles: dict[str, ProfileOutcome] = field(default_factory=dict)
    c2pa: bool = False
    hires_generated: int = 0
    hires_reused: int = 0


@dataclass(frozen=True)
class PublishOptions:
    """How approved images become marketplace files (``publish:`` in the config)."""

    profiles: tuple[MarketplaceProfile, ...]
    shadow: ShadowMode = "keep"
    tolerance: int = DEFAULT_TOLERANCE
    near_white: int = DEFAULT_NEAR_WHITE
    credentials: SigningCredentials | None = None
    max_upscale: float = DEFAULT_MAX_UPSCALE

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> PublishOptions:
        """The config's publish section; a ``test_certificate`` is made here when it does not exist yet."""
        p = cfg.publish
        credentials = None
        if p.c2pa is not None:
            chain, key = p.c2pa.cert_chain, p.c2pa.private_key
            if chain is None or key is None:
                chain, key = make_test_certificate(cfg.c2pa_test_dir())
            credentials = SigningCredentials(chain, key, p.c2pa.algorithm, p.c2pa.timestamp_url)
        return cls(
            tuple(p.resolved_profiles()),
            p.shadow,
            p.background_tolerance,
            p.near_white,
            credentials,
            p.max_upscale,
        )


def package_version() -> str:
    from shoe_lora_pipeline.core.provenance import package_versions

    return str(package_versions(("shoe_lora_pipeline",))["shoe_lora_pipeline"])


def publish_image(
    image: Image.Image,
    profile: MarketplaceProfile,
    dest: Path,
    options: PublishOptions,
    *,
    parameters: str | None,
    render: Mapping[str, Any],
    waive: Sequence[str] = (),
) -> tuple[list[str], dict[str, Any]]:
    """Finish, mark, (sign) and check one image for one profile; keep ``dest`` only if it passes.
    Returns (the reasons it was refused, empty when kept; facts such as the fill). ``waive`` drops
    required metadata the source cannot give (an outside image has no A1111 parameters)."""
    finished = finish(
        image,
        profile,
        shadow=options.shadow,
        tolerance=options.tolerance,
        near_white=options.near_white,
        max_upscale=options.max_upscale,
    )
    facts: dict[str, Any] = {"fill": finished.fill, "upscale": finished.upscale}
    if finished.image is None:
        return finished.reasons, facts
    version = package_version()
    render = {**render, "profile": profile.name, "digital_source_type": TRAINED_ALGORITHMIC_MEDIA}
    data = encode_marked(
        finished.image,
        profile,
        parameters=parameters,
        render=render,
        creator_tool=f"shoe_lora_pipeline {version}",
    )
    if options.credentials is not None:
        assertion = {
            k: render.get(k)
            for k in (
                "sku",
                "lora_sha256",
                "dagster_run_id",
                "render_run_id",
                "config_hash",
                "seed",
                "profile",
            )
            if render.get(k) is not None
        }
        lora_run = (render.get("lora_provenance") or {}).get("dagster_run_id")
        if lora_run:
            assertion["lora_run_id"] = lora_run
        manifest = c2pa_manifest(
            title=dest.name, mime_type=profile.mime_type, version=version, assertion=assertion
        )
        data = c2pa_sign(data, profile.mime_type, manifest, options.credentials)
    # Checked as a hidden sibling (same extension: readers go by it), renamed into place only if it passes,
    # so ``dest`` never holds a failing or half-written file.
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = dest.with_name(f".{dest.stem}.partial{dest.suffix}")
    staged.write_bytes(data)
    relaxed = profile.model_copy(
        update={"required_metadata": tuple(r for r in profile.required_metadata if r not in waive)}
    )
    try:
        problems = check_file(staged, relaxed, c2pa_on=options.credentials is not None)
        if not problems:
            os.replace(staged, dest)
    finally:
        staged.unlink(missing_ok=True)
    facts["bytes"] = len(data)
    return problems, facts


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


def _write_manifest(rows: Sequence[Mapping[str, Any]], path: Path, profiles: Sequence[str]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*MANIFEST_COLUMNS, *profiles], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def _sha256sums(folder: Path) -> None:
    """``SHA256SUMS`` (``sha256sum -c`` format) of every file in a profile folder."""
    lines = [
        f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}"
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "SHA256SUMS"
    ]
    (folder / "SHA256SUMS").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _flagged(reasons: Sequence[str]) -> str:
    return "flagged: " + "; ".join(reasons)


def publish(
    paths: RenderPaths,
    index: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    approvals: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    options: PublishOptions,
    config_hash: str | None,
    run_id: str | None,
    hires: HiresPass | None = None,
    version: str | None = None,
    log: Callable[[str], None] = print,
    rejected: Set[str] = frozenset(),
) -> PublishResult:
    """Every approved candidate of ``records`` (through the hires pass when given), finished, marked and
    checked for each profile, except those whose ``image_sha256`` is in ``rejected``, into ``published/<profile>/<sku>/``; each profile folder is replaced as a
    whole, so a failure leaves the previous set. A candidate that cannot be read flags its SKU."""
    from PIL import Image, UnidentifiedImageError

    result = PublishResult(paths.published_dir, paths.manifest_csv, c2pa=options.credentials is not None)
    lora = index["lora"]
    version = version or f"shoe_lora_pipeline {package_version()}"
    names = [p.name for p in options.profiles]
    result.profiles = {p.name: ProfileOutcome(p) for p in options.profiles}
    if options.credentials is None:
        log("publish: C2PA signing is off (no publish.c2pa): files carry the XMP DigitalSourceType only")
    else:
        log(f"publish: signing C2PA manifests as {options.credentials.signer_name()}")
    paths.published_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        folders = {name: stack.enter_context(atomic_directory(paths.published_dir / name)) for name in names}
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
            s = record["settings"]
            for approval in chosen:
                c = by_file[approval["file"]]
                row = {
                    "sku": sku,
                    "file": f"{sku}/{c['file']}",
                    "sha256": "",
                    "prompt": record["row"]["prompt"],
                    "negative_prompt": record["row"]["negative_prompt"],
                    "seed": c["seed"],
                    "lora_sha256": record["lora_sha256"],
                    "qa_score": c["qa"]["score"],
                    "qa_passed": c["qa"]["passed"],
                    "approved_by": approval["source"],
                    "hires": "",
                }
                result.rows.append(row)
                source = paths.sku_dir(sku) / c["file"]
                try:
                    row["sha256"] = file_sha256(source)
                    with Image.open(source) as im:
                        im.load()
                        image = im.convert("RGB")
                except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
                    why = f"candidate {source} is unreadable ({exc})"
                    log(f"publish: {sku}: {why}; SKU flagged, the others publish")
                    for name in names:
                        row[name] = _flagged([why])
                        result.profiles[name].failures.append({"file": row["file"], "reasons": [why]})
                    continue
                extra: list[tuple[str, Any]] = []
                if hires is not None:
                    image = hires(
                        sku, record["key"], c["file"], image, record["row"]["prompt"],
                        record["row"]["negative_prompt"], c["seed"],
                    )  # fmt: skip
                    extra = hires.settings.a1111_fields()
                    row["hires"] = f"{image.width}x{image.height}"
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
                    extra_fields=extra,
                )
                prov = render_provenance(
                    record, c, index, approved_by=approval["source"], config_hash=config_hash, run_id=run_id
                )
                for profile in options.profiles:
                    rel = f"{sku}/{Path(c['file']).stem}{profile.suffix}"
                    problems, facts = publish_image(
                        image,
                        profile,
                        folders[profile.name] / rel,
                        options,
                        parameters=parameters,
                        render=prov,
                    )
                    outcome = result.profiles[profile.name]
                    if problems:
                        row[profile.name] = _flagged(problems)
                        outcome.failures.append({"file": row["file"], "reasons": problems, **facts})
                    else:
                        row[profile.name] = f"{profile.name}/{rel}"
                        outcome.published.append(f"{profile.name}/{rel}")
        for folder in folders.values():
            _sha256sums(folder)
        # Before the profile folders replace the previous ones: a manifest that does not fit (full disk)
        # leaves the previous set and its manifest.
        _write_manifest(result.rows, paths.manifest_csv, names)
    keep = {*names, paths.manifest_csv.name}
    for stale in paths.published_dir.iterdir():  # old per-SKU folders, profiles no longer configured
        if stale.name not in keep and not stale.name.startswith("."):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if hires is not None:
        result.hires_generated, result.hires_reused = hires.generated, hires.reused
        hires.prune()
    for sku in result.skus_without_images:
        log(f"published: nothing approved for {sku!r} (see contact_sheet.html / reviews.csv)")
    for outcome in result.profiles.values():
        for f in outcome.failures:
            log(f"publish: {f['file']} not published to {outcome.profile.name}: {'; '.join(f['reasons'])}")
    return result


def publish_renders(
    paths: RenderPaths,
    *,
    options: PublishOptions,
    config_hash: str | None,
    run_id: str | None,
    hires: HiresPass | None = None,
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
        options=options,
        config_hash=config_hash,
        run_id=run_id,
        hires=hires,
        version=version,
        log=log,
        # reviews.csv as it is now: a reject written since render_review ran is honoured too
        rejected=rejected_images(merge_reviews(read_reviews(paths.reviews_csv), records)),
    )
