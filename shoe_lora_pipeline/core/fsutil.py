"""File helpers shared by the stages: atomic writes, fsync, streaming hashes.

Every stage writes its outputs so that a crash leaves either the old file or the new one, never half a
file: write a temporary sibling, fsync it, then ``os.replace`` it into place.

A full disk (ENOSPC, EDQUOT; EIO, which is what some network and FUSE file systems report) is the one write
error every stage shares, so it is translated here, in one place: the helpers below remove their
temporary file or folder and raise :class:`DiskFullError`, which names the folder and its free space.
Writers outside the helpers (a checkpoint folder, an append) wrap themselves in :func:`disk_full_guard`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from PIL.Image import Image as PngImage

_CHUNK = 1 << 20

# The errors a full (or failing) disk raises at a write, fsync or rename.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


class DiskFullError(OSError):
    """A write failed because the disk (or the quota) is full: names the folder and its free space.

    An ``OSError`` with the original errno, so code that already handles ``OSError`` keeps working."""

    def __init__(self, folder: Path, free_bytes: int | None, cause: OSError) -> None:
        self.folder = Path(folder)
        self.free_bytes = free_bytes
        free = "unknown" if free_bytes is None else format_bytes(free_bytes)
        what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted"}.get(
            cause.errno or 0, "the disk reported an I/O error (full or failing)"
        )
        super().__init__(
            cause.errno,
            f"{what} writing in {self.folder} ({free} free): {cause.strerror or cause}; "
            "nothing half-written was kept, free some space and materialise again",
        )
        self.cause = cause

    def __reduce__(self) -> tuple[object, ...]:
        # Crosses process boundaries (a pool worker, Dagster's step process) with its own arguments.
        return (DiskFullError, (self.folder, self.free_bytes, self.cause))


def format_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'`` (for messages about space)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(folder: Path) -> int | None:
    """Free space for this user in ``folder`` (or its nearest existing parent); ``None`` if unknown."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextmanager
def disk_full_guard(folder: Path) -> Iterator[None]:
    """Re-raise a full-disk ``OSError`` from the block as :class:`DiskFullError` naming ``folder``. The block
    removes its own partial output (the helpers below do)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        code = exc.errno if isinstance(exc, OSError) else _rust_io_errno(exc)
        if code in DISK_FULL_ERRNOS:
            cause = exc if isinstance(exc, OSError) else OSError(code, os.strerror(code))
            raise DiskFullError(folder, free_bytes(folder), cause) from exc
        raise


def _rust_io_errno(exc: Exception) -> int | None:
    # safetensors (Rust) reports an I/O error as its own exception type, "... (os error 28)".
    match = re.search(r"\(os error (\d+)\)", str(exc))
    return int(match.group(1)) if match else None


def append_text(path: Path, text: str, fsync: bool = True) -> None:
    """Append ``text`` to ``path`` (created if missing), fsynced unless told not to; if the write fails (a
    full disk) the file is cut back to its previous length, so it never ends in a torn line."""
    path = Path(path)
    data = text.encode("utf-8")
    with disk_full_guard(path.parent):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            before = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:  # unbuffered: nothing is left to flush on close after a failure
                    view = view[os.write(fd, view) :]
                if fsync:
                    os.fsync(fd)
            except OSError:
                os.ftruncate(fd, before)
                raise
        finally:
            os.close(fd)


def file_sha256(path: Path | str) -> str:
    """sha256 hex digest of a file, streamed in 1 MiB chunks (photos and weights can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable; best effort (not supported on every platform)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``os.umask`` both sets and
    returns it, which would briefly change it for every other thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_mode(path: Path | str, is_dir: bool, umask: int | None = None) -> None:
    """Give a ``mkstemp`` file (created 0600), a ``mkdtemp`` folder (0700) or a file a library wrote 0600
    (safetensors >= 0.8 replaces its output with a 0600 file) the mode a plain ``open()`` / ``mkdir``
    would have: 0666 or 0777 less the umask, so the team and a web server can read the outputs."""
    mask = _current_umask() if umask is None else umask
    os.chmod(path, (0o777 if is_dir else 0o666) & ~mask)


def apply_umask_tree(root: Path) -> None:
    """:func:`apply_umask_mode` on ``root`` and everything in it (symlinks left alone)."""
    mask = _current_umask()
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            apply_umask_mode(p, p.is_dir(), mask)


@contextmanager
def _replaced_from_temporary(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` that the block fills; on a clean exit it is fsynced and
    ``os.replace``-d into place, on an error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        apply_umask_mode(tmp, is_dir=False)  # after the writer, which may have replaced the file
        fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_file(path: Path, write: Callable[[Path], object]) -> Path:
    """Let ``write(tmp)`` create a temporary sibling of ``path``, then sync and rename it into place
    (for writers that take a file name: safetensors, PIL, torch.save)."""
    with disk_full_guard(Path(path).parent), _replaced_from_temporary(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_save_png(path: Path, image: PngImage, **save_kwargs: Any) -> Path:
    """``image.save(path, format="PNG", **save_kwargs)`` through a temporary sibling (PIL infers no format
    from the temporary name, hence the explicit one)."""
    return atomic_write_file(path, lambda tmp: image.save(tmp, format="PNG", **save_kwargs))


@contextmanager
def atomic_writer(path: Path) -> Iterator[TextIO]:
    """A UTF-8 text handle on a temporary sibling of ``path``, synced and renamed into place on a clean
    exit. Lets big files be written in pieces (e.g. ``json.dump``) instead of as one string in memory."""
    with (
        disk_full_guard(Path(path).parent),
        _replaced_from_temporary(path) as tmp,
        open(tmp, "w", encoding="utf-8") as fh,
    ):
        yield fh


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a synced temporary sibling and ``os.replace``."""
    with atomic_writer(path) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: Path, data: Any, **dumps_kwargs: Any) -> Path:
    """``json.dumps(data, **dumps_kwargs) + "\\n"`` written atomically, streamed (no whole-file string)."""
    dumps_kwargs.setdefault("indent", 2)
    with atomic_writer(path) as fh:
        json.dump(data, fh, **dumps_kwargs)
        fh.write("\n")
    return Path(path)


@contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``out_dir`` only if the block succeeds; a full disk
    raises :class:`DiskFullError` after the temporary folder is removed."""
    with disk_full_guard(Path(out_dir).parent), _atomic_directory(out_dir) as tmp:
        yield tmp


@contextmanager
def _atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``out_dir`` only if the block succeeds; its files and
    folders get the umask's modes (:func:`apply_umask_mode`) whatever wrote them."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        apply_umask_tree(tmp)
        # Directories cannot be replaced in one rename: move the old one aside, then put it back on failure.
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if old is not None:
                os.replace(old / out_dir.name, out_dir)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
