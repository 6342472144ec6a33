"""What a user reads after the README's demo command: one ``dg launch`` of every asset (the demo's stages
and its specs sheet, on a few photos and the tiny model), then the asset pages of that run in a real
``dg dev`` through a headless Chromium.

One run and one server for the module: the run's own output must hold no Python warning (a deprecation or
supersession warning would tell every user to change the command they were given), and on the
``published_renders`` and ``evaluation_report`` pages no metadata value may be cut off: the test measures
where each rendered value's text ends against the edge that clips it, and compares the text with the value
the instance recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from shoe_lora_pipeline_tests.dagster.test_real_clients import CHROMIUM_ARGS, UI_TIMEOUT_MS, chromium_or_skip
from shoe_lora_pipeline_tests.support.dagster_server import DagsterDev, dg_command, running_dagster_dev
from shoe_lora_pipeline_tests.support.paths import DEMO_RAW_DIR, REPO_ROOT

pytestmark = pytest.mark.slow

INSTANCE_YAML = REPO_ROOT / ".dagster_home" / "dagster.yaml"
DEMO_SPECS = REPO_ROOT / "data" / "casual_shoes" / "specs.csv"
# The README's demo command selects every asset this way (see README "Quick start").
EVERY_ASSET = 'key:"*"'
IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})
PAGES = ("published_renders", "evaluation_report")
VIEWPORT = {"width": 1920, "height": 1080}


def demo_style_config(root: Path) -> Path:
    """The demo's stages on 8 demo photos, the demo's specs sheet (3 SKUs, 2 refused rows), tiny sizes."""
    raw = root / "raw"
    raw.mkdir()
    for p in [*sorted(DEMO_RAW_DIR.glob("100*.jpg"))[:8], DEMO_RAW_DIR / "styles.csv"]:
        shutil.copy2(p, raw / p.name)
    shutil.copy2(DEMO_SPECS, root / "specs.csv")
    cfg = root / "demo_style.yaml"
    cfg.write_text(
        """
dataset:
  name: casual_shoes
  raw_dir: raw
  output_dir: outputs/demo/casual_shoes
  resolution: 128
  min_valid_ratio: 0.5
  cleaning: {workers: 1}
  splits: {train: 0.6, val: 0.2, test: 0.2}
training:
  base_model: tiny-sd
  output_dir: outputs/demo/casual_shoes/lora
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
renders:
  specs_csv: specs.csv
  candidates_per_image: 1
  num_inference_steps: 2
  resolution: 64
  require_qa_pass: false
