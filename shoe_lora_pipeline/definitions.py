"""The Dagster code location: every asset, check and resource of the pipeline, assembled here."""

from __future__ import annotations

import dagster as dg

from shoe_lora_pipeline.assets import captions, cleaned_images, dataset_splits, raw_images
from shoe_lora_pipeline.resources import default_resources

_STAGE_MODULES = [raw_images, cleaned_images, captions, dataset_splits]

all_assets = dg.load_assets_from_modules(_STAGE_MODULES)
all_asset_checks = dg.load_asset_checks_from_modules(_STAGE_MODULES)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_asset_checks,
    resources=default_resources(),
)
