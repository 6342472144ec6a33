"""Which GPU(s) a training child gets when several categories train at once on one machine.

Dagster's ``gpu`` pool decides *how many* GPU steps run at once (``automation.gpu_slots``); this module
decides *which* GPU each one gets. One lock file per GPU index in a folder shared by every process of the
machine (default ``$TMPDIR/shoe_lora_gpu_locks``); a training takes the first free one(s) with a
non-blocking ``flock`` and holds it while its child runs, which sees only its GPUs
(``CUDA_VISIBLE_DEVICES``). The kernel drops a lock when its holder dies, however it dies, so a crashed run
never leaves a GPU taken. Linux and macOS (``fcntl``).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO

LOCK_DIR_ENV_VAR = "SHOE_LORA_GPU_LOCKS"


class NoFreeGpuError(RuntimeError):
    """Fewer free GPUs than a training needs; the message names the holders."""


def default_lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV_VAR) or Path(tempfile.gettempdir()) / "shoe_lora_gpu_locks")


def visible_gpus(environ: dict[str, str] | None = None, device_count: int | None = None) -> list[str]:
    """The GPUs this process may hand out: ``CUDA_VISIBLE_DEVICES`` when set (its entries, in order), else
    ``0 … device_count − 1`` (default: what torch sees)."""
    env = os.environ if environ is None else environ
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    return [str(i) for i in range(device_count)]


class GpuLease:
    """Held GPUs (a context manager: released on exit, or when the process ends)."""

    def __init__(self, devices: list[str], handles: list[IO[str]]) -> None:
        self.devices, self._handles = devices, handles

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(self.devices)

    def release(self) -> None:
        for handle in self._handles:
            handle.close()  # closing the file drops its flock
        self._handles = []

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _lock_path(lock_dir: Path, device: str) -> Path:
    return lock_dir / f"gpu-{device.replace('/', '_')}.lock"


def lease_gpus(count: int, devices: list[str], lock_dir: Path | None = None, holder: str = "") -> GpuLease:
    """Take ``count`` free GPUs of ``devices`` (the first free ones, in order); ``holder`` (and the pid) is
    written into each lock file for the error message of the next one that finds it taken."""
    lock_dir = Path(lock_dir or default_lock_dir())
    lock_dir.mkdir(parents=True, exist_ok=True)
    taken: list[tuple[str, IO[str]]] = []
    busy: list[str] = []
    for device in devices:
        if len(taken) == count:
            break
        handle = open(_lock_path(lock_dir, device), "a+", encoding="utf-8")  # noqa: SIM115 - held past here
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            busy.append(f"GPU {device} ({handle.read().strip() or 'held'})")
            handle.close()
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} {holder}".strip())
        handle.flush()
        taken.append((device, handle))
    if len(taken) < count:
        for _, handle in taken:
            handle.close()
        raise NoFreeGpuError(
            f"needs {count} free GPU(s) of {devices or 'none visible'}, found {len(taken)}; busy: "
            f"{', '.join(busy) or 'none'} (locks in {lock_dir}). The Dagster `gpu` pool admits more GPU "
            "steps than there are GPUs: lower its limit (`dagster instance concurrency set gpu N`, "
            "automation.gpu_slots) or training.num_processes"
        )
    return GpuLease([d for d, _ in taken], [h for _, h in taken])
