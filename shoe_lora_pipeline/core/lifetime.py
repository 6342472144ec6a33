"""Processes of ours never outlive the process that started them.

:func:`die_with_parent` asks the kernel to signal this process when its parent ends (Linux
``PR_SET_PDEATHSIG``; elsewhere a watcher thread). :func:`tie_step_to_run_worker` is what a Dagster step
calls at its start; the data stage's pool workers call :func:`die_with_parent` as their initializer.

Which parent: the process's parent at step start.

* Multiprocess executor (the default of ``Definitions``): each step is a ``multiprocessing`` child of the
  run worker (``dagster asset materialize`` itself, or the ``dagster api execute_run`` worker under
  ``dagster dev``), started from the run worker's executing thread, which lives until the run ends. The
  step ties itself to it: a SIGKILL of the run worker ends the step (and, through their own ties, the
  step's pool workers, forkserver and training children) at once.
* In-process executor (``dg.materialize`` in tests, ``execution: in_process``): the step *is* the run
  worker, so a SIGKILL of the run worker already ends it. Its parent is not Dagster's (pytest, a shell, the
  code server); tying to it would kill a test process or a run Dagster means to let finish. Nothing to do.

Above the run worker, ``dagster dev`` and its code server: a watcher thread ends the step when any Python
ancestor of its session ends (:func:`watch_ancestors`), since ``PR_SET_PDEATHSIG`` only knows the parent.

``PR_SET_PDEATHSIG`` fires when the parent *thread* ends, which is why it is used only where the parent
is known to start the child from a long-lived thread (the first case). Cancelling from the UI is not
affected: Dagster still asks the step to stop (SIGINT → KeyboardInterrupt in the step, its graceful path).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time

_tied_to: int | None = None


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have this process receive ``sig`` as soon as its parent process ends (however it ends).

    Linux: the kernel's ``PR_SET_PDEATHSIG``; elsewhere a daemon thread that watches the parent pid. Both
    check once that the parent is not already gone (the race between fork and this call).
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) == 0:
            if os.getppid() != parent:
                os.kill(os.getpid(), sig)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def runs_in_step_process() -> bool:
    """Whether this process was started by ``multiprocessing`` (a step of the multiprocess executor) rather
    than being the run worker itself."""
    return multiprocessing.parent_process() is not None


def tie_step_to_run_worker() -> bool:
    """At a step's start: end this process with its run worker, and with the Dagster processes above it
    (see the module docstring). Returns whether it is tied. Once per process: every later step of the same
    process finds it done."""
    global _tied_to
    if not runs_in_step_process():
        return False
    parent = os.getppid()
    if _tied_to != parent:
        die_with_parent(signal.SIGKILL)
        watch_ancestors(python_ancestors()[1:], signal.SIGKILL)  # [0] is the parent: PDEATHSIG
        _tied_to = parent
    return True


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """``(ppid, session id, start time)`` of a live process from ``/proc`` (Linux); None if it has ended
    (a zombie included) or elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, session, …
    if fields[0] in ("Z", "X"):  # a zombie has ended; only its parent has not reaped it yet
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _is_python(pid: int) -> bool:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("python")
    except OSError:
        return False


def python_ancestors() -> list[tuple[int, int]]:
    """``(pid, start time)`` of this process's ancestors, nearest first, while they are Python processes of
    this session: under ``dagster dev`` the run worker, the code server and ``dagster dev`` itself; under
    ``dagster asset materialize`` the CLI. A shell, an init or a service manager above them ends the walk,
    so a server started with ``nohup`` is not tied to the shell that started it. Empty where ``/proc``
    is missing."""
    own = _proc_stat(os.getpid())
    if own is None:
        return []
    found: list[tuple[int, int]] = []
    pid = own[0]
    while pid > 1 and (stat := _proc_stat(pid)) is not None and stat[1] == own[1] and _is_python(pid):
        found.append((pid, stat[2]))
        pid = stat[0]
    return found


def watch_ancestors(ancestors: list[tuple[int, int]], sig: int, interval_s: float = 0.5) -> None:
    """Send ``sig`` to this process once any of ``ancestors`` (pid, start time) has ended; a daemon thread.

    ``PR_SET_PDEATHSIG`` covers the parent only: a SIGKILL of ``dagster dev`` leaves its code server
    serving (Dagster lets it finish the runs it launched, after a 30 s heartbeat timeout), so the run
    worker and this step would train on. The start time tells a recycled pid from the same process."""
    if not ancestors:
        return

    def watch() -> None:
        while all((stat := _proc_stat(pid)) is not None and stat[2] == start for pid, start in ancestors):
            time.sleep(interval_s)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="die-with-dagster", daemon=True).start()
