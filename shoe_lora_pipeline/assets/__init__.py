"""The pipeline's stages, one module each, in pipeline order; and one chain of them per category.

Each module declares its stage as a plain ``@dg.asset`` under the stage name; :func:`category_assets`
builds a category's chain from them (see :mod:`shoe_lora_pipeline.assets._category` for the keys).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import dagster as dg

from shoe_lora_pipeline.assets import (
    captions,
    cleaned_images,
    dataset_splits,
    evaluation_report,
    final_pipeline,
    lora_training,
    lora_weights,
    product_renders,
    published_renders,
    raw_images,
    render_review,
    training_latents,
)
from shoe_lora_pipeline.assets._category import category_key, for_category
from shoe_lora_pipeline.core.marketplace import MarketplaceProfile

# The stages in pipeline order: raw photos → dataset → training → export → evaluation.
STAGES: list[dg.AssetsDefinition] = [
    raw_images.raw_images,
    cleaned_images.cleaned_images,
    captions.captions,
    dataset_splits.dataset_splits,
    training_latents.training_latents,
    lora_training.lora_training,
    lora_weights.lora_weights,
    final_pipeline.final_pipeline,
    evaluation_report.evaluation_report,
]
STAGE_NAMES: list[str] = [stage.key.to_user_string() for stage in STAGES]
# Product renders, downstream of a category's LoRA; built for the categories that have renders.specs_csv.
RENDER_STAGES: list[dg.AssetsDefinition] = [
    product_renders.product_renders,
    render_review.render_review,
    published_renders.published_renders,
]
RENDER_STAGE_NAMES: list[str] = [stage.key.to_user_string() for stage in RENDER_STAGES]


def category_assets(
    category: str,
    stages: Iterable[str] | None = None,
    primary: bool = True,
    check_descriptions: Mapping[str, str] | None = None,
) -> list[dg.AssetsDefinition]:
    """One category's chain of assets (all stages unless named), in pipeline order; asset-check
    descriptions by check name from ``check_descriptions`` (the configured thresholds) where given."""
    wanted = STAGE_NAMES if stages is None else set(stages)
    unknown = set(wanted) - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}: expected some of {STAGE_NAMES}")
    return [
        for_category(stage, category, primary, check_descriptions)
        for stage in STAGES
        if stage.key.to_user_string() in wanted
    ]


def category_keys(category: str, primary: bool) -> list[dg.AssetKey]:
    """The asset keys of one category's chain, in pipeline order."""
    return [category_key(stage.key, category, primary) for stage in STAGES]


def render_assets(
    category: str, primary: bool = True, profiles: Sequence[MarketplaceProfile] | None = None
) -> list[dg.AssetsDefinition]:
    """One category's renders group (product_renders → render_review → published_renders); published_renders
    has one compliance check per marketplace profile (default: publish.profiles' default)."""
    stages = list(RENDER_STAGES)
    if profiles is not None:
        stages[-1] = published_renders.published_renders_asset(profiles)
    return [for_category(stage, category, primary) for stage in stages]


def render_keys(category: str, primary: bool) -> list[dg.AssetKey]:
    """The asset keys of one category's renders group, in order."""
    return [category_key(stage.key, category, primary) for stage in RENDER_STAGES]
