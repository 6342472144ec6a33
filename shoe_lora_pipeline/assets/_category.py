"""One asset per product category, from each stage's plain ``@dg.asset``.

Every stage module declares its asset once with ``@dg.asset`` (group, description, deps, kinds, pool,
code version, asset checks as ``dg.AssetCheckSpec``) under the plain stage name. :func:`for_category`
re-declares it for one product category with ``dg.multi_asset``: the same spec and checks, the key and the
deps moved under the category, and a ``category`` tag the body reads (:func:`category_of`). So every
category is its own chain in the lineage graph, "Materialize all" trains every category, and a run for
one category never touches another's files.

Keys: the config's first category (the ``dataset:`` section) keeps the plain stage names
(``raw_images``, ``lora_weights``, …), so a single-category project and its Dagster history stay exactly
as they were; further categories are prefixed: ``boots/raw_images``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import dagster as dg

from shoe_lora_pipeline.core import category_lock
from shoe_lora_pipeline.core.config import PipelineConfig
from shoe_lora_pipeline.core.layout import Layout
from shoe_lora_pipeline.core.lifetime import tie_step_to_run_worker

if TYPE_CHECKING:  # annotations only (DeviceInfo is torch-heavy)
    from shoe_lora_pipeline.core.device import DeviceInfo
    from shoe_lora_pipeline.resources import DeviceResource, PipelineConfigResource

CATEGORY_TAG = "category"


def category_key(key: dg.AssetKey, category: str, primary: bool) -> dg.AssetKey:
    """``key`` for the first (primary) category, ``category/key`` for the others."""
    return key if primary else key.with_prefix(category)


def _body(template: dg.AssetsDefinition) -> Callable[..., dg.MaterializeResult]:
    # ``@dg.asset`` keeps the decorated function on its op; Dagster has no public accessor for it.
    return template.op.compute_fn.decorated_fn  # type: ignore[union-attr]


def for_category(
    template: dg.AssetsDefinition,
    category: str,
    primary: bool,
    check_descriptions: Mapping[str, str] | None = None,
) -> dg.AssetsDefinition:
    """The stage asset ``template`` for one category: key, deps and checks under the category (unless
    primary), tagged ``category``; everything else (group, description, kinds, pool, code version)
    unchanged, except check descriptions given by name in ``check_descriptions`` (worded from the
    configured thresholds). The op is named after the key (``boots__raw_images``), so run logs say which
    category."""
    spec = template.get_asset_spec()
    key = category_key(spec.key, category, primary)
    spec = spec.replace_attributes(
        key=key, deps=[category_key(dep.asset_key, category, primary) for dep in spec.deps]
    ).merge_attributes(tags={CATEGORY_TAG: category})
    described = check_descriptions or {}
    checks = [
        c.replace_key(dg.AssetCheckKey(key, c.name))._replace(
            description=described.get(c.name, c.description)
        )
        for c in template.check_specs
    ]
    return dg.multi_asset(
        name=key.to_python_identifier(), specs=[spec], check_specs=checks, pool=template.op.pool
    )(_body(template))


def category_of(context: dg.AssetExecutionContext) -> str | None:
    """The product category an asset run is for (its ``category`` tag); ``None`` for a stage's plain
    template asset, which :meth:`PipelineConfigResource.get` reads as the config's first category."""
    return context.assets_def.tags_by_key[context.asset_key].get(CATEGORY_TAG)


def category_config(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource
) -> tuple[PipelineConfig, Layout]:
    """What every asset body starts from: the config of the category this run is for
    (:func:`category_of`) and that category's folders, after the step's start-up:

    * it ends with its run worker (``core/lifetime.py``): a SIGKILL of ``dagster asset materialize`` or a
      run worker leaves no step of ours running;
    * it holds the category's folder lock (``core/category_lock.py``) for this run: a step of another run
      (this instance or another one) writing the same category waits, then fails naming it. The lock is
      let go when the step's process ends or ``PipelineConfigResource`` is torn down (end of the step in
      the multiprocess executor, end of the run in the in-process one).
    """
    cfg = pipeline_config.get(category_of(context))
    tie_step_to_run_worker()
    folders = [cfg.dataset.output_dir, cfg.training.output_dir]
    category_lock.acquire_all(folders, context.run.run_id, cfg.automation.category_lock_timeout_s)
    return cfg, Layout.of(cfg)


def device_for(context: dg.AssetExecutionContext, device: DeviceResource, cfg: PipelineConfig) -> DeviceInfo:
    """The device a step computes on (the resource's choice, else the config's), said once in the run log."""
    device_info = device.resolve(cfg)
    context.log.info(f"device: {device_info.type} ({device_info.name}); {device_info.dtype_policy}")
    return device_info
