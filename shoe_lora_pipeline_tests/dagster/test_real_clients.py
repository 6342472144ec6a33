"""The Dagster UI as a user meets it: a real ``dg dev`` (webserver + daemon + code server), driven
through its GraphQL API and through a headless Chromium.

One server for the module (``dg dev -w workspace.yaml``: the repository's workspace file), on a free
loopback port with its own DAGSTER_HOME (holding a copy of the repository's .dagster_home/dagster.yaml),
a small two-category config and the tiny model.
``retrain_job`` is launched through ``DagsterGraphQLClient`` exactly like the launchpad does; the browser
then looks at the lineage graph after that run. Asset keys and checks are never hard-coded: they come
from the definitions, loaded in a separate interpreter with the server's environment, and must match what
the server reports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from shoe_lora_pipeline_tests.support.dagster_server import DagsterDev, running_dagster_dev
from shoe_lora_pipeline_tests.support.paths import DEMO_RAW_DIR, REPO_ROOT

if TYPE_CHECKING:
    from playwright.sync_api import Locator

INSTANCE_YAML = REPO_ROOT / ".dagster_home" / "dagster.yaml"  # the instance settings the README uses

pytestmark = [
    pytest.mark.slow,
    # dagster_graphql's client calls gql the old way; not ours to fix.
    pytest.mark.filterwarnings("ignore:Using variable_values and operation_name:DeprecationWarning"),
]

JOB_NAME = "retrain_job"
RUN_TIMEOUT_S = 360.0
RUN_POLL_S = 1.0
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
# Every step of the run in the run worker's process: a fresh interpreter per step (the multiprocess
# default) costs ~5 s of imports each and makes the whole run ~10x slower on 2 cores.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}

UI_TIMEOUT_MS = 60_000
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# -- GraphQL ---------------------------------------------------------------------------------------------

ASSETS_QUERY = """
query AssetsAndChecks {
  assetNodes {
    assetKey { path }
    groupName
    jobNames
    assetMaterializations(limit: 1) { runId }
    assetChecksOrError {
      __typename
      ... on AssetChecks {
        checks { name executionForLatestMaterialization { runId status } }
      }
    }
  }
}
"""

RUN_EVENTS_QUERY = """
query RunEvents($runId: ID!, $cursor: String) {
  logsForRun(runId: $runId, afterCursor: $cursor) {
    __typename
    ... on EventConnection {
      cursor
      hasMore
      events {
        __typename
        ... on MessageEvent { message level stepKey }
        ... on ErrorEvent { error { message stack } }
        ... on MaterializationEvent { assetKey { path } }
        ... on AssetCheckEvaluationEvent { evaluation { assetKey { path } checkName success } }
      }
    }
    ... on RunNotFoundError { message }
    ... on PythonError { message }
  }
}
"""

DAEMON_HEALTH_QUERY = """
query DaemonHealth {
  instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } }
}
"""

# -- the server's world ------------------------------------------------------------------------------------

CATEGORIES = {"casual_shoes": 0, "sneakers": 6}  # category → offset into the demo photos


def demo_photos(dest: Path, offset: int, n: int = 6) -> Path:
    """A few demo photos (+ styles.csv) per category: seconds of work, not minutes."""
    dest.mkdir(parents=True)
    photos = sorted(DEMO_RAW_DIR.glob("100*.jpg"))[offset : offset + n]
    assert len(photos) == n, f"not enough demo photos in {DEMO_RAW_DIR}"
    for p in [*photos, DEMO_RAW_DIR / "styles.csv"]:
        shutil.copy2(p, dest / p.name)
    return dest


def write_config(root: Path) -> Path:
    first, *others = CATEGORIES
    for name, offset in CATEGORIES.items():
        demo_photos(root / "raw" / name, offset)
    more = "".join(f"  {name}:\n    raw_dir: raw/{name}\n    output_dir: out/{name}\n" for name in others)
    cfg = root / "ui.yaml"
    cfg.write_text(
        f"""
dataset:
  name: {first}
  raw_dir: raw/{first}
  output_dir: out/{first}
  resolution: 128
  min_valid_ratio: 0.5
  cleaning: {{workers: 1}}
  splits: {{train: 0.7, val: 0.1, test: 0.2}}
categories:
{more}training:
  base_model: tiny-sd
  output_dir: out/{first}/lora
  train_batch_size: 2
  gradient_accumulation_steps: 1
  max_train_steps: 4
  learning_rate: 1.0e-3
  lr_warmup_steps: 1
  gradient_checkpointing: false
  checkpointing_steps: 4
  validation_steps: 4
  num_validation_images: 1
  validation_inference_steps: 2
  log_every_steps: 1
evaluation:
  prompts:
    - "A professional product photo of black casual shoes on white background, side view, product photography"
  images_per_prompt: 2
  num_inference_steps: 2
  resolution: 64
device: cpu
"""
    )
    return cfg


@dataclass(frozen=True)
class Expected:
    """What the definitions declare, read in a separate interpreter with the server's environment."""

    assets: frozenset[tuple[str, ...]]
    checks: frozenset[tuple[tuple[str, ...], str]]
    jobs: frozenset[str]


