"""The data stage's process pool: one place that decides how many workers and how they start.

``map_in_workers(fn, items)`` runs ``fn`` over ``items`` in worker processes (one per CPU core unless
told otherwise) and returns the results in item order, whatever the worker count, so outputs are
deterministic. Workers cost a process start each (~0.1-0.3 s: the interpreter plus the worker module's
imports), so a handful of items (the usual "a few new photos") run in this process instead.

Start method: ``forkserver`` where the platform has it, with only the worker's own module preloaded:
each worker is forked from a small single-threaded server, so it starts fast, is safe inside threaded
hosts (Dagster), and never re-imports the host's ``__main__`` (``spawn`` would, e.g. the whole Dagster
CLI). ``spawn`` elsewhere (Windows).
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from shoe_lora_pipeline.core.lifetime import die_with_parent

T = TypeVar("T")
R = TypeVar("R")

# Below this many items the pool's start-up costs more than it saves (a cleaned photo is ~15-30 ms).
MIN_ITEMS_FOR_POOL = 24


def effective_workers(workers: int, n_items: int) -> int:
    """``workers`` (0 = one per CPU core this process may use), never more than there are items."""
    if workers > 0:
        wanted = workers
    elif hasattr(os, "sched_getaffinity"):
        wanted = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS/Windows
        wanted = os.cpu_count() or 1
    return max(1, min(wanted, n_items))


def _context(fn: Callable[..., object]) -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([fn.__module__])  # only takes effect when the server first starts
        return ctx
    return multiprocessing.get_context("spawn")  # pragma: no cover - Windows


def map_in_workers(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[R]:
    """``[fn(item) for item in items]``, in worker processes when that pays off.

    ``fn`` must be a module-level function (it is pickled by reference) and idempotent: if the pool
    breaks (a worker killed by the OOM killer, say), the items without a result run again in this
    process, with a RuntimeWarning. ``progress(done, total)`` is called after each result.
    """
    results: list[R] = []

    def collect(result: R) -> None:
        results.append(result)
        if progress is not None:
            progress(len(results), len(items))

    n = effective_workers(workers, len(items))
    if n > 1 and len(items) >= MIN_ITEMS_FOR_POOL:
        # Chunks keep the per-item IPC small; several per worker keep the workers evenly busy.
        chunksize = max(1, min(32, len(items) // (n * 4)))
        try:
            # Each worker ends with its parent (the forkserver, which ends with this process): a killed
            # step leaves no worker decoding on.
            ctx = _context(fn)
            with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=die_with_parent) as pool:
                for result in pool.map(fn, items, chunksize=chunksize):
                    collect(result)
        except BrokenProcessPool as exc:
            warnings.warn(f"worker pool failed ({exc}); continuing in-process", RuntimeWarning, stacklevel=2)
    for item in items[len(results) :]:
        collect(fn(item))
    return results
