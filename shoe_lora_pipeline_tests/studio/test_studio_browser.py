"""The review studio in a real browser (Playwright driving Debian's Chromium, as the lineage-page test
does): a sheet with good and bad rows, decisions by click and by keyboard found in reviews.csv, two
browsers deciding at once, traversal attempts, hostile text, the token. Candidates are written in
product_renders' layout by the test support (no model); the Render/Publish flow against a real Dagster is
in test_studio_publish.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoe_lora_pipeline.core.renders.review import read_reviews
from shoe_lora_pipeline.core.renders.store import RenderPaths
from shoe_lora_pipeline.studio.app import StudioSettings
from shoe_lora_pipeline_tests.dagster.test_real_clients import CHROMIUM_ARGS, chromium_or_skip
from shoe_lora_pipeline_tests.support.dagster_server import free_loopback_port
from shoe_lora_pipeline_tests.support.paths import REPO_ROOT
from shoe_lora_pipeline_tests.support.studio import (
    FakeSku,
    running_studio,
    settings_for,
    write_candidates,
    write_project,
)

TIMEOUT_MS = 30_000
VIEWPORT = {"width": 1280, "height": 900}
SCREENSHOT = REPO_ROOT / "docs" / "studio_review.png"
# Set to refresh the README's screenshot from this test (docs/studio_review.png).
UPDATE_SCREENSHOT_ENV = "SHOE_LORA_UPDATE_SCREENSHOTS"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    exe = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def studio(tmp_path: Path) -> Iterator[tuple[StudioSettings, RenderPaths, str]]:
    cfg = write_project(tmp_path)
    settings = settings_for(cfg, dagster_url=f"http://127.0.0.1:{free_loopback_port()}")
    paths = write_candidates(
        settings.renders_dir,
        [
            FakeSku("CS-1", [True, True, False]),
            FakeSku("CS-2", [True, False], count=2),
            FakeSku("CS-3", [True, True]),
        ],
    )
    with running_studio(settings) as url:
        yield settings, paths, url


def new_page(browser: object, url: str) -> object:
    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[attr-defined]
    # Nothing but the studio: a page that tried to reach out would fail, not hang.
    context.route(
        "**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort()
    )
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.dialogs = dialogs
    return page


def decisions(paths: RenderPaths) -> dict[tuple[str, str], tuple[str, str]]:
    return {(r.sku, r.file): (r.decision, r.note) for r in read_reviews(paths.reviews_csv)}


def card(page: object, sku: str, index: int) -> object:
    return page.locator(f'figure.candidate[data-sku="{sku}"]').nth(index)  # type: ignore[attr-defined]


def test_upload_names_bad_rows_then_the_table_is_fixed_and_saved(
    browser: object, studio: tuple, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    settings, _, url = studio
    before = settings.specs_path.read_text()
    sheet = tmp_path / "upload.csv"
    sheet.write_text(
        "sku,colour,type,characteristics,count\n"
        "GOOD-1,black,casual,lace-up,1\n"
        "../escape,black,casual,,1\n"
        "GOOD-2,white,sneakers,,0\n"
        "good-1,brown,casual,,1\n",
        encoding="utf-8",
    )
    page = new_page(browser, url)
    page.goto(f"{url}/specs")
    page.set_input_files("#sheet-file", str(sheet))
    page.click("#check-upload")
    problems = page.locator("#problems li")
    expect(problems).to_have_count(3)
    expect(problems.nth(0)).to_contain_text("line 3 (sku ../escape): sku contains a path separator")
    expect(problems.nth(1)).to_contain_text("line 4 (sku GOOD-2): count 0 must be at least 1")
    expect(problems.nth(2)).to_contain_text("line 5 (sku good-1): duplicate sku: line 2 has it")
    expect(page.locator("#specs-state")).to_contain_text("not saved")
    expect(page.locator("tr.refused")).to_have_count(3)
    assert settings.specs_path.read_text() == before
    # Fix the rows in the table: rename one, set a count, clear the third (an empty row is dropped).
    page.locator('tr[data-line="3"] input[aria-label="sku"]').fill("ESC-3")
    page.locator('tr[data-line="4"] input[aria-label="count"]').fill("2")
    for cell in page.locator('tr[data-line="5"] input').all():
        cell.fill("")
    page.click("#add-row")
    row = page.locator("#sheet tbody tr").last
    for name, value in {"sku": "NEW-4", "colour": "blue", "type": "casual", "count": "1"}.items():
        row.locator(f'input[aria-label="{name}"]').fill(value)
    page.click("#save-sheet")
    expect(page.locator("#specs-state")).to_contain_text("saved 4 rows")
    assert settings.specs_path.read_text().splitlines() == [
        "sku,colour,type,characteristics,count",
        "GOOD-1,black,casual,lace-up,1",
        "ESC-3,black,casual,,1",
        "GOOD-2,white,sneakers,,2",
        "NEW-4,blue,casual,,1",
    ]
    backups = list((settings.specs_path.parent / "specs.backups").iterdir())
    assert [b.read_text() for b in backups] == [before]


def test_approve_and_reject_by_click_and_keyboard(browser: object, studio: tuple) -> None:
    from playwright.sync_api import expect

    _, paths, url = studio
    page = new_page(browser, url)
    page.goto(f"{url}/review")
    first = card(page, "CS-1", 0)
    first.locator("button.approve").click()
    expect(first.locator(".decision")).to_have_text("approve")
    card(page, "CS-1", 1).locator("button.reject").click()
    expect(card(page, "CS-1", 1).locator(".decision")).to_have_text("reject")
    # The keyboard: → to the next candidate, a / r, n for a note (Enter saves it), ↓ to the next SKU.
    first.focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("r")
    expect(card(page, "CS-1", 2).locator(".decision")).to_have_text("reject")
    page.keyboard.press("n")
    page.keyboard.type("background not white")
    page.keyboard.press("Enter")
    expect(page.locator("#message")).to_contain_text("CS-1 / 002-k000.png: reject")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("a")
    expect(card(page, "CS-2", 0).locator(".decision")).to_have_text("approve")
    assert decisions(paths) == {
        ("CS-1", "000-k000.png"): ("approve", ""),
        ("CS-1", "001-k000.png"): ("reject", ""),
        ("CS-1", "002-k000.png"): ("reject", "background not white"),
        ("CS-2", "000-k001.png"): ("approve", ""),
        ("CS-2", "001-k001.png"): ("", ""),
        ("CS-3", "000-k002.png"): ("", ""),
        ("CS-3", "001-k002.png"): ("", ""),
    }
    # Approve the top N of CS-3; the filter "no decision yet" then shows nothing.
    section = page.locator('section.sku[data-sku="CS-3"]')
    section.locator("input.top-n").fill("2")
    section.locator("button.approve-top").click()
    expect(card(page, "CS-3", 1).locator(".decision")).to_have_text("approve")
    page.click("#filter-undecided")
    expect(page.locator("#nothing")).to_be_visible()
    page.click("#filter-qa")
    expect(page.locator("section.sku")).to_have_count(2)  # CS-1 and CS-2 have a QA failure
    page.goto(f"{url}/review")
    if os.environ.get(UPDATE_SCREENSHOT_ENV):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))


def test_two_browsers_deciding_at_once_lose_nothing(browser: object, studio: tuple) -> None:
    from playwright.sync_api import expect

    _, paths, url = studio
    pages = [new_page(browser, url), new_page(browser, url)]
    for page in pages:
        page.goto(f"{url}/review")
    # Every button of each page's share clicked without waiting for the answers: the requests overlap.
    click_all = """(sel) => { for (const b of document.querySelectorAll(sel)) b.click(); }"""
    pages[0].evaluate(
        click_all, 'figure[data-sku="CS-1"] button.approve, figure[data-sku="CS-3"] button.reject'
    )
    pages[1].evaluate(click_all, 'figure[data-sku="CS-2"] button.reject')
    for page, sku, word in ((pages[0], "CS-3", "reject"), (pages[1], "CS-2", "reject")):
        expect(page.locator(f'figure[data-sku="{sku}"] .decision').last).to_have_text(word)
    expect(pages[0].locator('figure[data-sku="CS-1"] .decision').last).to_have_text("approve")
    got = decisions(paths)
    assert {k: v[0] for k, v in got.items()} == {
        ("CS-1", "000-k000.png"): "approve",
        ("CS-1", "001-k000.png"): "approve",
        ("CS-1", "002-k000.png"): "approve",
        ("CS-2", "000-k001.png"): "reject",
        ("CS-2", "001-k001.png"): "reject",
        ("CS-3", "000-k002.png"): "reject",
        ("CS-3", "001-k002.png"): "reject",
    }
    # The same candidate decided in both: the later decision stays, and a reload shows it.
    card(pages[0], "CS-1", 0).locator("button.reject").click()
    expect(card(pages[0], "CS-1", 0).locator(".decision")).to_have_text("reject")
    card(pages[1], "CS-1", 0).locator("button.approve").click()
    expect(card(pages[1], "CS-1", 0).locator(".decision")).to_have_text("approve")
    pages[0].reload()
    expect(card(pages[0], "CS-1", 0).locator(".decision")).to_have_text("approve")
    assert decisions(paths)[("CS-1", "000-k000.png")][0] == "approve"


def test_traversal_attempts_get_404(browser: object, studio: tuple, tmp_path: Path) -> None:
    _, paths, url = studio
    (tmp_path / "secret.png").write_bytes(b"secret")
    (paths.root / "leak.png").symlink_to(tmp_path / "secret.png")
    page = new_page(browser, url)
    page.goto(f"{url}/review")
    for path in (
        "/files/..%2f..%2f..%2fstudio.yaml",
        "/files/%2e%2e/%2e%2e/%2e%2e/studio.yaml",
        "/files/%2Ftmp%2Fsecret.png",
        "/files/candidates/CS-1/..%2f..%2f..%2f..%2fstudio.yaml",
        "/files/leak.png",
    ):
        response = page.request.get(url + path)
        assert response.status == 404, (path, response.status)
        assert b"secret" not in response.body()
    shown = page.goto(f"{url}/files/candidates/CS-1/000-k000.png")
    assert shown.status == 200 and shown.headers["content-type"] == "image/png"


def test_hostile_text_shows_as_text(browser: object, studio: tuple, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    settings, paths, url = studio
    hostile = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    sheet = tmp_path / "hostile.csv"
    sheet.write_text(
        f'sku,colour,type,characteristics,count\nH-1,black,casual,"{hostile}",1\n', encoding="utf-8"
    )
    page = new_page(browser, url)
    page.goto(f"{url}/specs")
    page.set_input_files("#sheet-file", str(sheet))
    page.click("#check-upload")
    expect(page.locator('input[aria-label="characteristics"]').first).to_have_value(hostile)
    # A hostile prompt and note on the review page.
    record = json.loads(paths.render_json("CS-1").read_text())
    record["row"]["prompt"] = hostile
    paths.render_json("CS-1").write_text(json.dumps(record))
    page.goto(f"{url}/review")
    page.locator('figure[data-sku="CS-1"] input.note').first.fill(hostile)
    card(page, "CS-1", 0).locator("button.approve").click()
    expect(card(page, "CS-1", 0).locator(".decision")).to_have_text("approve")
    page.reload()
    expect(page.locator('section[data-sku="CS-1"] .prompt')).to_have_text(hostile)
    expect(page.locator('figure[data-sku="CS-1"] input.note').first).to_have_value(hostile)
    assert page.locator("img[src=x]").count() == 0
    assert page.dialogs == []


def test_token_gates_the_page_in_the_browser(browser: object, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    cfg = write_project(tmp_path)
    token = "browser-test-token-0123456789"
    settings = settings_for(cfg, token=token)
    write_candidates(settings.renders_dir, [FakeSku("CS-1", [True])])
    with running_studio(settings) as url:
        page = new_page(browser, url)
        refused = page.goto(f"{url}/review")
        assert refused.status == 401
        expect(page.locator("body")).to_contain_text("needs its access token")
        page.goto(f"{url}/?token={token}")
        assert page.url == f"{url}/review"  # the token left the address bar for a cookie
        expect(card(page, "CS-1", 0)).to_be_visible()


def test_non_loopback_host_without_token_refuses_to_start(tmp_path: Path) -> None:
    cfg = write_project(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "SHOE_LORA_STUDIO_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "shoe_lora_pipeline.cli", "studio", "--config", str(cfg), "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "needs" not in done.stdout and "--host 0.0.0.0 is reachable from other machines" in done.stderr
