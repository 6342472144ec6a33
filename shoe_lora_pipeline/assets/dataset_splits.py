"""dataset_splits: train/val/test folders, assigned by a stable hash of each image's content."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import dagster as dg

from shoe_lora_pipeline.assets._category import category_config
from shoe_lora_pipeline.assets._metadata import config_metadata, md_table
from shoe_lora_pipeline.core.captions import read_captions_json
from shoe_lora_pipeline.core.layout import SPLITS, Layout
from shoe_lora_pipeline.core.splits import find_overlaps, make_splits, missing_or_extra_captions
from shoe_lora_pipeline.resources import PipelineConfigResource


@dg.asset(
    group_name="dataset",
    deps=["captions"],
    code_version="1",
    check_specs=[
        dg.AssetCheckSpec(
            "train_images_have_one_caption",
            asset="dataset_splits",
            description="Every train image has exactly one caption (and vice versa).",
        ),
        dg.AssetCheckSpec(
            "no_image_in_two_splits",
            asset="dataset_splits",
            description="No image appears in two splits.",
        ),
    ],
    description="train/val/test folders (images/*.png + captions.json each). Assignment hashes the image "
    "content, so adding photos never moves existing ones between splits.",
)
def dataset_splits(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource
) -> dg.MaterializeResult:
    cfg, layout = category_config(context, pipeline_config)
    entries = read_captions_json(layout.captions_json)
    # Strict stability: a newly added photo never moves an existing one, even a near-duplicate's original.
    result = make_splits(
        entries,
        layout.cleaned_images_dir,
        layout.dataset_dir,
        cfg.dataset.splits,
        group_near_duplicates=False,
    )
    for warning in result.warnings:
        context.log.warning(warning)
    counts = {split: result.counts.get(split, 0) for split in SPLITS}
    return dg.MaterializeResult(
        metadata={
            **config_metadata(cfg),
            **{f"{split}_count": n for split, n in counts.items()},
            "fractions": dg.MetadataValue.json(cfg.dataset.splits.model_dump()),
            "train_dir": dg.MetadataValue.path(str(layout.split_dir("train"))),
            "splits": dg.MetadataValue.md(
                md_table([{"split": s, "images": n} for s, n in counts.items()], ["split", "images"])
            ),
        },
        check_results=[train_images_have_one_caption(layout), no_image_in_two_splits(layout)],
    )


def train_images_have_one_caption(layout: Layout) -> dg.AssetCheckResult:
    problems = missing_or_extra_captions(layout.dataset_dir, "train")
    n_train = len(list((layout.split_dir("train") / "images").glob("*.png")))
    return dg.AssetCheckResult(
        check_name="train_images_have_one_caption",
        passed=not problems and n_train > 0,
        metadata={
            "train_images": n_train,
            "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems[:50]) or "_none_"),
        },
    )


def no_image_in_two_splits(layout: Layout) -> dg.AssetCheckResult:
    overlaps = find_overlaps(layout.dataset_dir)
    return dg.AssetCheckResult(
        check_name="no_image_in_two_splits",
        passed=not overlaps,
        metadata={"overlaps": dg.MetadataValue.md("\n".join(f"- {o}" for o in overlaps[:50]) or "_none_")},
    )
