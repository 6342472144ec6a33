"""The lineage of a LoRA, read from a Dagster instance's event log (``shoe-lora lineage``).

Given the run that materialised a ``<category>/lora_weights`` asset, find the materialisation of every
upstream asset that fed it and of the downstream assets (fused pipeline, evaluation report) that were
built from it, without a daemon or webserver: only the instance's storage is read.

Which asset is upstream of which comes from an *asset graph*, any object with ``has(key)`` and
``get(key).parent_keys / .child_keys`` — Dagster's own ``Definitions.resolve_asset_graph()`` (what the CLI
loads from :mod:`shoe_lora_pipeline.definitions`) or :class:`RecordedAssetGraph`, the edges Dagster wrote
on the materialisations themselves (used when the definitions cannot be loaded or no longer contain the
LoRA's key, e.g. the config changed since).

Which *materialisation* of a parent fed a child is decided edge by edge, starting at the LoRA:

1. the ``dagster/input_event_pointer/<parent>`` tag Dagster records on every materialisation (the storage
   id of the parent's materialisation the step saw) — exact, even if the parent was re-materialised while
   the child was running;
2. where that tag is missing (a record written outside an asset job), the parent's latest
   materialisation *before* the child's in the event log (storage ids are the event log's total order, so
   equal timestamps cannot reorder two events).

Walking edge by edge (rather than taking each ancestor's latest materialisation before the LoRA) means a
raw manifest re-scanned after the dataset was cleaned, but before training, is not reported as the data
the LoRA was trained on; it is reported in :attr:`Lineage.notes` instead. For a chain run in order the two
rules give the same answer.

Public Dagster APIs used: ``DagsterInstance.get``, ``get_run_record_by_id``, ``get_asset_keys``,
``fetch_materializations`` with ``AssetRecordsFilter`` (``get_event_records`` is deprecated in 1.13) and
``DataProvenance.from_tags``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Set
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import dagster as dg

LORA_ASSET_NAME = "lora_weights"
# Tags Dagster writes on every materialisation (the sensor in automation.py reads the data version too).
DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"
_PAGE = 100

# Metadata that identifies the data an asset produced, shown in the table (all plain metadata is in JSON).
KEY_METADATA = (
    "manifest_hash",
    "dataset_manifest_hash",
    "config_hash",
    "num_files",
    "raw_count",
    "valid_count",
    "num_captions",
    "train_images",
    "items",
    "base_model_fingerprint",
    "global_step",
    "max_train_steps",
    "final_loss",
    "checkpoint",
    "step",
    "rank",
    "alpha",
    "lora_scale",
)
# Path metadata that is the same for every asset, left out of the table.
_COMMON_PATHS = frozenset({"config_file"})
_PLAIN_METADATA = (
    dg.TextMetadataValue,
    dg.IntMetadataValue,
    dg.FloatMetadataValue,
    dg.BoolMetadataValue,
    dg.PathMetadataValue,
    dg.UrlMetadataValue,
    dg.TimestampMetadataValue,
    dg.NullMetadataValue,
)


class LineageError(Exception):
    """A lineage cannot be produced; the message names the run, asset or folder at fault."""


# A metadata value as JSON: what :func:`plain_metadata` keeps of Dagster's scalar and path values.
JsonScalar = str | int | float | bool | None


class AssetNodeLike(Protocol):
    """One asset in an asset graph: its parents and children."""

    @property
    def parent_keys(self) -> Set[dg.AssetKey]: ...

    @property
    def child_keys(self) -> Set[dg.AssetKey]: ...


class AssetGraphLike(Protocol):
    """What the lineage needs of an asset graph (Dagster's ``BaseAssetGraph`` satisfies it)."""

    def has(self, asset_key: dg.AssetKey) -> bool: ...

    def get(self, asset_key: dg.AssetKey) -> AssetNodeLike: ...


# -- instance ------------------------------------------------------------------------------------------


@contextmanager
def open_instance(dagster_home: str | Path | None = None) -> Iterator[dg.DagsterInstance]:
    """The instance in ``dagster_home`` (default ``$DAGSTER_HOME``), via ``DagsterInstance.get()``.

    Refuses a folder with neither ``dagster.yaml`` nor ``history/`` rather than creating an empty
    instance there: an audit must never invent storage.
    """
    if dagster_home is not None:
        path = Path(dagster_home).expanduser().resolve()
        source = f"--dagster-home {path}"
    else:
        home = os.environ.get("DAGSTER_HOME", "")
        if not home:
            raise LineageError(
                "no Dagster instance: DAGSTER_HOME is not set (set it, or pass --dagster-home DIR)"
            )
        path = Path(home).expanduser().resolve()
        source = f"DAGSTER_HOME={path}"
    if not path.is_dir():
        raise LineageError(f"{source}: no such folder")
    if not (path / "dagster.yaml").is_file() and not (path / "history").is_dir():
        raise LineageError(f"{source}: not a Dagster instance (no dagster.yaml and no history/)")
    previous = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(path)
    try:
        instance = dg.DagsterInstance.get()
    except Exception as exc:  # a broken dagster.yaml, an unreachable database …
        raise LineageError(f"{source}: cannot open the Dagster instance: {exc}") from None
    finally:
        if previous is None:
            del os.environ["DAGSTER_HOME"]
        else:
            os.environ["DAGSTER_HOME"] = previous
    try:
        yield instance
    finally:
        instance.dispose()


def _fetch_one(
    instance: dg.DagsterInstance, records_filter: dg.AssetRecordsFilter
) -> dg.EventLogRecord | None:
    records = instance.fetch_materializations(records_filter, limit=1).records
    return records[0] if records else None


def _iter_materializations(
    instance: dg.DagsterInstance, records_filter: dg.AssetRecordsFilter, ascending: bool = False
) -> Iterator[dg.EventLogRecord]:
    cursor = None
    while True:
        result = instance.fetch_materializations(
            records_filter, limit=_PAGE, cursor=cursor, ascending=ascending
        )
        yield from result.records
        if not result.has_more or not result.records:
            return
        cursor = result.cursor


def _tags(record: dg.EventLogRecord) -> Mapping[str, str]:
    return record.asset_materialization.tags or {}


def _provenance(record: dg.EventLogRecord) -> dg.DataProvenance | None:
    return dg.DataProvenance.from_tags(_tags(record))


def _in_run(
    instance: dg.DagsterInstance, run_record: dg.RunRecord, keys: Iterable[dg.AssetKey]
) -> list[dg.EventLogRecord]:
    """The latest materialisation of each of ``keys`` made by the run (public API only: each key's
    materialisations in the run's time window, filtered by run id)."""
    run_id = run_record.dagster_run.run_id
    start = run_record.start_time or run_record.create_timestamp.timestamp()
    window = {"after_timestamp": start - 1.0}  # 1 s of slack for clock rounding
    if run_record.end_time is not None:
        window["before_timestamp"] = run_record.end_time + 1.0
    found = []
    for key in sorted(keys, key=lambda k: k.to_user_string()):
        for record in _iter_materializations(instance, dg.AssetRecordsFilter(key, **window)):
            if record.run_id == run_id:
                found.append(record)
                break
    return found


def find_lora_materializations(
    instance: dg.DagsterInstance, run_id: str, category: str | None = None, prefer_category: str | None = None
) -> list[dg.EventLogRecord]:
    """The ``…/lora_weights`` materialisations of a run (latest per key): only ``category``'s if given
    (an error if the run has none); ``prefer_category``'s if the run has several and one is that."""
    run_record = instance.get_run_record_by_id(run_id)
    if run_record is None:
        where = getattr(instance, "root_directory", None)
        raise LineageError(
            f"run {run_id} not found in the Dagster instance" + (f" at {where}" if where else "")
        )
    keys = instance.get_asset_keys()
    found = _in_run(instance, run_record, [k for k in keys if k.path[-1] == LORA_ASSET_NAME])
    if not found:
        run = run_record.dagster_run
        made = (
            ", ".join(r.asset_key.to_user_string() for r in _in_run(instance, run_record, keys)) or "nothing"
        )
        raise LineageError(
            f"run {run_id} (job {run.job_name}, {run.status.value}) materialised no "
            f"<category>/{LORA_ASSET_NAME} asset (it materialised: {made})"
        )
    if category is not None:
        mine = [r for r in found if list(r.asset_key.path[:-1]) == [category]]
        if not mine:
            have = ", ".join(r.asset_key.to_user_string() for r in found)
            raise LineageError(
                f"run {run_id} materialised no {category}/{LORA_ASSET_NAME} (it materialised {have})"
            )
        found = mine
    elif prefer_category is not None and len(found) > 1:
        found = [r for r in found if list(r.asset_key.path[:-1]) == [prefer_category]] or found
    return found


# -- asset graphs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    parent_keys: frozenset[dg.AssetKey]
    child_keys: frozenset[dg.AssetKey]


class RecordedAssetGraph:
    """The asset graph as Dagster recorded it: each asset's parents are the assets named in the
    ``dagster/input_*`` tags of its latest materialisation. Knows only materialised assets."""

    def __init__(self, parents: Mapping[dg.AssetKey, Iterable[dg.AssetKey]]):
        self._parents = {k: frozenset(v) for k, v in parents.items()}
        children: dict[dg.AssetKey, set[dg.AssetKey]] = {k: set() for k in self._parents}
        for key, ps in self._parents.items():
            for p in ps:
                children.setdefault(p, set()).add(key)
        self._nodes = {
            k: _Node(self._parents.get(k, frozenset()), frozenset(children.get(k, ())))
            for k in set(self._parents) | set(children)
        }

    def has(self, asset_key: dg.AssetKey) -> bool:
        return asset_key in self._nodes

    def get(self, asset_key: dg.AssetKey) -> _Node:
        return self._nodes[asset_key]

    @classmethod
    def from_instance(
        cls, instance: dg.DagsterInstance, prefix: list[str] | None = None
    ) -> RecordedAssetGraph:
        keys = instance.get_asset_keys(prefix=prefix) if prefix else instance.get_asset_keys()
        parents: dict[dg.AssetKey, set[dg.AssetKey]] = {}
        for key in keys:
            record = _fetch_one(instance, dg.AssetRecordsFilter(key))
            prov = _provenance(record) if record is not None else None
            parents[key] = set(prov.input_data_versions) | set(prov.input_storage_ids) if prov else set()
        return cls(parents)


def load_definitions_graph() -> AssetGraphLike:
    """The asset graph of the project's code location (imports the definitions: slow, may fail)."""
    from shoe_lora_pipeline.definitions import defs

    return defs().resolve_asset_graph()


@dataclass(frozen=True)
class GraphChoice:
    graph: AssetGraphLike
    source: str  # "definitions" | "instance"
    note: str | None = None


GRAPH_MODES = ("auto", "definitions", "instance")


def choose_graph(
    mode: str,
    instance: dg.DagsterInstance,
    lora_key: dg.AssetKey,
    definitions_graph: AssetGraphLike | Exception | None,
) -> GraphChoice:
    """The graph to walk for ``lora_key``. ``mode``: ``definitions`` (must be loaded and contain the
    key), ``instance`` (the recorded edges) or ``auto`` (definitions, else the recorded edges, with a note
    saying why). ``definitions_graph`` is the loaded graph or the exception its loading raised."""
    if mode not in GRAPH_MODES:
        raise LineageError(f"asset graph {mode!r}: expected one of {', '.join(GRAPH_MODES)}")
    note = None
    if mode != "instance":
        if isinstance(definitions_graph, Exception):
            note = f"definitions not loadable ({type(definitions_graph).__name__}: {definitions_graph})"
        elif definitions_graph is None:
            note = "no definitions given"
        elif not definitions_graph.has(lora_key):
            note = f"{lora_key.to_user_string()} is not in the current definitions"
        else:
            return GraphChoice(definitions_graph, "definitions")
        if mode == "definitions":
            raise LineageError(note)
        note += "; using the edges recorded in the instance"
    prefix = list(lora_key.path[:-1]) or None
    return GraphChoice(RecordedAssetGraph.from_instance(instance, prefix), "instance", note)


# -- lineage -------------------------------------------------------------------------------------------------


def utc_iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def _plain(value: dg.MetadataValue) -> JsonScalar:
    if isinstance(value, dg.PathMetadataValue):
        return str(value.path)
    if isinstance(value, dg.UrlMetadataValue):
        return value.url
    raw = value.value
    if isinstance(raw, float) and not math.isfinite(raw):
        return str(raw)
    return raw


def plain_metadata(record: dg.EventLogRecord) -> dict[str, JsonScalar]:
    """The scalar and path metadata of a materialisation as JSON values (markdown, JSON blobs, tables
    and images are left out: they describe, they do not identify)."""
    meta = record.asset_materialization.metadata or {}
    return {k: _plain(v) for k, v in meta.items() if isinstance(v, _PLAIN_METADATA)}


def key_metadata(record: dg.EventLogRecord) -> dict[str, JsonScalar]:
    """The identifying subset shown in the table: :data:`KEY_METADATA` in that order, then paths."""
    meta = record.asset_materialization.metadata or {}
    out = {k: _plain(meta[k]) for k in KEY_METADATA if k in meta and isinstance(meta[k], _PLAIN_METADATA)}
    out.update(
        (k, _plain(v))
        for k, v in meta.items()
        if isinstance(v, dg.PathMetadataValue) and k not in _COMMON_PATHS and k not in out
    )
    return out


# How a row is tied to its neighbour on the way to the LoRA (an upstream row to the child that read it, a
# downstream row to the parent it read).
LINK_TARGET = "target"  # the LoRA itself
LINK_POINTER = "recorded"  # Dagster recorded the input on the child (its dagster/input_event_pointer tag)
LINK_LATEST = "latest before"  # no record: the parent's latest materialisation before the child's

# What the table calls each role, and where the asset graph came from.
ROLE_LABELS = {"upstream": "upstream", "lora": "LoRA", "downstream": "downstream"}
GRAPH_SOURCES = {
    "definitions": "the project's Dagster definitions (shoe_lora_pipeline.definitions)",
    "instance": "the edges Dagster recorded in the instance",
}


@dataclass(frozen=True)
class LineageRow:
    role: str  # "upstream" | "lora" | "downstream"
    asset_key: str
    stage: str
    run_id: str | None
    timestamp: str | None
    storage_id: int | None
    data_version: str | None
    code_version: str | None
    link: str | None
    key_metadata: dict[str, JsonScalar] = field(default_factory=dict)
    metadata: dict[str, JsonScalar] = field(default_factory=dict)
    inputs: dict[str, dict[str, JsonScalar]] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if k != "key_metadata"}


