"""One writer per category folder: a lock file (``.lock``) inside ``dataset.output_dir`` and
``training.output_dir`` that every step writing there holds while it runs.

The lock is an ``fcntl.flock`` on the file, so the kernel releases it when its holder exits however it
exits (a SIGKILL, the OOM killer); nothing stale is ever left to clean up. The file says who holds it:
run id, pid, host and since when, so a step that waits in vain fails naming the holder.

Steps of one run share the lock, steps of another run wait. A run's steps may be in one process (Dagster's
in-process executor: one run worker) or in several at once (the multiprocess executor: one process per
step, two of them writing the same category at the same time, e.g. the evaluation and the renders). A
per-process exclusive lock would make those wait for each other (or time out) although they are one run;
so holders take a *shared* flock, and only processes of the run named in the file may join:

* every taker first takes ``.lock.gate`` exclusively (held for microseconds, never while a step runs), so
  deciding and taking is atomic;
* it then tries an exclusive ``.lock`` without blocking: if that succeeds nobody holds it, so it writes its
  own run id, pid, host and time and turns the lock into a shared one (no other taker can slip in while
  it converts: they wait on the gate);
* if it fails, someone holds the lock: a process of the same run joins with a shared lock, any other run
  lets go of the gate and tries again until ``timeout_s`` is spent, then fails naming the holder.

A process keeps what it holds per (folder, run id) and takes it once (re-entrant: the steps of one run in
one process). Releasing is per run: :func:`release_run` at the end of a step process or a run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = ".lock"
GATE_NAME = ".lock.gate"
FILE_NAMES = (LOCK_NAME, GATE_NAME)  # what the lock leaves in a category folder
POLL_INTERVAL_S = 0.2


class CategoryLockedError(RuntimeError):
    """Another run holds a category folder's lock longer than the configured wait."""

    def __init__(self, folder: Path, holder: dict[str, object], waited_s: float) -> None:
        self.folder, self.holder = folder, holder
        who = ", ".join(f"{k} {holder[k]}" for k in ("run_id", "pid", "host", "since") if k in holder)
        super().__init__(
            f"{folder} is being written by another run ({who or 'holder unknown'}); waited {waited_s:.0f} s "
            "(automation.category_lock_timeout_s). It never writes beside it: wait for that run to end, "
            "or cancel it, and materialise again"
        )


@dataclass
class _Held:
    fd: int
    count: int


_held: dict[tuple[str, str], _Held] = {}
_mutex = threading.Lock()


def read_holder(folder: Path) -> dict[str, object]:
    """What the lock file of ``folder`` says about its (last) holder; empty if nothing readable."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)


def _try_take(folder: Path, run_id: str) -> int | None:
    """One attempt under the gate: a file descriptor holding the shared lock, or None (another run)."""
    gate = _open(folder / GATE_NAME)
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fd = _open(folder / LOCK_NAME)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if read_holder(folder).get("run_id") != run_id:
                    os.close(fd)
                    return None
            else:
                holder = {
                    "run_id": run_id,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            fcntl.flock(fd, fcntl.LOCK_SH)  # joins the run's holders (or converts our exclusive lock)
            return fd
        except BaseException:
            os.close(fd)
            raise
    finally:
        os.close(gate)  # closing releases the gate


def acquire(folder: Path, run_id: str, timeout_s: float) -> None:
    """Hold ``folder``'s lock for ``run_id`` (re-entrant per process and run); wait up to ``timeout_s`` for
    another run to let go, then raise :class:`CategoryLockedError` naming it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = (str(folder.resolve()), run_id)
    with _mutex:
        if key in _held:
            _held[key].count += 1
            return
    start = time.monotonic()
    while (fd := _try_take(folder, run_id)) is None:
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise CategoryLockedError(folder, read_holder(folder), waited)
        time.sleep(min(POLL_INTERVAL_S, max(0.0, timeout_s - waited)))
    with _mutex:
        if key in _held:  # another thread of this process took it meanwhile: keep one descriptor
            os.close(fd)
            _held[key].count += 1
        else:
            _held[key] = _Held(fd, 1)


def release_run(run_id: str) -> list[str]:
    """Let go of every folder this process holds for ``run_id``; returns the folders."""
    with _mutex:
        keys = [k for k in _held if k[1] == run_id]
        for key in keys:
            with contextlib.suppress(OSError):
                os.close(_held.pop(key).fd)  # closing the last descriptor releases the flock
    return [k[0] for k in keys]


def held_folders() -> list[str]:
    """The folders this process holds a lock on (any run)."""
    with _mutex:
        return sorted({k[0] for k in _held})


def acquire_all(folders: list[Path], run_id: str, timeout_s: float) -> None:
    """:func:`acquire` on each folder in one order (by path), so two runs never hold one each and wait for
    the other; on a failure the ones taken here are let go again."""
    taken: list[Path] = []
    try:
        for folder in sorted({Path(f).resolve() for f in folders}):
            acquire(folder, run_id, timeout_s)
            taken.append(folder)
    except BaseException:
        with _mutex:
            for folder in taken:
                held = _held.get((str(folder), run_id))
                if held is not None:
                    held.count -= 1
                    if held.count == 0:
                        os.close(_held.pop((str(folder), run_id)).fd)
        raise
