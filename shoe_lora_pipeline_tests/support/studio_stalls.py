"""``shoe-lora studio`` whose next write of reviews.csv stops half-way, to be killed there:
``python -m shoe_lora_pipeline_tests.support.studio_stalls MARKER studio-args…``.

The temporary sibling holds the whole new text but is not yet renamed over reviews.csv when the process
writes MARKER (the temporary file's path) and waits; the test then kills it with SIGKILL."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from shoe_lora_pipeline.cli import main
from shoe_lora_pipeline.core import fsutil

_real_fsync = fsutil.fsync_file


def _stalling_fsync(path: Path) -> None:
    _real_fsync(path)
    if Path(path).name.startswith(".reviews.csv."):
        Path(sys.argv[1]).write_text(str(path), encoding="utf-8")
        while True:  # until killed
            time.sleep(1)


if __name__ == "__main__":
    fsutil.fsync_file = _stalling_fsync
    sys.exit(main(sys.argv[2:]))
