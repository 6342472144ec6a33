"""The review studio's web app through Starlette's TestClient: the access token, CSRF, paths that lead out
of the renders folder, upload limits and malformed sheets, escaping, decisions (also on a candidate that
vanished) and a Dagster webserver that is absent or answers with an error. No model, no browser: the
candidates are written in product_renders' layout by the test support."""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from shoe_lora_pipeline.cli import main as cli_main
from shoe_lora_pipeline.core.renders.review import read_reviews
from shoe_lora_pipeline.core.renders.store import RenderPaths
from shoe_lora_pipeline.core.studio import backup_dir
from shoe_lora_pipeline.studio.app import CSRF_HEADER, TOKEN_COOKIE, StudioSettings, create_app
from shoe_lora_pipeline_tests.support.dagster_server import free_loopback_port
from shoe_lora_pipeline_tests.support.studio import FakeSku, settings_for, write_candidates, write_project

BASE = "http://127.0.0.1:8090"
TOKEN = "a-long-enough-test-token-0123456789"


@pytest.fixture
def project(tmp_path: Path) -> tuple[StudioSettings, RenderPaths]:
    cfg = write_project(tmp_path)
    settings = settings_for(cfg, dagster_url=f"http://127.0.0.1:{free_loopback_port()}")
    paths = write_candidates(
        settings.renders_dir,
        [FakeSku("CS-1", [True, False, True]), FakeSku("CS-2", [False, False], count=2)],
    )
    return settings, paths


def client_for(settings: StudioSettings) -> TestClient:
    return TestClient(create_app(settings), base_url=BASE, follow_redirects=False)


def decision(client: TestClient, settings: StudioSettings, **body: object) -> object:
    return client.post("/api/decision", json=body, headers={CSRF_HEADER: settings.csrf})


def candidate(paths: RenderPaths, sku: str, i: int) -> dict:
    return json.loads(paths.render_json(sku).read_text())["candidates"][i]


# -- access ---------------------------------------------------------------------------------------------