@dataclass(frozen=True)
class Lineage:
    lora_key: str
    run_id: str
    timestamp: str
    graph_source: str
    graph_note: str | None
    rows: list[LineageRow]
    notes: list[str]

    def to_json(self) -> dict[str, object]:
        return {
            "lora_asset": self.lora_key,
            "run_id": self.run_id,
            "timestamp": self.timestamp,
            "asset_graph": self.graph_source,
            "asset_graph_note": self.graph_note,
            "rows": [r.to_json() for r in self.rows],
            "notes": self.notes,
        }


def _row(role: str, key: dg.AssetKey, record: dg.EventLogRecord | None, link: str | None) -> LineageRow:
    if record is None:
        return LineageRow(role, key.to_user_string(), key.path[-1], None, None, None, None, None, None)
    tags = _tags(record)
    prov = _provenance(record)
    inputs: dict[str, dict[str, JsonScalar]] = {}
    if prov is not None:
        for parent in sorted(set(prov.input_data_versions) | set(prov.input_storage_ids), key=str):
            dv = prov.input_data_versions.get(parent)
            inputs[parent.to_user_string()] = {
                "storage_id": prov.input_storage_ids.get(parent),
                "data_version": dv.value if dv is not None else None,
            }
    return LineageRow(
        role=role,
        asset_key=key.to_user_string(),
        stage=key.path[-1],
        run_id=record.run_id,
        timestamp=utc_iso(record.timestamp),
        storage_id=record.storage_id,
        data_version=tags.get(DATA_VERSION_TAG),
        code_version=tags.get(CODE_VERSION_TAG),
        link=link,
        key_metadata=key_metadata(record),
        metadata=plain_metadata(record),
        inputs=inputs,
    )


