"""A small real disk for the disk-full tests: a tmpfs mounted in a temporary folder (root only; the tests
that need it skip otherwise and inject ``OSError(ENOSPC)`` instead), and a filler that leaves it full."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER = ".filler"


@contextlib.contextmanager
def small_tmpfs(folder: Path, size_mib: int) -> Iterator[Path]:
    """``folder`` as a tmpfs of ``size_mib`` MiB for the block; skips the test where it cannot be mounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the injected-error variant covers this case)")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Take all free space of ``folder``'s file system but ``leave`` bytes, in one filler file."""
    path = folder / FILLER
    free = shutil.disk_usage(folder).free - leave
    with open(path, "ab") as fh:
        if free > 0:
            os.posix_fallocate(fh.fileno(), fh.tell(), free)
    return path


def enospc(*_: object, **__: object) -> None:
    """A stand-in writer that fails as a full disk does."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