LIST_DEFINITIONS = """
import json
from shoe_lora_pipeline.definitions import defs
defs = defs()
graph = defs.resolve_asset_graph()
print(json.dumps({
    "assets": [list(k.path) for k in graph.get_all_asset_keys()],
    "checks": [[list(k.asset_key.path), k.name] for k in graph.asset_check_keys],
    "jobs": [j.name for j in defs.resolve_all_job_defs()],
}))
"""


def list_definitions(env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LIST_DEFINITIONS],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_definitions(proc: subprocess.Popen) -> Expected:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, f"loading the definitions failed:\n{err[-4000:]}"
    data = json.loads(out.strip().splitlines()[-1])
    return Expected(
        assets=frozenset(tuple(p) for p in data["assets"]),
        checks=frozenset((tuple(p), name) for p, name in data["checks"]),
        jobs=frozenset(data["jobs"]),
    )


@dataclass
class Ui:
    server: DagsterDev
    expected: Expected
    workdir: Path


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory, tiny_sd_cache: Path) -> Iterator[Ui]:
    workdir = tmp_path_factory.mktemp("dagster-ui")
    env = {
        "SHOE_LORA_CONFIG": str(write_config(workdir)),
        "SHOE_LORA_CACHE": str(tiny_sd_cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }
    definitions = list_definitions(env, workdir)  # in parallel with the server's start
    try:
        # The repository's workspace.yaml, as deployments that use a workspace file load the code.
        with running_dagster_dev(
            workdir, env, instance_yaml=INSTANCE_YAML, workspace=REPO_ROOT / "workspace.yaml"
        ) as server:
            server.wait_until_loaded()
            yield Ui(server=server, expected=read_definitions(definitions), workdir=workdir)
    finally:
        if definitions.poll() is None:
            definitions.kill()
            definitions.wait()


@dataclass
class RunOutcome:
    run_id: str
    status: str
    seconds: float


def run_events(server: DagsterDev, run_id: str) -> list[dict]:
    events, cursor = [], None
    while True:
        conn = server.graphql(RUN_EVENTS_QUERY, {"runId": run_id, "cursor": cursor})["logsForRun"]
        assert conn["__typename"] == "EventConnection", conn
        events += conn["events"]
        cursor = conn["cursor"]
        if not conn["hasMore"]:
            return events


def error_report(server: DagsterDev, run_id: str) -> str:
    lines = []
    for e in run_events(server, run_id):
        if e.get("level") == "ERROR" or e.get("error"):
            lines.append(f"[{e['__typename']}] {e.get('stepKey') or ''} {e.get('message', '')}")
            if e.get("error"):
                lines.append(e["error"]["message"] + "".join(e["error"].get("stack") or [])[-3000:])
    return "\n".join(lines) or "(no error events)"


@pytest.fixture(scope="module")
def retrain_run(ui: Ui) -> RunOutcome:
    """``retrain_job`` launched through the GraphQL client and followed to its end (or the deadline)."""
    from dagster_graphql import DagsterGraphQLClient

    assert JOB_NAME in ui.expected.jobs, f"{JOB_NAME} is not defined (jobs: {sorted(ui.expected.jobs)})"
    client = DagsterGraphQLClient(ui.server.host, port_number=ui.server.port)
    start = time.monotonic()
    run_id = client.submit_job_execution(JOB_NAME, run_config=IN_PROCESS, tags={"test": "real_clients"})
    deadline = start + RUN_TIMEOUT_S
    status = "UNKNOWN"
    while time.monotonic() < deadline:
        status = client.get_run_status(run_id).value
        if status in TERMINAL:
            break
        time.sleep(RUN_POLL_S)
    return RunOutcome(run_id=run_id, status=status, seconds=time.monotonic() - start)


# -- 1. GraphQL --------------------------------------------------------------------------------------------


def test_retrain_job_through_graphql(ui: Ui, retrain_run: RunOutcome) -> None:
    server, expected = ui.server, ui.expected
    if retrain_run.status not in TERMINAL:
        health = server.graphql(DAEMON_HEALTH_QUERY)["instance"]["daemonHealth"]["allDaemonStatuses"]
        pytest.fail(
            f"run {retrain_run.run_id} still {retrain_run.status} after {RUN_TIMEOUT_S:.0f} s; "
            f"daemons: {health}\n{error_report(server, retrain_run.run_id)}\n{server.log_tail()}"
        )
    assert retrain_run.status == "SUCCESS", (
        f"run {retrain_run.run_id} ended {retrain_run.status}:\n{error_report(server, retrain_run.run_id)}"
    )

    # What the server serves is exactly what the code defines, and retrain_job covers all of it.
    nodes = {tuple(n["assetKey"]["path"]): n for n in server.graphql(ASSETS_QUERY)["assetNodes"]}
    assert expected.assets, "the definitions have no assets"
    assert set(nodes) == expected.assets
    assert {k for k, n in nodes.items() if JOB_NAME not in n["jobNames"]} == set()
    served_checks = set()
    for key, node in nodes.items():
        checks = node["assetChecksOrError"]
        assert checks["__typename"] == "AssetChecks", (key, checks)
        served_checks |= {(key, c["name"]) for c in checks["checks"]}
    assert served_checks == expected.checks

    # The run's own event log: one materialisation per asset, one evaluation per check.
    events = run_events(server, retrain_run.run_id)
    materialised = [tuple(e["assetKey"]["path"]) for e in events if e["__typename"] == "MaterializationEvent"]
    evaluated = [
        (tuple(e["evaluation"]["assetKey"]["path"]), e["evaluation"]["checkName"])
        for e in events
        if e["__typename"] == "AssetCheckEvaluationEvent"
    ]
    assert sorted(materialised) == sorted(expected.assets)
    assert sorted(evaluated) == sorted(expected.checks)

    # The asset-centric view agrees: every asset's latest materialisation and every check's latest
    # execution come from this run, and every check produced a result (passed or failed, not errored:
    # on the tiny random model most of the evaluation checklist fails honestly).
    nodes = {tuple(n["assetKey"]["path"]): n for n in server.graphql(ASSETS_QUERY)["assetNodes"]}
    stale = {
        k
        for k, n in nodes.items()
        if [m["runId"] for m in n["assetMaterializations"]] != [retrain_run.run_id]
    }
    assert stale == set(), f"latest materialisation not from run {retrain_run.run_id}"
    for key, node in nodes.items():
        for check in node["assetChecksOrError"]["checks"]:
            execution = check["executionForLatestMaterialization"]
            assert execution is not None, (key, check["name"])
            assert execution["runId"] == retrain_run.run_id, (key, check["name"], execution)
            assert execution["status"] in {"SUCCEEDED", "FAILED"}, (key, check["name"], execution)


# -- 2. The browser ----------------------------------------------------------------------------------------


def chromium_or_skip() -> str:
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install playwright)")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")
    return exe


