"""Launching and following runs through the Dagster webserver's GraphQL API (``dagster_graphql``'s
client, imported when first used: the studio starts without loading Dagster).

Runs are of the implicit asset job with an asset selection, as the Dagster UI's "Materialize" button and
``dg launch --assets`` make them, so a run is the same whichever of the three started it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from dagster_graphql import DagsterGraphQLClient

ASSET_JOB = "__ASSET_JOB"  # Dagster's implicit job over every asset (what "Materialize" launches)
TERMINAL = frozenset({"SUCCESS", "FAILURE", "CANCELED"})
TIMEOUT_S = 15


class DagsterUnreachable(RuntimeError):
    """No Dagster webserver answers at the configured URL."""


class DagsterAnswerError(RuntimeError):
    """The webserver answered, with an error (the message is Dagster's)."""


def _client(url: str) -> DagsterGraphQLClient:
    import warnings

    from dagster_graphql import DagsterGraphQLClient

    # dagster_graphql's own calls into gql use a form gql deprecates; nothing the studio can change.
    warnings.filterwarnings(
        "ignore", message="Using variable_values and operation_name", category=DeprecationWarning
    )

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DagsterUnreachable(f"--dagster-url {url!r} is not an http(s) URL")
    return DagsterGraphQLClient(
        parts.hostname,
        port_number=parts.port,
        use_https=parts.scheme == "https",
        timeout=TIMEOUT_S,
        path_prefix=parts.path.rstrip("/"),
    )


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cause: BaseException | None = exc.__cause__ or exc.__context__
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def _translate(url: str, exc: Exception) -> RuntimeError:
    import requests

    causes = _causes(exc)
    if any(isinstance(c, requests.ConnectionError | requests.Timeout) for c in causes):
        return DagsterUnreachable(f"no Dagster webserver answers at {url}")
    args = [str(a) for a in exc.args if a]
    if args and args[0].startswith(("Exception occured", "Server error")) and causes:
        # The client wraps transport failures with the whole query text; what went wrong is the cause.
        args = [f"{type(causes[0]).__name__}: {causes[0]}"]
    message = ": ".join(args) or type(exc).__name__
    body = getattr(exc, "body", None)
    if body:
        message += f" ({body})"
    return DagsterAnswerError(f"Dagster at {url} answered with an error: {message}")


def launch_assets(
    url: str,
    keys: Sequence[Sequence[str]],
    tags: Mapping[str, str],
    run_config: Mapping[str, Any] | None = None,
) -> str:
    """Launch a run materialising ``keys``; its run id."""
    from dagster_graphql import DagsterGraphQLClientError

    try:
        return _client(url).submit_job_execution(
            ASSET_JOB, asset_selection=[list(k) for k in keys], tags=dict(tags), run_config=run_config
        )
    except DagsterGraphQLClientError as exc:
        raise _translate(url, exc) from exc


def run_status(url: str, run_id: str) -> str:
    """A run's status name (``QUEUED``, ``STARTED``, ``SUCCESS``, ``FAILURE``, …)."""
    from dagster_graphql import DagsterGraphQLClientError

    try:
        return _client(url).get_run_status(run_id).value
    except DagsterGraphQLClientError as exc:
        raise _translate(url, exc) from exc


def run_url(url: str, run_id: str) -> str:
    """The run's page in the Dagster UI."""
    return f"{url.rstrip('/')}/runs/{run_id}"