def test_token_is_checked_on_every_request_and_kept_in_a_cookie(project: tuple) -> None:
    settings, _ = project
    settings.token = TOKEN
    client = client_for(settings)
    assert client.get("/review").status_code == 401
    assert client.get("/static/studio.js").status_code == 401
    assert client.get("/review?token=wrong-token-wrong-token").status_code == 401
    first = client.get("/review?token=" + TOKEN + "&filter=undecided")
    assert first.status_code == 303 and first.headers["location"] == "/review?filter=undecided"
    assert "httponly" in first.headers["set-cookie"].lower()
    assert client.cookies.get(TOKEN_COOKIE) == TOKEN
    assert client.get("/review").status_code == 200  # the cookie from now on
    other = client_for(settings)
    assert other.get("/review", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert other.get("/files/candidates/CS-1/000-k000.png").status_code == 401


def test_foreign_host_header_is_refused_on_loopback(project: tuple) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 cannot talk to the studio."""
    settings, _ = project
    client = TestClient(create_app(settings), base_url="http://evil.example:8090")
    assert client.get("/review").status_code == 400


def test_posts_need_the_csrf_token(project: tuple) -> None:
    settings, paths = project
    client = client_for(settings)
    c = candidate(paths, "CS-1", 0)
    body = {"sku": "CS-1", "seed": c["seed"], "image_sha256": c["image_sha256"], "decision": "approve"}
    assert client.post("/api/decision", json=body).status_code == 403
    assert client.post("/api/decision", json=body, headers={CSRF_HEADER: "nope"}).status_code == 403
    assert client.post("/specs/save", data={"sheet_csv": "sku\n"}).status_code == 403
    assert client.post("/publish", data={"csrf_token": "nope"}).status_code == 403
    assert not paths.reviews_csv.exists()
    page = client.get("/review").text
    assert f'name="csrf-token" content="{settings.csrf}"' in page
    for header in ("content-security-policy", "x-content-type-options", "x-frame-options"):
        assert header in client.get("/review").headers


@pytest.mark.parametrize(
    "url",
    [
        "/files/../studio.yaml",
        "/files/%2e%2e/%2e%2e/studio.yaml",
        "/files/candidates/..%2f..%2f..%2f..%2fstudio.yaml",
        "/files/%2fetc%2fpasswd",
        "/files//etc/passwd",
        "/files/candidates/CS-1/..%5c..%5cindex.json",
        "/files/candidates/CS-1/%252e%252e/render.json",
        "/files/outside_link.png",
        "/files/linked_dir/secret.png",
        "/files/candidates/CS-1/missing.png",
        "/files/candidates/CS-1/000-k000.png%00.png",
    ],
)
def test_paths_that_lead_out_of_the_renders_folder_are_404(project: tuple, tmp_path: Path, url: str) -> None:
    settings, paths = project
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    (paths.root / "outside_link.png").symlink_to(secret)
    (paths.root / "linked_dir").symlink_to(tmp_path)
    response = client_for(settings).get(url)
    assert response.status_code in (404, 400), (url, response.status_code)  # 400: invalid URL for the server
    assert b"secret" not in response.content


def test_a_candidate_is_served_and_a_published_file_downloads(project: tuple) -> None:
    settings, paths = project
    client = client_for(settings)
    ok = client.get("/files/candidates/CS-1/000-k000.png")
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    write_candidates(paths.root, [FakeSku("Ü 2#&", [True])])  # a SKU (a valid one) the URL must encode
    page = client.get("/review").text
    src = "/files/candidates/%C3%9C%202%23%26/000-k000.png"
    assert f'src="{src}"' in page and client.get(src).status_code == 200
    sku_dir = paths.published_dir / "amazon_main" / "CS-1"
    sku_dir.mkdir(parents=True)
    (sku_dir / "000-k000.jpg").write_bytes((paths.sku_dir("CS-1") / "000-k000.png").read_bytes())
    down = client.get("/files/published/amazon_main/CS-1/000-k000.jpg?download=1")
    assert down.status_code == 200 and "attachment" in down.headers["content-disposition"]
    page = client.get("/publish").text
    assert "published/amazon_main/CS-1/000-k000.jpg?download=1" in page


# -- specs ----------------------------------------------------------------------------------------------


def upload(client: TestClient, settings: StudioSettings, data: bytes) -> object:
    return client.post(
        "/specs/upload", data={"csrf_token": settings.csrf}, files={"sheet": ("sheet.csv", data, "text/csv")}
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"sku,colour,type,characteristics,count\nA,black,casual,,1\nB,caf\xe9,casual,,1\n", "line 3"),
        (b"sku;colour;type;characteristics;count\nA;black;casual;;1\n", "separated by semicolons"),
        (b"", "empty file (no header line)"),
        (b"A,black,casual,,1\n", "lacks the column(s)"),
        (
            b"sku,colour,type,characteristics,count\nA,black,casual,,1\na,white,casual,,1\n",
            "duplicate sku: line 2",
        ),
        (b"sku,colour,type,characteristics,count\nA,black,casual,,0\n", "count 0 must be at least 1"),
    ],
)
def test_malformed_uploads_are_refused_with_line_and_reason(
    project: tuple, data: bytes, expected: str
) -> None:
    settings, _ = project
    before = settings.specs_path.read_bytes()
    response = upload(client_for(settings), settings, data)
    assert response.status_code == 422
    assert expected in response.text
    assert "not saved" in response.text
    assert settings.specs_path.read_bytes() == before


def test_upload_limits(project: tuple) -> None:
    settings, _ = project
    before = settings.specs_path.read_bytes()
    client = client_for(settings)
    head = b"sku,colour,type,characteristics,count\nA,black,casual,"
    just_over = upload(client, settings, head + b"x" * (5 * 1024 * 1024) + b",1\n")
    assert just_over.status_code == 422 and "at most 5,242,880" in just_over.text
    # Far over: refused from its Content-Length, before the body is read.
    assert upload(client, settings, head + b"x" * (6 * 1024 * 1024) + b",1\n").status_code == 413
    many = "sku,colour,type,characteristics,count\n" + "".join(
        f"S{i},black,casual,,1\n" for i in range(10_001)
    )
    response = upload(client, settings, many.encode())
    assert response.status_code == 422 and "10,001 rows; at most 10,000" in response.text
    save = client.post("/specs/save", data={"csrf_token": settings.csrf, "sheet_csv": many})
    assert save.status_code == 422
    assert settings.specs_path.read_bytes() == before


def test_a_good_upload_is_previewed_then_saved_with_a_dated_backup(project: tuple) -> None:
    settings, _ = project
    before = settings.specs_path.read_text()
    client = client_for(settings)
    sheet = "sku,colour,type,characteristics,count\nNEW-1,brown,loafers,,1\n"
    preview = upload(client, settings, sheet.encode())
    assert preview.status_code == 200 and "not saved yet" in preview.text and 'value="NEW-1"' in preview.text
    assert settings.specs_path.read_text() == before
    saved = client.post("/specs/save", data={"csrf_token": settings.csrf, "sheet_csv": sheet})
    assert saved.status_code == 200 and "saved 1 rows" in saved.text
    assert settings.specs_path.read_text() == sheet
    backups = list(backup_dir(settings.specs_path).iterdir())
    assert len(backups) == 1 and backups[0].read_text() == before


def test_hostile_text_is_escaped(project: tuple) -> None:
    settings, paths = project
    client = client_for(settings)
    hostile = "<script>alert(1)</script>"
    sheet = f'sku,colour,type,characteristics,count\n"{hostile}",black,casual,"{hostile}",1\n'
    page = upload(client, settings, sheet.encode()).text
    assert hostile not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    c = candidate(paths, "CS-1", 0)
    note = '"><img src=x onerror=alert(2)>'
    assert (
        decision(
            client,
            settings,
            sku="CS-1",
            seed=c["seed"],
            image_sha256=c["image_sha256"],
            decision="approve",
            note=note,
        ).status_code
        == 200
    )
    page = client.get("/review").text
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(2)&gt;" in page


# -- decisions ------------------------------------------------------------------------------------------


def test_decisions_are_written_at_once_and_the_later_one_wins(project: tuple) -> None:
    settings, paths = project
    client = client_for(settings)
    c = candidate(paths, "CS-1", 1)
    first = decision(
        client,
        settings,
        sku="CS-1",
        seed=c["seed"],
        image_sha256=c["image_sha256"],
        decision="approve",
        note="nice",
    )
    assert first.status_code == 200 and first.json()["decision"] == "approve"
    rows = {(r.sku, r.file): r for r in read_reviews(paths.reviews_csv)}
    assert rows[("CS-1", c["file"])].decision == "approve" and rows[("CS-1", c["file"])].note == "nice"
    assert len(rows) == 5  # every candidate has its row, as render_review writes it
    decision(client, settings, sku="CS-1", seed=c["seed"], image_sha256=c["image_sha256"], decision="reject")
    rows = {(r.sku, r.file): r for r in read_reviews(paths.reviews_csv)}
    assert rows[("CS-1", c["file"])].decision == "reject" and rows[("CS-1", c["file"])].note == "nice"
    page = client.get("/review").text
    assert 'decision-reject" tabindex="0" data-sku="CS-1" data-seed="1"' in page
    bad = decision(
        client, settings, sku="CS-1", seed=c["seed"], image_sha256=c["image_sha256"], decision="maybe"
    )
    assert bad.status_code == 422 and "use approve, reject" in bad.json()["error"]


def test_a_decision_on_a_vanished_candidate_is_refused(project: tuple) -> None:
    settings, paths = project
    client = client_for(settings)
    c = candidate(paths, "CS-2", 0)
    write_candidates(paths.root, [FakeSku("CS-1", [True, False, True])])  # CS-2 left the sheet
    before = paths.reviews_csv.read_bytes() if paths.reviews_csv.exists() else None
    response = decision(
        client, settings, sku="CS-2", seed=c["seed"], image_sha256=c["image_sha256"], decision="approve"
    )
    assert response.status_code == 409
    assert (
        "no current candidate" in response.json()["error"] and "reload the page" in response.json()["error"]
    )
    assert (paths.reviews_csv.read_bytes() if paths.reviews_csv.exists() else None) == before


def test_approve_top_n_leaves_rejects_alone_and_filters(project: tuple) -> None:
    settings, paths = project
    client = client_for(settings)
    c0 = candidate(paths, "CS-1", 0)
    decision(
        client, settings, sku="CS-1", seed=c0["seed"], image_sha256=c0["image_sha256"], decision="reject"
    )
    response = client.post(
        "/api/approve-top", json={"sku": "CS-1", "n": 2}, headers={CSRF_HEADER: settings.csrf}
    )
    assert response.status_code == 200
    got = {(r.file, r.decision) for r in read_reviews(paths.reviews_csv) if r.sku == "CS-1"}
    assert got == {("000-k000.png", "reject"), ("001-k000.png", "approve"), ("002-k000.png", "approve")}
    undecided = client.get("/review?filter=undecided").text
    assert 'data-sku="CS-2"' in undecided and 'section class="sku" data-sku="CS-1"' not in undecided
    failing = client.get("/review?filter=qa_fail").text
    assert 'section class="sku" data-sku="CS-1"' in failing and "background_white" in failing


def test_review_page_without_renders_says_what_to_run(tmp_path: Path) -> None:
    settings = settings_for(write_project(tmp_path))
    page = client_for(settings).get("/review").text
    assert "index.json: not found; materialize product_renders first" in page


# -- Dagster ---------------------------------------------------------------------------------------------


def test_no_dagster_webserver_shows_the_equivalent_command(project: tuple) -> None:
    settings, paths = project
    client = client_for(settings)
    response = client.post("/render", data={"csrf_token": settings.csrf})
    assert response.status_code == 503
    assert "no Dagster webserver answers at" in response.text
    assert "launch --assets product_renders,render_review" in response.text
    response = client.post("/publish", data={"csrf_token": settings.csrf})
    assert response.status_code == 503 and "--assets render_review,published_renders" in response.text


@pytest.fixture
def erroring_dagster() -> Iterator[str]:
    """A webserver whose GraphQL answers with Dagster's error type (a code location that failed to load)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = {
                "data": {
                    "repositoriesOrError": {
                        "__typename": "PythonError",
                        "message": "code location shoe_lora_pipeline failed: <b>boom</b>",
                    }
                }
            }
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_dagster_answering_with_an_error_is_shown_and_nothing_is_written(
    project: tuple, erroring_dagster: str
) -> None:
    settings, paths = project
    settings.dagster_url = erroring_dagster
    before = {p: p.read_bytes() for p in paths.root.rglob("*") if p.is_file()}
    response = client_for(settings).post("/publish", data={"csrf_token": settings.csrf})
    assert response.status_code == 502
    assert "answered with an error: PythonError: code location shoe_lora_pipeline failed" in response.text
    assert "&lt;b&gt;boom&lt;/b&gt;" in response.text
    assert {p: p.read_bytes() for p in paths.root.rglob("*") if p.is_file()} == before


