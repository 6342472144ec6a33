"""``shoe-lora studio``: the settings it starts with, checked (a non-loopback address needs a token), and
the uvicorn server."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from shoe_lora_pipeline.core.config import ConfigError, load_config
from shoe_lora_pipeline.studio.app import LOOPBACK_HOSTS, StudioSettings

TOKEN_ENV = "SHOE_LORA_STUDIO_TOKEN"
MIN_TOKEN_CHARS = 16


class StudioConfigError(ValueError):
    """The studio cannot start with these settings; the message says which and why."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def studio_settings(
    config: str | Path | None,
    category: str | None,
    host: str,
    dagster_url: str,
    token: str | None,
) -> StudioSettings:
    """The settings for ``shoe-lora studio``; :class:`StudioConfigError` when it must not start."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        raise StudioConfigError(
            f"--host {host} is reachable from other machines: give an access token with --token or "
            f"${TOKEN_ENV} (e.g. `export {TOKEN_ENV}=$(python -c 'import secrets;print(secrets.token_urlsafe())')`), "
            "or bind to 127.0.0.1"
        )
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise StudioConfigError(
            f"the access token is {len(token)} characters; use at least {MIN_TOKEN_CHARS}"
        )
    try:
        cfg = load_config(config, check_paths=False)
        name = category or cfg.dataset.name
        cat = cfg.for_category(name)
    except ConfigError as exc:
        raise StudioConfigError(str(exc)) from None
    if cat.renders.specs_csv is None:
        raise StudioConfigError(
            f"category {name!r} has no renders.specs_csv in {cfg.source_path}: set it to the specs sheet's "
            "path (it need not exist yet) and the studio serves that category"
        )
    return StudioSettings(
        cfg=cat,
        category=name,
        dagster_url=dagster_url,
        token=token,
        allowed_hosts=LOOPBACK_HOSTS if is_loopback(host) else ("*",),
        dagster_home=os.environ.get("DAGSTER_HOME"),
    )


def serve(settings: StudioSettings, host: str, port: int) -> None:
    """Run the studio until interrupted."""
    import uvicorn

    from shoe_lora_pipeline.studio.app import create_app

    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    if settings.token:
        url += f"?token={settings.token}"
    print(f"shoe-lora studio: {settings.category} at {url}", flush=True)
    print(f"  renders: {settings.renders_dir}; specs sheet: {settings.specs_path}", flush=True)
    print(f"  Dagster webserver: {settings.dagster_url}", flush=True)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
