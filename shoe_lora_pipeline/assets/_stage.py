"""How a stage function becomes one Dagster asset per product category.

Each stage module defines its asset body once, decorated with :func:`stage` (which only records the
asset's settings). :func:`build_stage` turns it into an asset whose dependencies are the same category's
upstream stages, so every category is its own chain in the lineage graph, "Materialize all" trains every
category, and a run for one category never touches another's files.

Keys: the config's first category (the ``dataset:`` section) keeps the plain stage names
(``raw_images``, ``lora_weights``, …), so a single-category project and its Dagster history stay exactly
as they were; further categories are prefixed: ``boots/raw_images``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg


@dataclass(frozen=True)
class StageSpec:
    group: str
    description: str
    deps: tuple[str, ...] = ()
    checks: dict[str, str] = field(default_factory=dict)  # check name → description
    kinds: frozenset[str] = frozenset()
    pool: str | None = None
    code_version: str = "1"


def stage(
    *,
    group: str,
    description: str,
    deps: tuple[str, ...] = (),
    checks: dict[str, str] | None = None,
    kinds: set[str] | None = None,
    pool: str | None = None,
    code_version: str = "1",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Record a stage's asset settings on its body; the function itself is unchanged."""

    def record(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__stage__ = StageSpec(  # type: ignore[attr-defined]
            group=group,
            description=description,
            deps=deps,
            checks=dict(checks or {}),
            kinds=frozenset(kinds or ()),
            pool=pool,
            code_version=code_version,
        )
        return fn

    return record


def stage_key(stage_name: str, category: str, primary: bool) -> dg.AssetKey:
    """``stage`` for the first (primary) category, ``category/stage`` for the others."""
    return dg.AssetKey([stage_name] if primary else [category, stage_name])


def build_stage(fn: Callable[..., Any], category: str, primary: bool) -> dg.AssetsDefinition:
    spec: StageSpec = fn.__stage__  # type: ignore[attr-defined]
    key = stage_key(fn.__name__, category, primary)
    return dg.asset(
        key=key,
        deps=[stage_key(d, category, primary) for d in spec.deps],
        group_name=spec.group,
        description=spec.description,
        code_version=spec.code_version,
        kinds=set(spec.kinds) or None,
        pool=spec.pool,
        tags={"category": category},
        check_specs=[dg.AssetCheckSpec(name, asset=key, description=d) for name, d in spec.checks.items()],
    )(fn)


def category_of(context: dg.AssetExecutionContext) -> str:
    """The product category an asset run is for (recorded as the asset's ``category`` tag)."""
    return context.assets_def.tags_by_key[context.asset_key]["category"]