def fed_by(
    instance: dg.DagsterInstance, child: dg.EventLogRecord, parent_key: dg.AssetKey
) -> tuple[dg.EventLogRecord | None, str | None]:
    """The materialisation of ``parent_key`` that ``child`` (a materialisation record) was built from,
    and how it was found (:data:`LINK_POINTER` or :data:`LINK_LATEST`); ``(None, None)`` if none."""
    prov = _provenance(child)
    storage_id = prov.input_storage_ids.get(parent_key) if prov is not None else None
    if storage_id is not None:
        record = _fetch_one(instance, dg.AssetRecordsFilter(parent_key, storage_ids=[storage_id]))
        if record is not None:
            return record, LINK_POINTER
    record = _fetch_one(instance, dg.AssetRecordsFilter(parent_key, before_storage_id=child.storage_id))
    return (record, LINK_LATEST) if record is not None else (None, None)


def _consumer(
    instance: dg.DagsterInstance,
    key: dg.AssetKey,
    parent_key: dg.AssetKey,
    parent_record: dg.EventLogRecord,
) -> tuple[dg.EventLogRecord | None, str | None]:
    """The latest materialisation of ``key`` built from ``parent_record`` (stops at the first one built
    from a newer materialisation of the parent)."""
    best: tuple[dg.EventLogRecord | None, str | None] = (None, None)
    after = dg.AssetRecordsFilter(key, after_storage_id=parent_record.storage_id)
    for record in _iter_materializations(instance, after, ascending=True):
        fed, link = fed_by(instance, record, parent_key)
        if fed is None:
            continue
        if fed.storage_id == parent_record.storage_id:
            best = (record, link)
        elif fed.storage_id > parent_record.storage_id:
            break
    return best


