"""evaluation_report: base vs LoRA generations, metrics, product-photo QA and the recipe's checklist."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import dagster as dg

from shoe_lora_pipeline.assets._category import category_config, device_for
from shoe_lora_pipeline.assets._metadata import config_metadata, md_table, rounded, thumbnail_md
from shoe_lora_pipeline.core.config import EvaluationThresholds
from shoe_lora_pipeline.core.display import display_value
from shoe_lora_pipeline.core.evaluation.checks import check_descriptions
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource

# The recipe's validation checklist, one Dagster asset check each, worded from core.evaluation.checks.CHECKS
# (which also evaluates them). Declared here with the default thresholds; build_definitions words each
# category's checks from the configured evaluation.thresholds.
CHECKLIST = check_descriptions(EvaluationThresholds())
_SEVERITY = {"WARN": dg.AssetCheckSeverity.WARN, "ERROR": dg.AssetCheckSeverity.ERROR}


@dg.asset(
    group_name="evaluation",
    deps=["final_pipeline"],
    kinds={"pytorch"},
    pool="gpu",
    code_version="1",
    check_specs=[
        dg.AssetCheckSpec(n, asset="evaluation_report", description=d) for n, d in CHECKLIST.items()
    ],
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

    cfg, layout = category_config(context, pipeline_config)
    device_info = device_for(context, device, cfg)
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
                "value": display_value(c.value) if c.value is not None else "unavailable",
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
        **config_metadata(cfg, device_info, base_model.identity(cfg)),
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
    return dg.MaterializeResult(metadata=rounded(metadata), check_results=check_results)
