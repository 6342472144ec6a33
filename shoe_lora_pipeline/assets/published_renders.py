"""published_renders: the approved renders, hires-passed, finished for each marketplace profile, marked as
AI-generated (XMP, A1111 parameters, JSON provenance, C2PA), checked, and a manifest."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import dataclasses
from collections.abc import Sequence

import dagster as dg

from shoe_lora_pipeline.assets._category import category_config, device_for
from shoe_lora_pipeline.assets._metadata import config_metadata, md_table, thumbnail_md
from shoe_lora_pipeline.core.config import PipelineConfig
from shoe_lora_pipeline.core.display import short_hash
from shoe_lora_pipeline.core.layout import Layout
from shoe_lora_pipeline.core.marketplace import BUILTIN_PROFILES, MarketplaceProfile
from shoe_lora_pipeline.core.renders import RenderPaths, lora_source, pipeline_loader, render_dtype
from shoe_lora_pipeline.core.renders.hires import HiresPass, HiresSettings
from shoe_lora_pipeline.core.renders.publish import PublishOptions, PublishResult, publish_renders
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource

DEFAULT_PROFILES = (BUILTIN_PROFILES["amazon_main"],)  # publish.profiles' default


def compliance_check_name(profile: str) -> str:
    return f"{profile}_compliance"


def _hires_pass(
    context: dg.AssetExecutionContext,
    cfg: PipelineConfig,
    layout: Layout,
    device: DeviceResource,
    base_model: BaseModelResource,
) -> HiresPass | None:
    settings = HiresSettings.from_config(cfg)
    if settings is None:
        return None
    lora = lora_source(layout.lora_weights_dir, layout.final_pipeline_dir)

    def load() -> tuple[object, list[str]]:  # only when an approved image has no cached hires yet
        device_info = device_for(context, device, cfg)
        return pipeline_loader(
            lora,
            lambda: base_model.folder(cfg),
            device_info.torch_device,
            render_dtype(device_info.type, cfg.renders.precision),
            sampler=cfg.renders.sampler,
            lora_scale=cfg.export.fuse_lora_scale,
        )()

    return HiresPass(settings, layout.renders_dir / "hires", load, log=context.log.info)


def _check_results(result: PublishResult) -> list[dg.AssetCheckResult]:
    out = []
    for name, outcome in result.profiles.items():
        failures = [{"file": f["file"], "why": "; ".join(f["reasons"])} for f in outcome.failures]
        if not failures and not outcome.published:
            failures = [{"file": "(none)", "why": "nothing approved to publish (see render_review)"}]
        out.append(
            dg.AssetCheckResult(
                check_name=compliance_check_name(name),
                passed=not failures and bool(outcome.published),
                severity=dg.AssetCheckSeverity.ERROR,
                description=outcome.profile.rules(),
                metadata={
                    "files_published": len(outcome.published),
                    "files_failing": len(outcome.failures),
                    "failing": dg.MetadataValue.md(md_table(failures, ["file", "why"])),
                    "c2pa": "signed" if result.c2pa else "off (no publish.c2pa)",
                    "rules": outcome.profile.rules(),
                },
            )
        )
    return out


def _published_renders(
    context: dg.AssetExecutionContext,
    pipeline_config: PipelineConfigResource,
    device: DeviceResource,
    base_model: BaseModelResource,
) -> dg.MaterializeResult:
    cfg, layout = category_config(context, pipeline_config)
    options = PublishOptions.from_config(cfg)
    declared = {k.name for k in context.assets_def.check_keys}
    missing = [p.name for p in options.profiles if compliance_check_name(p.name) not in declared]
    if missing:
        options = dataclasses.replace(
            options, profiles=tuple(p for p in options.profiles if p.name not in missing)
        )
        context.log.warning(
            f"profile(s) {', '.join(missing)} have no asset check in these definitions (reload the code "
            "location after changing publish.profiles): not published this run"
        )
    result = publish_renders(
        RenderPaths(layout.renders_dir),
        options=options,
        config_hash=cfg.config_hash(),
        run_id=context.run.run_id,
        hires=_hires_pass(context, cfg, layout, device, base_model),
        log=context.log.warning,
    )
    lora_hashes = sorted({r['lora_sha256'] for r in result.rows if r.get('lora_sha256')})
    metadata = {
        **config_metadata(cfg),
        "published_dir": dg.MetadataValue.path(str(result.published_dir)),
        "manifest": dg.MetadataValue.path(str(result.manifest)),
        "images": len(result.rows),
        "skus_published": len({r["sku"] for r in result.rows}),
        "skus_without_images": dg.MetadataValue.json(result.skus_without_images),
        "profiles": ", ".join(result.profiles),
        "c2pa": "signed" if result.c2pa else "off (no publish.c2pa): XMP DigitalSourceType only",
        "hires_generated": result.hires_generated,
        "hires_reused": result.hires_reused,
        # A narrow table (short hashes; the full ones are in manifest.csv, the LoRA's below) so that no column
        # is cut off in the asset page; a profile column says "published" or why the file was flagged.
        "published": dg.MetadataValue.md(
            md_table(
                [
                    {
                        "file": r["file"],
                        "qa_score": r["qa_score"],
                        "qa_passed": r["qa_passed"],
                        "sha256": short_hash(r["sha256"]) if r["sha256"] else "",
                        "hires": r["hires"],
                        **{n: r[n] if str(r[n]).startswith("flagged") else "published" for n in result.profiles},
                    }
                    for r in result.rows
                ],
                ["file", "qa_score", "qa_passed", "sha256", "hires", *result.profiles],
            )
        ),
    }
    if len(lora_hashes) == 1:
        metadata["lora_sha256"] = lora_hashes[0]  # in full here; the table would cut it off
    for name, outcome in result.profiles.items():
        metadata[f"{name}_files"] = len(outcome.published)
    first = next((o.published[0] for o in result.profiles.values() if o.published), None)
    if first is not None:
        metadata["first_image"] = dg.MetadataValue.md(
            f"`{first}`\n\n" + thumbnail_md(result.published_dir / first, str(first), 256)
        )
    # Absent checks (a profile with nothing to publish, all SKUs unapproved) still report: failed, no files.
    return dg.MaterializeResult(metadata=metadata, check_results=_check_results(result))


def published_renders_asset(
    profiles: Sequence[MarketplaceProfile] = DEFAULT_PROFILES,
) -> dg.AssetsDefinition:
    """The published_renders stage with one compliance check per marketplace profile."""
    checks = [
        dg.AssetCheckSpec(
            compliance_check_name(p.name),
            asset="published_renders",
            description=f"Every approved image published to {p.name}: {p.rules()}; the metadata lists "
            "failing files and why.",
        )
        for p in profiles
    ]
    return dg.asset(
        name="published_renders",
        group_name="renders",
        deps=["render_review"],
        kinds={"jpeg", "png"},
        pool="gpu",
        code_version="2",
        check_specs=checks,
        description="published/PROFILE/SKU/: each approved candidate, re-rendered by the hires pass "
        "(renders.hires), finished for each publish.profiles marketplace profile (background snapped to pure "
        "white from the border, framed to the profile's aspect and fill, resampled to its size, sRGB ICC) and "
        "marked as AI-generated: XMP Iptc4xmpExt:DigitalSourceType trainedAlgorithmicMedia, the A1111 "
        "parameters, the JSON provenance (LoRA sha256, config hash, run ids; what `shoe-lora audit` / "
        "`lineage` read) and, with publish.c2pa, a signed C2PA manifest. Files failing their profile are "
        "not written; published/manifest.csv has a column per profile with the file or why it was flagged.",
    )(_published_renders)


published_renders = published_renders_asset()
