"""The Dagster code location: every asset, check and resource of the pipeline, assembled here."""

from __future__ import annotations

import dagster as dg

from shoe_lora_pipeline.assets import (
    captions,
    cleaned_images,
    dataset_splits,
    evaluation_report,
    final_pipeline,
    lora_training,
    lora_weights,
    raw_images,
    training_latents,
)
from shoe_lora_pipeline.resources import default_resources

# In pipeline order: raw photos → dataset → training → export.
_STAGE_MODULES = [
    raw_images,
    cleaned_images,
    captions,
    dataset_splits,
    training_latents,
    lora_training,
    lora_weights,
    final_pipeline,
    evaluation_report,
]

all_assets = dg.load_assets_from_modules(_STAGE_MODULES)
all_asset_checks = dg.load_asset_checks_from_modules(_STAGE_MODULES)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_asset_checks,
    resources=default_resources(),
)