device: cpu
"""
    )
    return cfg


@dataclass
class DemoRun:
    workdir: Path
    env: dict[str, str]
    output: str


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A folder whose paths, like a checkout's (``…/outputs/demo/casual_shoes/…``), have no hyphen: a
    browser breaks a long path at a hyphen, so pytest's ``pytest-of-…`` folders would make paths wrap
    where a user's do not. The name is short (``/tmp/shoelora_abcdefgh``, 22 characters, a checkout's
    ``/home/<user>/shoe_lora`` length): at 1920 px the published manifest's path then fits with room
    to spare, whichever random letters ``mkdtemp`` picks (a 6-character longer prefix left it within
    1 px of the edge, so some letter draws overflowed)."""
    path = Path(tempfile.mkdtemp(prefix="shoelora_"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def demo_run(workdir: Path, tiny_sd_cache: Path) -> DemoRun:
    """``dg launch --assets 'key:"*"'`` from the project folder, as the README runs the demo."""
    home = workdir / "dagster_home"
    home.mkdir()
    shutil.copy2(INSTANCE_YAML, home / "dagster.yaml")
    env = {
        "SHOE_LORA_CONFIG": str(demo_style_config(workdir)),
        "SHOE_LORA_CACHE": str(tiny_sd_cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        dg_command("launch", "--assets", EVERY_ASSET, "--config-json", IN_PROCESS),
        cwd=REPO_ROOT,
        env={**os.environ, **env, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return DemoRun(workdir=workdir, env=env, output=output)


def test_demo_run_through_dg_prints_no_warning(demo_run: DemoRun) -> None:
    assert "RUN_SUCCESS" in demo_run.output
    # Python's warnings (DeprecationWarning, SupersessionWarning, BetaWarning, UserWarning…) all end in
    # "Warning"; the pipeline's own log lines say WARNING (e.g. the demo sheet's refused rows).
    warned = [line for line in demo_run.output.splitlines() if "Warning" in line]
    assert warned == [], "\n".join(warned)


@pytest.fixture(scope="module")
def server(demo_run: DemoRun) -> Iterator[DagsterDev]:
    with running_dagster_dev(demo_run.workdir, demo_run.env) as server:
        server.wait_until_loaded()
        yield server


def recorded_metadata(home: Path, asset: str) -> dict[str, dg.MetadataValue]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None, f"{asset} was not materialised"
    return dict(event.asset_materialization.metadata)


# For every row of the asset page's metadata table: the key, the value cell's text, and how far the
# farthest glyph of that text reaches past the nearest edge that clips it (a scrolling or hidden-overflow
# ancestor, or the window); > 0 means the user does not see the whole value. Also any element of the cell
# that shows an ellipsis in place of its end.
MEASURE_JS = """
(table) => {
  function clipRight(el) {
    let right = document.documentElement.clientWidth;
    for (let e = el.parentElement; e; e = e.parentElement) {
      if (getComputedStyle(e).overflowX !== 'visible') right = Math.min(right, e.getBoundingClientRect().right);
    }
    return right;
  }
  const rows = [];
  for (const tr of table.querySelectorAll(':scope > tbody > tr, :scope > tr')) {
    const cells = tr.querySelectorAll(':scope > td');
    if (cells.length < 2) continue;
    const cell = cells[cells.length - 1];
    const edge = clipRight(cell);
    let reach = -Infinity;
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      if (!node.textContent.trim()) continue;
      const range = document.createRange();
      range.selectNodeContents(node);
      for (const rect of range.getClientRects()) reach = Math.max(reach, rect.right - edge);
    }
    const ellipsis = [...cell.querySelectorAll('*')].filter(
      (e) => getComputedStyle(e).textOverflow === 'ellipsis' && e.scrollWidth > e.clientWidth + 1
    ).map((e) => e.innerText);
    rows.push({key: cells[0].innerText.trim(), text: cell.innerText.trim(), overflow: reach, ellipsis});
  }
  return rows;
}
"""


def test_asset_pages_show_every_metadata_value_whole(
    demo_run: DemoRun, server: DagsterDev, tmp_path: Path
) -> None:
    exe = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    server.graphql("mutation { setNuxSeen }")  # the "Join the Dagster community" dialog covers the page
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.route(
                "**/*",
                lambda route: (
                    route.continue_()
                    if route.request.url.startswith((server.url, "data:", "blob:"))
                    else route.abort()
                ),
            )
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            for asset in PAGES:
                recorded = recorded_metadata(server.home, asset)
                page.goto(f"{server.url}/assets/{asset}")
                # The overview's metadata table: the one whose first column lists the recorded keys.
                last_key = list(recorded)[-1]
                table = page.locator("table", has=page.get_by_text(last_key, exact=True)).last
                expect(table.get_by_text(last_key, exact=True)).to_be_visible(timeout=UI_TIMEOUT_MS)
                rows = {r["key"]: r for r in table.evaluate(MEASURE_JS)}
                # The whole table in one picture, kept for a look when this fails: a window as tall as the
                # page (same width, so the same layout), then back to the measured size.
                tall = page.evaluate("() => document.querySelector('table').closest('[class]').scrollHeight")
                page.set_viewport_size(
                    {"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], tall + 400)}
                )
                table.screenshot(path=str(tmp_path / f"{asset}.png"))
                page.set_viewport_size(VIEWPORT)
                assert set(recorded) <= set(rows), (asset, sorted(set(recorded) - set(rows)))
                for key, value in recorded.items():
                    row = rows[key]
                    where = f"{asset} / {key}: {row['text'][:120]!r}"
                    if row["overflow"] > 0.5:
                        problems.append(f"{where} runs {row['overflow']:.0f} px past the visible edge")
                    if row["ellipsis"]:
                        problems.append(f"{where} ends in an ellipsis: {row['ellipsis']}")
                    if (
                        isinstance(value, dg.TextMetadataValue | dg.PathMetadataValue)
                        and row["text"] != value.value
                    ):
                        problems.append(f"{where} shows other text than the value {value.value!r}")
        finally:
            browser.close()
    assert problems == [], "\n".join([*problems, f"screenshots: {tmp_path}"])
