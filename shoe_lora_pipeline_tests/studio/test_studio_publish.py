"""From the studio's page alone, against a real ``dg dev``: Render (product_renders + render_review through
Dagster's GraphQL API, on the tiny model), review, Publish approved, the published set with provenance and
a download, then a reject and Publish again: the published set changes.

The random tiny model draws noise, which no marketplace profile accepts; as in test_renders, the
candidates are replaced by drawn white shoes (what a real LoRA would make) before publishing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shoe_lora_pipeline_tests.dagster.test_real_clients import CHROMIUM_ARGS, chromium_or_skip
from shoe_lora_pipeline_tests.renders.test_marketplace import white_sneaker
from shoe_lora_pipeline_tests.renders.test_renders import GOOD, exported, project  # noqa: F401 (fixture)
from shoe_lora_pipeline_tests.support.dagster_server import DagsterDev, running_dagster_dev
from shoe_lora_pipeline_tests.support.studio import running_studio, settings_for

pytestmark = pytest.mark.slow

RUN_TIMEOUT_MS = 300_000  # a run on 2 busy cores: load the code location, the tiny model, render
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}


@pytest.fixture
def dagster(tmp_path: Path, exported: Path, tiny_sd_cache: Path) -> Iterator[tuple[Path, DagsterDev]]:  # noqa: F811
    cfg = project(tmp_path, exported, GOOD)
    # Off: the hires pass would turn the drawn shoes back into the random model's noise.
    cfg.write_text(cfg.read_text().replace("renders:\n", "renders:\n  hires: {enabled: false}\n"))
    env = {
        "SHOE_LORA_CONFIG": str(cfg),
        "SHOE_LORA_CACHE": str(tiny_sd_cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    with running_dagster_dev(tmp_path, env) as server:
        server.wait_until_loaded()
        yield cfg, server


def wait_for_run(page: object, state: str = "SUCCESS") -> None:
    from playwright.sync_api import expect

    expect(page.locator("#run .run-status")).to_have_text(state, timeout=RUN_TIMEOUT_MS)  # type: ignore[attr-defined]
    expect(page.locator('#run[data-terminal="yes"]')).to_have_count(1, timeout=RUN_TIMEOUT_MS)  # type: ignore[attr-defined]


def test_render_review_publish_from_the_page(dagster: tuple[Path, DagsterDev], tmp_path: Path) -> None:
    exe = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    cfg, server = dagster
    settings = settings_for(cfg, dagster_url=server.url, run_config=IN_PROCESS)
    with running_studio(settings) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(f"{url}/specs")
            page.click("#render")
            expect(page.locator("#run a")).to_have_attribute(
                "href", f"{server.url}/runs/" + page.url.split("run=")[1]
            )
            wait_for_run(page)

            for png in (settings.renders_dir / "candidates").rglob("*.png"):
                white_sneaker(1024, (250, 450, 800, 700)).save(png)  # as test_renders draws it
            page.goto(f"{url}/review")
            expect(page.locator("section.sku")).to_have_count(2)
            page.locator('figure[data-sku="CS-1"] button.approve').first.click()
            expect(page.locator('figure[data-sku="CS-1"] .decision').first).to_have_text("approve")

            page.goto(f"{url}/publish")
            expect(page.locator("#nothing-published")).to_be_visible()
            page.click("#publish")
            wait_for_run(page)
            profile = page.locator('section.profile[data-profile="amazon_main"]')
            expect(page.locator("#flagged")).to_have_count(0)
            expect(profile.locator("h3")).to_have_text(["CS-1", "Ü-2"])
            first = profile.locator("figure.published").first
            expect(first).to_contain_text("trainedAlgorithmicMedia")
            expect(first).to_contain_text("review")  # approved_by: the click above
            href = first.locator("a.download").get_attribute("href")
            download = page.request.get(url + href)
            assert download.status == 200 and download.headers["content-type"] == "image/jpeg"

            # Reject every CS-1 candidate, publish again: CS-1 leaves the published set.
            page.goto(f"{url}/review")
            for button in page.locator('figure[data-sku="CS-1"] button.reject').all():
                button.click()
            expect(page.locator('figure[data-sku="CS-1"] .decision')).to_have_text(["reject", "reject"])
            page.goto(f"{url}/publish")
            page.click("#publish")
            wait_for_run(page)
            expect(profile.locator("h3")).to_have_text(["Ü-2"])
        finally:
            browser.close()
