"""Holds a category folder lock in its own process until stdin closes (or it is killed):
``python -m shoe_lora_pipeline_tests.support.lock_holder FOLDER RUN_ID``; prints ``held`` once it holds."""

from __future__ import annotations

import sys

from shoe_lora_pipeline.core.category_lock import acquire

if __name__ == "__main__":
    acquire(sys.argv[1], sys.argv[2], timeout_s=float(sys.argv[3]) if len(sys.argv) > 3 else 0)
    print("held", flush=True)
    sys.stdin.read()