# -- the command ------------------------------------------------------------------------------------------


def test_non_loopback_host_without_token_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHOE_LORA_STUDIO_TOKEN", raising=False)
    cfg = str(write_project(tmp_path))
    assert cli_main(["studio", "--config", cfg, "--host", "0.0.0.0"]) == 2
    assert "--host 0.0.0.0 is reachable from other machines" in capsys.readouterr().err
    assert cli_main(["studio", "--config", cfg, "--host", "0.0.0.0", "--token", "short"]) == 2
    assert "use at least 16" in capsys.readouterr().err
    (tmp_path / "nosheet.yaml").write_text(
        "dataset: {name: c, raw_dir: raw, output_dir: out}\ntraining: {base_model: tiny-sd, output_dir: out/l}\n"
    )
    assert cli_main(["studio", "--config", str(tmp_path / "nosheet.yaml")]) == 2
    assert "has no renders.specs_csv" in capsys.readouterr().err
    assert os.environ.get("SHOE_LORA_STUDIO_TOKEN") is None


def test_malformed_requests_get_a_clear_4xx(project: tuple) -> None:
    settings, paths = project
    client = client_for(settings)
    before = settings.specs_path.read_bytes()
    garbage = client.post(
        "/specs/upload",
        content=b"--x\r\nnot a part\r\n",
        headers={"content-type": "multipart/form-data; boundary=zzz"},
    )
    assert garbage.status_code in (400, 403)  # unreadable form, or no CSRF token in it
    no_file = client.post("/specs/upload", data={"csrf_token": settings.csrf})
    assert no_file.status_code == 400 and "choose a CSV file" in no_file.text
    many = {f"f{i}": "x" for i in range(50)} | {"csrf_token": settings.csrf}
    assert client.post("/specs/upload", data=many).status_code == 400
    not_json = client.post("/api/decision", content=b"{nope", headers={CSRF_HEADER: settings.csrf})
    assert not_json.status_code == 400 and not_json.json()["error"] == "the request body is not JSON"
    missing = client.post("/api/decision", json={"sku": "CS-1"}, headers={CSRF_HEADER: settings.csrf})
    assert missing.status_code == 400 and "missing field 'seed'" in missing.json()["error"]
    assert settings.specs_path.read_bytes() == before and not paths.reviews_csv.exists()