def _toposort(keys: Iterable[dg.AssetKey], graph: AssetGraphLike) -> list[dg.AssetKey]:
    """Parents before children (ties by key), restricted to ``keys``."""
    keys = set(keys)
    parents = {k: {p for p in graph.get(k).parent_keys if p in keys} if graph.has(k) else set() for k in keys}
    order: list[dg.AssetKey] = []
    ready = sorted((k for k, ps in parents.items() if not ps), key=lambda k: k.to_user_string())
    while ready:
        key = ready.pop(0)
        order.append(key)
        for k, ps in parents.items():
            if key in ps:
                ps.discard(key)
                if not ps and k not in order and k not in ready:
                    ready.append(k)
        ready.sort(key=lambda k: k.to_user_string())
    order += sorted(keys - set(order), key=lambda k: k.to_user_string())  # a cycle cannot happen; be safe
    return order


def lora_lineage(
    instance: dg.DagsterInstance,
    lora_record: dg.EventLogRecord,
    graph: AssetGraphLike,
    graph_source: str = "definitions",
    graph_note: str | None = None,
) -> Lineage:
    """Upstream materialisations that fed ``lora_record``, the record itself, and the downstream ones
    built from it, in pipeline order."""
    lora_key: dg.AssetKey = lora_record.asset_key
    notes: list[str] = []

    # Upstream: walk parents edge by edge from the LoRA.
    upstream: dict[dg.AssetKey, tuple[dg.EventLogRecord | None, str | None]] = {}
    stack = [(lora_key, lora_record)]
    while stack:
        key, record = stack.pop()
        if not graph.has(key):
            continue
        for parent in sorted(graph.get(key).parent_keys, key=lambda k: k.to_user_string()):
            found, link = fed_by(instance, record, parent)
            if parent in upstream:
                seen = upstream[parent][0]
                if seen is not None and found is not None and seen.storage_id != found.storage_id:
                    notes.append(
                        f"{parent.to_user_string()}: {key.to_user_string()} was built from a different "
                        f"materialisation (run {found.run_id}) than another path in the graph"
                    )
                continue
            upstream[parent] = (found, link)
            if found is None:
                notes.append(
                    f"{parent.to_user_string()}: no materialisation before {key.to_user_string()}'s "
                    "(its own upstream is not traced)"
                )
            else:
                stack.append((parent, found))

    # A newer materialisation before the LoRA that did not feed it means the LoRA was built on older data.
    for key, (record, _) in upstream.items():
        if record is None:
            continue
        latest = _fetch_one(instance, dg.AssetRecordsFilter(key, before_storage_id=lora_record.storage_id))
        if latest is not None and latest.storage_id != record.storage_id:
            notes.append(
                f"{key.to_user_string()} was materialised again before this LoRA (run {latest.run_id}, "
                f"{utc_iso(latest.timestamp)}) but that materialisation did not feed it"
            )

    # Downstream: children built from this LoRA, then their children, …
    downstream: dict[dg.AssetKey, tuple[dg.EventLogRecord, str | None]] = {}
    resolved = {lora_key: lora_record}
    queue = [lora_key]
    while queue:
        key = queue.pop(0)
        children = graph.get(key).child_keys if graph.has(key) else ()
        for child in sorted(children, key=lambda k: k.to_user_string()):
            if child in downstream or child in upstream or child == lora_key:
                continue
            record, link = _consumer(instance, child, key, resolved[key])
            if record is None:
                notes.append(f"{child.to_user_string()}: not materialised from this LoRA")
                continue
            downstream[child] = (record, link)
            resolved[child] = record
            queue.append(child)

    rows = [_row("upstream", k, *upstream[k]) for k in _toposort(upstream, graph)]
    rows.append(_row("lora", lora_key, lora_record, LINK_TARGET))
    rows += [_row("downstream", k, *downstream[k]) for k in _toposort(downstream, graph)]
    return Lineage(
        lora_key=lora_key.to_user_string(),
        run_id=lora_record.run_id,
        timestamp=utc_iso(lora_record.timestamp),
        graph_source=graph_source,
        graph_note=graph_note,
        rows=rows,
        notes=notes,
    )


def run_lineages(
    instance: dg.DagsterInstance,
    run_id: str,
    *,
    category: str | None = None,
    prefer_category: str | None = None,
    graph_mode: str = "auto",
    graph: AssetGraphLike | None = None,
) -> list[Lineage]:
    """One :class:`Lineage` per LoRA the run materialised (one per category).

    ``graph`` stands in for the definitions' graph (tests, or a caller that already has one); without it
    the definitions are imported, once, unless ``graph_mode`` is ``instance``."""
    records = find_lora_materializations(instance, run_id, category, prefer_category)
    definitions_graph: AssetGraphLike | Exception | None = graph
    if definitions_graph is None and graph_mode != "instance":
        try:
            definitions_graph = load_definitions_graph()
        except Exception as exc:  # a definitions module mid-refactor must not stop an audit
            definitions_graph = exc
    lineages = []
    for record in records:
        choice = choose_graph(graph_mode, instance, record.asset_key, definitions_graph)
        lineages.append(lora_lineage(instance, record, choice.graph, choice.source, choice.note))
    return lineages