# The lineage graph labels a node with the last part of its key, middle-truncated ("abc…_xyz") past
# this many characters when zoomed out to fit.
LABEL_MAX = 18


def node_label(key: tuple[str, ...]) -> str | re.Pattern[str]:
    name = key[-1]
    if len(name) <= LABEL_MAX:
        return name
    return re.compile(f"^{re.escape(name[:3])}.*….*{re.escape(name[-2:])}$")


def by_label(graph: Locator, label: str | re.Pattern[str]) -> Locator:
    return graph.get_by_text(label, exact=True) if isinstance(label, str) else graph.get_by_text(label)


def test_lineage_graph_in_browser(ui: Ui, retrain_run: RunOutcome) -> None:
    exe = chromium_or_skip()
    from playwright.sync_api import Route, expect, sync_playwright

    server = ui.server
    nodes = server.graphql(ASSETS_QUERY)["assetNodes"]
    groups = sorted({n["groupName"] for n in nodes})
    # Mark the "Join the Dagster community" dialog as seen: it would cover the graph on 127.0.0.1.
    server.graphql("mutation { setNuxSeen }")
    screenshot = ui.workdir / "asset-lineage.png"

    def only_the_server(route: Route) -> None:
        # Nothing from the internet (fonts, news, telemetry): there is none here, and waiting is slow.
        url = urlsplit(route.request.url)
        if url.scheme in {"http", "https", "ws", "wss"} and url.hostname != server.host:
            route.abort()
        else:
            route.continue_()

    # Every category has the same stages, so a label appears once per category.
    labels = Counter(node_label(k) for k in ui.expected.assets)
    wait = {"timeout": UI_TIMEOUT_MS}  # expect() does not use the page's default timeout
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1920, "height": 1080})
            context.route("**/*", only_the_server)
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            try:
                page.goto(f"{server.url}/asset-groups")  # the global asset lineage graph
                expect(page.get_by_text("Global asset lineage").first).to_be_visible(**wait)

                graph = page.locator("svg foreignObject")
                first = by_label(graph, next(iter(labels))).first
                if len(groups) > 1:
                    # With several groups the graph opens with every group collapsed: ⌥E expands all.
                    expect(graph.get_by_text(groups[0], exact=True).first).to_be_visible(**wait)
                    if not first.is_visible():
                        page.keyboard.press("Alt+KeyE")
                for label, count in labels.items():
                    shown = by_label(graph, label)
                    expect(shown).to_have_count(count, **wait)
                    for i in range(count):
                        expect(shown.nth(i)).to_be_visible(**wait)

                if retrain_run.status == "SUCCESS" and graph.locator('[style*="--minimal-bg"]').count():
                    # Zoomed out to fit, a node is a coloured box; it stays neutral until its live data
                    # (materialised, checks failed…) has arrived, in batches. Wait for all of it.
                    neutral = graph.locator('[style*="--minimal-bg: var(--color-background-light)"]')
                    expect(neutral).to_have_count(0, **wait)
            except Exception:
                page.screenshot(path=str(ui.workdir / "asset-lineage-failed.png"), full_page=True)
                raise
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
