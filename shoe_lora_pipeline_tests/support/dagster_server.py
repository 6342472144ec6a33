"""A real ``dg dev`` for tests: a free loopback port, its own DAGSTER_HOME, its own process group.

:func:`running_dagster_dev` starts the webserver, the daemon and the code server with the `dg` CLI exactly
as a user would, waits (bounded) until the code location has loaded, and on exit shuts the whole process group
down -- politely first, then SIGTERM to the group, then SIGKILL -- and reports any process it left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

# The code location, its jobs and assets; loading it imports torch, diffusers, peft…
READY_TIMEOUT_S = 120.0
# `dg dev` maps SIGTERM to SIGINT and then stops the webserver and daemon (up to 5 s each for
# those alone) and the code server; on 2 busy cores that takes a few seconds more.
GRACEFUL_STOP_S = 45.0
POLL_INTERVAL_S = 0.5

WORKSPACE_QUERY = """
query Workspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { name repositories { name jobs { name } } }
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message stack }
  }
}
"""


class DagsterServerError(RuntimeError):
    pass


def dg_command(*args: str) -> list[str]:
    """The `dg` CLI of this interpreter's environment (the script pip installs runs the same function)."""
    return [sys.executable, "-m", "dagster_dg_cli.cli", *args]


def free_loopback_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the kernel picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DagsterDev:
    """A running ``dg dev``: its address, its instance folder, its log and its process group."""

    port: int
    home: Path
    log_path: Path
    proc: subprocess.Popen
    _seen: dict[int, psutil.Process] = field(default_factory=dict)

    host = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pgid(self) -> int:
        # start_new_session=True: the `dg dev` process leads its own session and process group.
        return self.proc.pid

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None, timeout: float = 30) -> dict:
        """POST a raw GraphQL query; returns ``data``; raises with the server's errors."""
        resp = requests.post(
            f"{self.url}/graphql", json={"query": query, "variables": dict(variables or {})}, timeout=timeout
        )
        resp.raise_for_status()
        body = resp.json()
        if body.get("errors"):
            raise DagsterServerError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    # -- processes -----------------------------------------------------------------------------------

    def _remember_tree(self) -> None:
        """Record every descendant seen so far (a process can leave the group but not this record)."""
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self._seen.setdefault(p.pid, p)

    def group_members(self) -> list[psutil.Process]:
        """Live (non-zombie) processes of the server's process group, plus any descendant seen before."""
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == self.pgid and p.status() != psutil.STATUS_ZOMBIE:
                    found[p.pid] = p
            except (ProcessLookupError, psutil.Error):
                continue
        for pid, p in self._seen.items():
            try:
                # is_running() also guards against a recycled pid (it compares creation times).
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    found[pid] = p
            except psutil.Error:
                continue
        return list(found.values())

    def describe(self, procs: list[psutil.Process]) -> str:
        lines = []
        for p in procs:
            try:
                lines.append(f"pid {p.pid} ({p.status()}): {' '.join(p.cmdline())[:200]}")
            except psutil.Error:
                lines.append(f"pid {p.pid} (gone)")
        return "\n".join(lines)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)
        for p in self.group_members():  # descendants that left the group, if any
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)

    def stop(self) -> list[psutil.Process]:
        """Shut everything down; returns the processes still alive afterwards (should be none)."""
        self._remember_tree()
        if self.proc.poll() is None:
            # The polite way, as Ctrl-C in a terminal: `dg dev` stops its services in order.
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=GRACEFUL_STOP_S)
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            left = self.group_members()
            if not left and self.proc.poll() is not None:
                break
            self._signal_group(sig)
            psutil.wait_procs(left, timeout=wait_s)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait_s)
        return self.group_members()

    # -- readiness -----------------------------------------------------------------------------------

    def wait_until_loaded(self, timeout: float = READY_TIMEOUT_S) -> dict:
        """Poll until the webserver answers and every code location has loaded; returns the workspace.

        Fails at once if the server exits or a code location fails to load (with the Python error).
        """
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            self._remember_tree()
            if self.proc.poll() is not None:
                raise DagsterServerError(
                    f"dg dev exited with code {self.proc.returncode} before it was ready:\n{self.log_tail()}"
                )
            try:
                info = requests.get(f"{self.url}/server_info", timeout=2)
                if info.ok:
                    ws = self.graphql(WORKSPACE_QUERY, timeout=10)["workspaceOrError"]
                    if ws["__typename"] != "Workspace":
                        raise DagsterServerError(f"workspace error: {ws.get('message')}")
                    entries = ws["locationEntries"]
                    for entry in entries:
                        loc = entry["locationOrLoadError"] or {}
                        if loc.get("__typename") == "PythonError":
                            raise DagsterServerError(
                                f"code location {entry['name']!r} failed to load: {loc['message']}\n"
                                f"{''.join(loc.get('stack') or [])}"
                            )
                    loaded = [e for e in entries if e["loadStatus"] == "LOADED" and e["locationOrLoadError"]]
                    if entries and len(loaded) == len(entries):
                        return ws
                    last = f"locations: {[(e['name'], e['loadStatus']) for e in entries]}"
                else:
                    last = f"/server_info answered {info.status_code}"
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}"
            time.sleep(POLL_INTERVAL_S)
        raise DagsterServerError(f"dg dev not ready after {timeout:.0f} s ({last}):\n{self.log_tail()}")


@contextlib.contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """A child inherits an *ignored* SIGINT (e.g. a CI step started in the background with `&`); then
    `dg dev` would ignore SIGTERM too (it maps SIGTERM to SIGINT). Give the child the default."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        yield


@contextlib.contextmanager
def running_dagster_dev(
    workdir: Path,
    env: Mapping[str, str],
    module: str = "shoe_lora_pipeline.definitions",
    instance_yaml: Path | None = None,
    workspace: Path | None = None,
) -> Iterator[DagsterDev]:
    """``dg dev -m <module>`` (or ``dg dev -w <workspace>``) on a free 127.0.0.1 port, DAGSTER_HOME =
    ``workdir/dagster_home``.

    ``env`` is added to the current environment. On exit the server's process group is shut down and
    :class:`DagsterServerError` is raised if any of its processes survived.
    """
    home = workdir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    if instance_yaml is not None:
        shutil.copy2(instance_yaml, home / "dagster.yaml")
    log_path = workdir / "dagster_dev.log"
    port = free_loopback_port()
    full_env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    target = ["-w", str(workspace)] if workspace is not None else ["-m", module]
    cmd = dg_command("dev", *target, "--host", "127.0.0.1", "--port", str(port))
    with open(log_path, "wb") as log, _sigint_not_ignored():
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,  # no dagster.yaml/pyproject here: the module and DAGSTER_HOME say everything
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = DagsterDev(port=port, home=home, log_path=log_path, proc=proc)
    try:
        yield server
    finally:
        left = server.stop()
        if left:
            raise DagsterServerError(f"processes left after shutting down dg dev:\n{server.describe(left)}")
