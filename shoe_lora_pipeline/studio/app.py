"""The review studio's web app (Starlette + Jinja2): specs → render → review → publish for one category.

Pages are thin: the specs rules, the reviews.csv merge and the published set are the core's
(:mod:`shoe_lora_pipeline.core.studio`, :mod:`shoe_lora_pipeline.core.renders.decisions`); runs are launched
through Dagster's GraphQL API (:mod:`.dagster_runs`). Security: a token (when one is set) on every request,
a CSRF token on every POST, request bodies capped, files served only from the renders folder, and a
Content-Security-Policy that allows no inline script, so a value from a CSV can only ever be text.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from shoe_lora_pipeline.core.config import PipelineConfig
from shoe_lora_pipeline.core.layout import Layout
from shoe_lora_pipeline.core.renders.decisions import (
    CandidateGoneError,
    approve_top,
    record_decision,
    review_state,
)
from shoe_lora_pipeline.core.renders.review import ReviewsError
from shoe_lora_pipeline.core.renders.specs import OPTIONAL_COLUMNS, REQUIRED_COLUMNS
from shoe_lora_pipeline.core.renders.store import RenderPaths, RendersStateError
from shoe_lora_pipeline.core.studio import (
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_ROWS,
    PUBLISH_ASSETS,
    RENDER_ASSETS,
    SheetProblem,
    SpecsCheck,
    check_specs_text,
    check_specs_upload,
    launch_command,
    published_set,
    refused_files,
    render_asset_keys,
    resolve_inside,
    save_specs,
    table_text,
)
from shoe_lora_pipeline.studio import dagster_runs

HERE = Path(__file__).parent
TOKEN_COOKIE = "shoe_lora_studio_token"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
# A multipart upload is the sheet plus a few small fields; anything bigger is refused before it is read.
MAX_BODY_BYTES = MAX_UPLOAD_BYTES + 64 * 1024
_RUN_ID = re.compile(r"^[0-9a-f-]{8,64}$")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class StudioSettings:
    """What one studio serves: a category's config (``PipelineConfig.for_category``), where Dagster is."""

    cfg: PipelineConfig
    category: str
    dagster_url: str = "http://127.0.0.1:3000"
    token: str | None = None
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    dagster_home: str | None = None
    run_config: dict[str, Any] | None = None  # for the runs it launches (None: the job's defaults)
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @property
    def renders_dir(self) -> Path:
        return Layout.of(self.cfg).renders_dir

    @property
    def paths(self) -> RenderPaths:
        return RenderPaths(self.renders_dir)

    @property
    def specs_path(self) -> Path | None:
        return self.cfg.renders.specs_csv


class BodyTooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware: the access token (query ``?token=`` once, then a cookie; or ``Authorization:
    Bearer``), a cap on request bodies, and security headers on every answer."""

    def __init__(self, app: ASGIApp, settings: StudioSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        token = self.settings.token
        if token:
            given = request.query_params.get("token")
            if given is not None and hmac.compare_digest(given.encode(), token.encode()):
                # Trade the token in the URL for a cookie, and drop it from the address bar and history.
                query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
                response: Response = RedirectResponse(scope["path"] + (f"?{query}" if query else ""), 303)
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                await self._send_with_headers(response, scope, receive, send)
                return
            cookie = request.cookies.get(TOKEN_COOKIE, "")
            auth = request.headers.get("authorization", "")
            bearer = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not any(hmac.compare_digest(v.encode(), token.encode()) for v in (cookie, bearer) if v):
                response = PlainTextResponse(
                    "This review studio needs its access token: open the address it printed when it "
                    "started (…/?token=…).",
                    401,
                )
                await self._send_with_headers(response, scope, receive, send)
                return
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            response = PlainTextResponse(
                f"request too large: at most {MAX_UPLOAD_BYTES // (1024 * 1024)} MB per upload", 413
            )
            await self._send_with_headers(response, scope, receive, send)
            return
        received = 0

        async def limited_receive() -> MutableMapping[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise BodyTooLarge
            return message

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + _SECURITY_HEADERS
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except BodyTooLarge:
            response = PlainTextResponse("request too large", 413)
            await self._send_with_headers(response, scope, receive, send)

    async def _send_with_headers(
        self, response: Response, scope: Scope, receive: Receive, send: Send
    ) -> None:
        response.raw_headers += _SECURITY_HEADERS
        await response(scope, receive, send)


_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; object-src 'none'; "
        b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every value from a CSV (SKU, prompt, note) is text in the page
        undefined=jinja2.StrictUndefined,
    )
    env.filters["urlpath"] = lambda value: quote(str(value))
    return env


def create_app(settings: StudioSettings) -> Starlette:
    """The studio for one category."""
    env = _templates()

    def page(request: Request, name: str, status: int = 200, **values: Any) -> HTMLResponse:
        html = env.get_template(name).render(
            csrf=settings.csrf,
            category=settings.category,
            dagster_url=settings.dagster_url,
            current=request.url.path,
            **values,
        )
        return HTMLResponse(html, status)

    def check_csrf(given: str | None) -> None:
        if not given or not hmac.compare_digest(given.encode(), settings.csrf.encode()):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")

    async def form_with_csrf(request: Request) -> Any:
        form = await request.form(max_files=1, max_fields=20, max_part_size=MAX_BODY_BYTES)
        value = form.get(CSRF_FIELD)
        check_csrf(value if isinstance(value, str) else None)
        return form

    async def json_with_csrf(request: Request) -> dict[str, Any]:
        check_csrf(request.headers.get(CSRF_HEADER))
        try:
            data = await request.json()
        except ValueError:
            raise HTTPException(400, "the request body is not JSON") from None
        if not isinstance(data, dict):
            raise HTTPException(400, "expected a JSON object")
        return data

    def run_info(run_id: str | None) -> dict[str, Any] | None:
        if not run_id:
            return None
        if not _RUN_ID.match(run_id):
            return {"id": run_id, "status": "UNKNOWN", "error": "not a run id", "url": None, "terminal": True}
        info: dict[str, Any] = {"id": run_id, "url": dagster_runs.run_url(settings.dagster_url, run_id)}
        try:
            info["status"] = dagster_runs.run_status(settings.dagster_url, run_id)
        except (dagster_runs.DagsterUnreachable, dagster_runs.DagsterAnswerError) as exc:
            info.update(status="UNKNOWN", error=str(exc))
        info["terminal"] = info["status"] in dagster_runs.TERMINAL or "error" in info
        return info

    def launch(request: Request, names: tuple[str, ...], back: str, trigger: str) -> Response:
        keys = render_asset_keys(settings.cfg, settings.category, names)
        try:
            run_id = dagster_runs.launch_assets(
                settings.dagster_url,
                keys,
                {"category": settings.category, "trigger": trigger},
                settings.run_config,
            )
        except (dagster_runs.DagsterUnreachable, dagster_runs.DagsterAnswerError) as exc:
            unreachable = isinstance(exc, dagster_runs.DagsterUnreachable)
            return page(
                request,
                "launch_failed.html",
                503 if unreachable else 502,
                message=str(exc),
                unreachable=unreachable,
                assets=["/".join(k) for k in keys],
                command=launch_command(keys, settings.cfg.source_path, settings.dagster_home),
                back=back,
            )
        return RedirectResponse(f"{back}?{urlencode({'run': run_id})}", 303)

    # -- specs ------------------------------------------------------------------------------------------

    def current_sheet() -> SpecsCheck | None:
        path = settings.specs_path
        if path is None or not path.is_file():
            return None
        return check_specs_upload(path.read_bytes(), settings.cfg, max_bytes=1 << 62)

    def specs_page(
        request: Request, check: SpecsCheck | None, *, status: int = 200, state: str, message: str = ""
    ) -> HTMLResponse:
        header = (check.header if check and check.header else None) or list(
            REQUIRED_COLUMNS + OPTIONAL_COLUMNS
        )
        return page(
            request,
            "specs.html",
            status,
            specs_path=str(settings.specs_path),
            header=header,
            check=check,
            problems=check.problems if check else [],
            by_line=check.problems_by_line() if check else {},
            state=state,
            message=message,
            run=run_info(request.query_params.get("run")),
            max_mb=MAX_UPLOAD_BYTES // (1024 * 1024),
            max_rows=MAX_UPLOAD_ROWS,
        )

    def specs_get(request: Request) -> Response:
        check = current_sheet()
        if check is None:
            return specs_page(
                request, None, state="none", message="no specs sheet yet: upload one or add rows"
            )
        message = ""
        if not check.ok:
            n = len(check.problems)
            message = (
                f"the saved sheet has {n} refused row{'s' if n != 1 else ''}: product_renders skips them"
            )
        return specs_page(request, check, state="saved", message=message)

    async def specs_upload(request: Request) -> Response:
        form = await form_with_csrf(request)
        upload = form.get("sheet")
        if not isinstance(upload, UploadFile):
            return specs_page(
                request, None, status=400, state="refused", message="choose a CSV file to upload"
            )
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
        check = await run_in_threadpool(check_specs_upload, data, settings.cfg)
        if not check.ok:
            return specs_page(request, check, status=422, state="refused", message=_refused(check))
        return specs_page(
            request,
            check,
            state="preview",
            message=f"{len(check.rows)} rows checked, none refused: not saved yet",
        )

    async def specs_save(request: Request) -> Response:
        form = await form_with_csrf(request)
        text = form.get("sheet_csv")
        if not isinstance(text, str) or not text.strip():
            return specs_page(request, None, status=400, state="refused", message="the table is empty")
        check = await run_in_threadpool(check_specs_text, text, settings.cfg)
        if not check.ok:
            return specs_page(request, check, status=422, state="refused", message=_refused(check))
        path = settings.specs_path
        assert path is not None  # the CLI refuses a category without renders.specs_csv
        # Written as the table's rows (a row emptied in the table is dropped, quoting made uniform).
        backup = await run_in_threadpool(save_specs, path, table_text(check.header, check.cells))
        kept = f"; the previous sheet is kept as {backup}" if backup else ""
        return specs_page(
            request, check, state="saved", message=f"saved {len(check.rows)} rows to {path}{kept}"
        )

    def render(request: Request) -> Response:
        return launch(request, RENDER_ASSETS, "/specs", "studio_render")

    async def render_post(request: Request) -> Response:
        await form_with_csrf(request)
        return await run_in_threadpool(render, request)

    # -- review -----------------------------------------------------------------------------------------

    def review_get(request: Request) -> Response:
        wanted = request.query_params.get("filter", "")
        try:
            skus = review_state(
                settings.paths,
                auto_approve=settings.cfg.renders.auto_approve,
                require_qa_pass=settings.cfg.renders.require_qa_pass,
            )
        except (RendersStateError, ReviewsError) as exc:
            return page(request, "review.html", 200, skus=[], shown=[], error=str(exc), filter=wanted)
        shown = [
            s
            for s in skus
            if not wanted
            or (wanted == "undecided" and s.undecided)
            or (wanted == "qa_fail" and s.qa_failures)
        ]
        return page(request, "review.html", skus=skus, shown=shown, error="", filter=wanted)

    async def decision_post(request: Request) -> Response:
        data = await json_with_csrf(request)
        try:
            sku, seed, sha = str(data["sku"]), str(data["seed"]), str(data.get("image_sha256") or "")
            decision = str(data.get("decision") or "")
            note = data.get("note")
        except KeyError as exc:
            return JSONResponse({"ok": False, "error": f"missing field {exc}"}, 400)
        try:
            saved = await run_in_threadpool(
                record_decision, settings.paths, sku, seed, sha, decision, None if note is None else str(note)
            )
        except CandidateGoneError as exc:
            return JSONResponse({"ok": False, "error": str(exc)}, 409)
        except (ValueError, RendersStateError) as exc:  # ReviewsError is a ValueError
            return JSONResponse({"ok": False, "error": str(exc)}, 422)
        return JSONResponse({"ok": True, "decision": saved.decision, "note": saved.note, "file": saved.file})

    async def approve_top_post(request: Request) -> Response:
        data = await json_with_csrf(request)
        try:
            n = int(data.get("n", 0))
        except (TypeError, ValueError):
            return JSONResponse({"ok": False, "error": f"N = {data.get('n')!r} is not a whole number"}, 400)
        try:
            rows = await run_in_threadpool(approve_top, settings.paths, str(data.get("sku", "")), n)
        except CandidateGoneError as exc:
            return JSONResponse({"ok": False, "error": str(exc)}, 409)
        except (ValueError, RendersStateError) as exc:
            return JSONResponse({"ok": False, "error": str(exc)}, 422)
        return JSONResponse(
            {
                "ok": True,
                "approved": [{"seed": r.seed, "image_sha256": r.image_sha256, "file": r.file} for r in rows],
            }
        )

    # -- publish ----------------------------------------------------------------------------------------

    def publish_get(request: Request) -> Response:
        return page(
            request,
            "publish.html",
            published=published_set(settings.paths.published_dir, settings.renders_dir),
            refused=refused_files(settings.paths.manifest_csv),
            run=run_info(request.query_params.get("run")),
        )

    async def publish_post(request: Request) -> Response:
        await form_with_csrf(request)
        return await run_in_threadpool(launch, request, PUBLISH_ASSETS, "/publish", "studio_publish")

    def run_status_get(request: Request) -> Response:
        info = run_info(request.path_params["run_id"])
        return JSONResponse(info)

    # -- files ------------------------------------------------------------------------------------------

    def files_get(request: Request) -> Response:
        target = resolve_inside(settings.renders_dir, request.path_params["path"])
        if target is None or target.suffix.lower() not in (".png", ".jpg", ".jpeg", ".csv", ".json"):
            return PlainTextResponse("not found", 404)
        if request.query_params.get("download"):
            return FileResponse(target, filename=target.name)
        return FileResponse(target)

    def home(request: Request) -> Response:
        return RedirectResponse("/review", 303)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"ok": False, "error": exc.detail}, exc.status_code)
        return PlainTextResponse(exc.detail, exc.status_code)

    routes = [
        Route("/", home),
        Route("/specs", specs_get),
        Route("/specs/upload", specs_upload, methods=["POST"]),
        Route("/specs/save", specs_save, methods=["POST"]),
        Route("/render", render_post, methods=["POST"]),
        Route("/review", review_get),
        Route("/api/decision", decision_post, methods=["POST"]),
        Route("/api/approve-top", approve_top_post, methods=["POST"]),
        Route("/publish", publish_get),
        Route("/publish", publish_post, methods=["POST"]),
        Route("/api/runs/{run_id}", run_status_get),
        Route("/files/{path:path}", files_get),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(Guard, settings=settings),
        Middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts)),
    ]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})


def _refused(check: SpecsCheck) -> str:
    n = len(check.problems)
    return f"not saved: {n} problem{'s' if n != 1 else ''} (the saved sheet is unchanged)"


__all__ = ["SheetProblem", "StudioSettings", "create_app"]
