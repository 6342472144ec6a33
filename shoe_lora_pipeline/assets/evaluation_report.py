"""evaluation_report: base vs LoRA generations, metrics, product-photo QA and the recipe's checklist."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import dagster as dg

from shoe_lora_pipeline.assets._metadata import config_metadata, md_table, thumbnail_md
from shoe_lora_pipeline.assets._stage import category_of, stage
from shoe_lora_pipeline.core.layout import Layout
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource

# The recipe's validation checklist (§7.4), one Dagster asset check each. The product-photo checks are
# ERROR severity when they fail; small-sample FID/IS/CLIP and the loss are WARN; unavailable never passes.
CHECKLIST = {
    "final_loss": "Final training loss below thresholds.final_loss_max (0.02).",
    "white_background": "At least 95 % of LoRA generations have a white background.",
    "centred": "At least 90 % of LoRA generations show a centred product.",
    "colour_adherence": "Generated product colours match the colour word in the prompt.",
    "no_mode_collapse": "Images of the same prompt differ (pHash diversity above the minimum).",
    "fid": "FID against the held-out test split below 30 (needs Inception weights).",
    "clip_score": "CLIP score above 25 (needs a local CLIP model).",
    "inception_score": "Inception Score above 6 (needs Inception weights).",
    "no_memorisation": "No generation is a near-copy of a training image.",
}
_SEVERITY = {"WARN": dg.AssetCheckSeverity.WARN, "ERROR": dg.AssetCheckSeverity.ERROR}


@stage(
    group="evaluation",
    deps=("final_pipeline",),
    kinds={"pytorch"},
    pool="gpu",
    checks=CHECKLIST,
    description="Generates the test prompts with the fine-tuned pipeline and the base model (same seeds), "
    "computes FID/KID vs the test split, CLIP score, IS and weight-free product-photo QA for both, and "
    "writes metrics.json, report.md and a self-contained report.html.",
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    pipeline_config: PipelineConfigResource,
    device: DeviceResource,
    base_model: BaseModelResource,
) -> dg.MaterializeResult:
    # Imported here, not at module level: the data steps load this module too and must not pay for torch.
    from shoe_lora_pipeline.core.evaluation import evaluate
    from shoe_lora_pipeline.core.lora_io import read_provenance

    cfg = pipeline_config.get(category_of(context))
    layout = Layout.of(cfg)
    device_info = device.resolve(cfg)
    base_dir = base_model.folder(cfg)
    result = evaluate(
        lora=layout.final_pipeline_dir,
        base=base_dir,
        config=cfg.evaluation,
        test_dir=layout.split_dir("test"),
        train_dir=layout.split_dir("train"),
        training_output_dir=layout.training_dir,
        out_dir=layout.evaluation_dir,
        resolution=cfg.dataset.resolution,
        device=device_info.torch_device,
        dtype=device_info.weight_dtype,
        provenance=read_provenance(layout.lora_weights_dir).get("provenance"),
        log=context.log.info,
    )

    check_results = [
        dg.AssetCheckResult(
            check_name=c.name,
            passed=c.passed,
            severity=_SEVERITY[c.severity],
            description=c.reason,
            metadata={
                "status": c.status,
                "value": c.value if c.value is not None else "unavailable",
                "threshold": f"{c.comparator} {c.threshold}".strip(),
                "reason": c.reason,
            },
        )
        for c in result.checks
        if c.name in CHECKLIST
    ]
    summary = result.summary()
    comparison = result.paths.comparison_grids
    metadata = {
        **config_metadata(cfg, device_info),
        "metrics": dg.MetadataValue.md(result.metric_table_markdown),
        "checks": dg.MetadataValue.md(
            md_table(
                [c.to_dict() for c in result.checks],
                ["name", "status", "severity", "value", "threshold", "reason"],
            )
        ),
        "white_background_share": summary["white_background_share"],
        "centred_share": summary["centred_share"],
        "colour_respected_share": summary["colour_respected_share"],
        "failed_checks": dg.MetadataValue.json(summary["failed_checks"]),
        "report_html": dg.MetadataValue.path(str(result.paths.report_html)),
        "metrics_json": dg.MetadataValue.path(str(result.paths.metrics_json)),
        "seconds": summary["seconds"],
    }
    for name, value in summary["metrics_lora"].items():
        if isinstance(value, int | float):
            metadata[f"lora_{name}"] = float(value)  # numeric metadata is plotted across materialisations
    if comparison:
        metadata["base_vs_lora_prompt0"] = dg.MetadataValue.md(
            thumbnail_md(comparison[0], "base vs LoRA", 480)
        )
    return dg.MaterializeResult(metadata=metadata, check_results=check_results)
