"""Jobs, the retraining schedule and the new-photo sensor.

Why a sensor and not Declarative Automation: a product photo folder is outside Dagster, so something has
to look at it; the sensor compares the folder's content hash with the data version of the category's last
``raw_images`` materialisation and asks for exactly one run (run key = category + manifest hash) of that
category's chain. The stages below ``raw_images`` are incremental (cleaning cache, latent cache), so the
run redoes only what the new photos change; training restarts because its dataset changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import dagster as dg

from shoe_lora_pipeline.assets import category_keys, render_keys
from shoe_lora_pipeline.core.config import PipelineConfig
from shoe_lora_pipeline.core.fsutil import file_sha256
from shoe_lora_pipeline.core.manifest import manifest_hash, scan_raw_dir
from shoe_lora_pipeline.lineage import DATA_VERSION_TAG


def listing_fingerprint(raw_dir: Path) -> str:
    """Cheap change detector: names, sizes and modification times only (no file is read)."""
    h = hashlib.sha256()
    if not raw_dir.is_dir():
        return "missing"
    for root, dirs, files in os.walk(raw_dir):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            try:
                st = path.stat()
            except OSError:
                continue
            h.update(f"{path.relative_to(raw_dir).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def last_trained_manifest(instance: dg.DagsterInstance, raw_images_key: dg.AssetKey) -> str | None:
    """The manifest hash (data version) of the category's last raw_images materialisation."""
    event = instance.get_latest_materialization_event(raw_images_key)
    if event is None or event.asset_materialization is None:
        return None
    return (event.asset_materialization.tags or {}).get(DATA_VERSION_TAG)


def build_automation(
    cfg: PipelineConfig,
) -> tuple[list[dg.UnresolvedAssetJobDefinition], list[dg.ScheduleDefinition], list[dg.SensorDefinition]]:
    # Product renders are not retrained on a schedule: a new LoRA would re-render every SKU and, with
    # renders.auto_approve, republish them unreviewed. The specs-sheet sensor or `--select
    # '*published_renders'` renders when a person wants new photos.
    retrain_job = dg.define_asset_job(
        "retrain_job",
        selection=dg.AssetSelection.all() - dg.AssetSelection.groups("renders"),
        description="The training graph, every category: photos → LoRA → evaluation report (renders not "
        "included: the specs-sheet sensor or a manual materialisation renders).",
    )
    # In one process: the four data steps are a chain of short steps (seconds for a few new photos), so
    # a process per step would cost more than the steps; cleaning runs its own pool on every core.
    dataset_job = dg.define_asset_job(
        "dataset_job",
        selection=dg.AssetSelection.groups("dataset"),
        executor_def=dg.in_process_executor,
        description="The data stage only: raw_images → cleaned_images → captions → dataset_splits.",
    )
    retrain_schedule = dg.ScheduleDefinition(
        name="retrain_schedule",
        job=retrain_job,
        cron_schedule=cfg.automation.retrain_cron,
        execution_timezone=cfg.automation.timezone,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"retrain_job at '{cfg.automation.retrain_cron}' ({cfg.automation.timezone}).",
    )
    primary = cfg.dataset.name
    categories = {name: cfg.for_category(name).dataset.raw_dir for name in cfg.category_names()}
    chains = {name: category_keys(name, primary=name == primary) for name in categories}

    @dg.sensor(
        name="new_photos_sensor",
        minimum_interval_seconds=cfg.automation.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        asset_selection=dg.AssetSelection.all(),
        description="Retrains a category when photos in its raw_dir are added, changed or deleted.",
    )
    def new_photos_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        cursor: dict[str, dict[str, str]] = json.loads(context.cursor) if context.cursor else {}
        requests = []
        for category, raw_dir in categories.items():
            listing = listing_fingerprint(raw_dir)
            seen = cursor.get(category, {})
            if listing == seen.get("listing") or listing == "missing":
                continue  # nothing on disk changed since the last tick: no file is read
            digest = manifest_hash(scan_raw_dir(raw_dir).manifest)
            cursor[category] = {"listing": listing, "manifest": digest}
            if digest == last_trained_manifest(context.instance, chains[category][0]):
                continue  # e.g. files touched, or already materialised by hand
            context.log.info(f"{category}: photos changed (manifest {digest[:12]}), requesting a run")
            requests.append(
                dg.RunRequest(
                    run_key=f"{category}:{digest}",
                    asset_selection=chains[category],
                    tags={"category": category, "trigger": "new_photos", "manifest_hash": digest},
                )
            )
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor, sort_keys=True))

    return [retrain_job, dataset_job], [retrain_schedule], [new_photos_sensor]


def last_rendered_sheet(instance: dg.DagsterInstance, product_renders_key: dg.AssetKey) -> str | None:
    """The specs sheet sha256 of the category's last product_renders materialisation."""
    event = instance.get_latest_materialization_event(product_renders_key)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("specs_sha256")
    return None if value is None else str(getattr(value, "value", value))


def build_specs_sensor(cfg: PipelineConfig) -> dg.SensorDefinition | None:
    """One run of a category's renders group per change of its specs sheet (run key = category + the
    sheet's sha256), like new_photos_sensor; None when no category has a specs sheet."""
    sheets = {
        name: sheet for name in cfg.category_names() if (sheet := cfg.for_category(name).renders.specs_csv)
    }
    if not sheets:
        return None
    primary = cfg.dataset.name

    @dg.sensor(
        name="specs_sheet_sensor",
        minimum_interval_seconds=cfg.automation.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        asset_selection=dg.AssetSelection.groups("renders"),
        description="Renders, reviews and publishes a category's product photos when its specs sheet changes.",
    )
    def specs_sheet_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        cursor: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        requests = []
        for category, sheet in sheets.items():
            try:
                digest = file_sha256(sheet)  # a specs sheet is small: hashing it is the cheap check
            except OSError:
                continue  # no sheet (yet): nothing to render
            if digest == cursor.get(category):
                continue
            cursor[category] = digest
            keys = render_keys(category, category == primary)
            if digest == last_rendered_sheet(context.instance, keys[0]):
                continue  # already rendered, e.g. materialised by hand
            context.log.info(f"{category}: specs sheet changed (sha256 {digest[:12]}), requesting a run")
            requests.append(
                dg.RunRequest(
                    run_key=f"{category}:{digest}",
                    asset_selection=keys,
                    tags={"category": category, "trigger": "specs_sheet", "specs_sha256": digest},
                )
            )
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor, sort_keys=True))

    return specs_sheet_sensor
