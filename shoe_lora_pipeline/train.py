"""The training entry point: ``python -m shoe_lora_pipeline.train --config FILE --category NAME [--override k=v]``.

Every way of training goes through :func:`train_category`: the ``lora_training`` asset in the Dagster
step (``training.launcher: inprocess``), this command alone, this command under ``accelerate launch``
(``accelerate``: one process per GPU) and this command in a Kubernetes pod (``k8s``). Launched by Dagster
Pipes, rank 0 opens the Pipes connection, streams the training log's lines to the Dagster run log and
reports the materialisation with the same metadata as the in-process asset; the other ranks write their
own log (``logs/rank<N>_training_log.txt`` in the training folder). Without Dagster the lines go to stderr.

Every process here ends with its parent (the Dagster step, or the launcher), and the ranks stop together
on SIGINT (a cancelled run) after the last complete checkpoint: ``core/distributed.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoe_lora_pipeline.core.distributed import Ranks
from shoe_lora_pipeline.core.lifetime import die_with_parent

if TYPE_CHECKING:
    from dagster_pipes import PipesContext

    from shoe_lora_pipeline.core.config import PipelineConfig
    from shoe_lora_pipeline.core.device import DeviceInfo
    from shoe_lora_pipeline.core.models import SDComponents
    from shoe_lora_pipeline.core.training import TrainingResult


def train_category(
    cfg: PipelineConfig,
    device_info: DeviceInfo,
    components: SDComponents,
    *,
    echo: Callable[[str], None] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    ranks: Ranks | None = None,
) -> TrainingResult:
    """Train one category's LoRA (``cfg`` already for that category) in the folders of ``core/layout.py``."""
    from shoe_lora_pipeline.core.layout import Layout
    from shoe_lora_pipeline.core.train_data import dataset_fingerprint
    from shoe_lora_pipeline.core.training import train_lora

    layout = Layout.of(cfg)
    train_dir = layout.split_dir("train")
    return train_lora(
        cfg,
        components,
        device_info,
        train_dir=train_dir,
        latents_dir=layout.latents_dir if cfg.training.cache_latents else None,
        val_dir=layout.split_dir("val"),
        val_latents_dir=layout.val_latents_dir,
        output_dir=layout.training_dir,
        dataset_fingerprint=dataset_fingerprint(train_dir),
        on_progress=on_progress,
        echo=echo,
        ranks=ranks,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m shoe_lora_pipeline.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="the pipeline's YAML config file")
    parser.add_argument("--category", default="", help="product category (default: the dataset: section's)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. training.max_train_steps=100",
    )
    parser.add_argument("--device", default="", help="auto|mps|cuda|cpu (default: the config's device)")
    parser.add_argument("--base-model-cache", default="", help="where tiny-sd is built (default: ~/.cache)")
    return parser.parse_args(argv)


def pipes_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Dagster metadata values in the form Dagster Pipes carries them (``{"raw_value", "type"}``)."""
    import dagster as dg

    kinds = {
        dg.MarkdownMetadataValue: "md",
        dg.PathMetadataValue: "path",
        dg.JsonMetadataValue: "json",
        dg.TextMetadataValue: "text",
        dg.IntMetadataValue: "int",
        dg.FloatMetadataValue: "float",
        dg.BoolMetadataValue: "bool",
    }
    out = {}
    for key, value in metadata.items():
        kind = kinds.get(type(value))
        if kind is not None:
            out[key] = {"raw_value": value.value, "type": kind}
        elif isinstance(value, dg.MetadataValue):
            raise TypeError(f"metadata {key!r}: no Pipes form for {type(value).__name__}")
        else:
            out[key] = {"raw_value": value, "type": "__infer__"}
    return out


@contextlib.contextmanager
def _pipes_on_rank_0(ranks: Ranks) -> Iterator[PipesContext | None]:
    """The Dagster Pipes connection on rank 0 when Dagster launched us; ``None`` otherwise."""
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if not (ranks.is_main and PipesEnvVarParamsLoader().is_dagster_pipes_process()):
        yield None
        return
    with open_dagster_pipes() as pipes:
        yield pipes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    die_with_parent()  # a killed launcher or Dagster step must not leave a training behind
    from shoe_lora_pipeline.core.config import load_config
    from shoe_lora_pipeline.core.device import choose_device
    from shoe_lora_pipeline.core.models import load_base_model

    # The raw photos are not needed here (training reads the splits), so their folder is not checked.
    cfg = load_config(args.config, overrides=args.override, check_paths=False)
    cfg = cfg.for_category(args.category or cfg.dataset.name)
    device_info = choose_device(args.device or cfg.device, cfg.training.mixed_precision)
    ranks = Ranks.start(cpu=device_info.type == "cpu")
    # The training log's lines on stderr once (rank 0; the others' are in their own log files), and
    # the libraries' warnings.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("shoe_lora_pipeline").setLevel(logging.INFO if ranks.is_main else logging.WARNING)
    try:
        with _pipes_on_rank_0(ranks) as pipes:
            components = load_base_model(
                cfg.training.base_model,
                revision=cfg.training.revision,
                cache_dir=Path(args.base_model_cache) if args.base_model_cache else None,
                dtype=device_info.weight_dtype,
                model_family=cfg.training.model_family,
                vae=cfg.training.vae,
            )
            result = train_category(
                cfg,
                device_info,
                components,
                echo=pipes.log.info if pipes else None,
                on_progress=(lambda p: pipes.log.info(p["line"])) if pipes else None,
                ranks=ranks,
            )
            if pipes is not None:
                from shoe_lora_pipeline.assets.lora_training import training_metadata

                metadata = training_metadata(cfg, device_info, components.identity, result)
                pipes.report_asset_materialization(metadata=pipes_metadata(metadata))
    finally:
        ranks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
