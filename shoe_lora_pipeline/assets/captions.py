"""captions: captions.json in the recipe's template, from styles.csv, a sidecar .txt, or the pixels."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import dagster as dg

from shoe_lora_pipeline.assets._category import category_config
from shoe_lora_pipeline.assets._metadata import config_metadata, md_table
from shoe_lora_pipeline.core.captions import build_captions, load_styles, write_captions
from shoe_lora_pipeline.resources import PipelineConfigResource


@dg.asset(
    group_name="dataset",
    deps=["cleaned_images"],
    kinds={"json"},
    code_version="1",
    description="One caption per cleaned image: 'A professional product photo of [colour] [type] shoes on "
    "white background, [characteristics], product photography'. A sidecar .txt next to the photo (same "
    "name: 1234.jpg → 1234.txt) wins, then the photo's line in a Hugging Face metadata.jsonl (file_name, "
    "text), then the styles.csv row with the file's id, else the colour read from the pixels. Incremental: "
    "a photo is re-captioned only when it or one of its caption sources changes.",
)
def captions(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource
) -> dg.MaterializeResult:
    cfg, layout = category_config(context, pipeline_config)
    styles = load_styles(cfg.dataset.styles_csv_path)
    result = build_captions(
        layout.cleaned_dir,
        cfg.dataset.raw_dir,
        styles,
        template=cfg.dataset.caption_template,
        default_type=cfg.dataset.default_type,
        default_characteristics=cfg.dataset.default_characteristics,
        previous=layout.captions_json,
    )
    write_captions(result, layout.captions_json)
    context.log.info(
        f"captioned {len(result.captioned)} photo(s), reused {result.reused_count} unchanged caption(s)"
    )
    # A full public styles.csv has tens of thousands of rows that match no photo: log a sample, count all.
    for problem in result.problems[:20]:
        context.log.warning(f"styles/captions: line {problem.get('line')}: {problem['problem']}")

    examples = [{"image_file": e["image_file"], "caption": e["caption"]} for e in result.entries[:8]]
    return dg.MaterializeResult(
        metadata={
            **config_metadata(cfg),
            "captions_json": dg.MetadataValue.path(str(layout.captions_json)),
            "num_captions": len(result.entries),
            "captioned_this_run": len(result.captioned),
            "reused_unchanged": result.reused_count,
            "by_source": dg.MetadataValue.json(dict(result.source_counts)),
            "colours": dg.MetadataValue.json(dict(result.colour_counts)),
            "types": dg.MetadataValue.json(dict(result.type_counts)),
            "problems_by_kind": dg.MetadataValue.json(dict(result.problem_counts)),
            "problems": dg.MetadataValue.md(
                md_table(result.problems[:100], ["line", "id", "kind", "problem"])
            ),
            "num_problems": sum(result.problem_counts.values()),
            "examples": dg.MetadataValue.md(md_table(examples, ["image_file", "caption"])),
        },
    )
