"""The training entry point with a fault injected, for the multi-process fault tests (run by the launcher as
``-m shoe_lora_pipeline_tests.support.faulty_train`` with the entry point's arguments).

``SHOE_LORA_TEST_FAULT`` (JSON) says what to do once ``checkpoint-<step>`` is published: rank 0 writes the
``marker`` file, then ``hang`` (until killed) or ``pause`` (until SIGINT reached it) while the other ranks
go on to the next step's collective and wait there for it, as they would behind a slow validation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from shoe_lora_pipeline import train
from shoe_lora_pipeline.core.distributed import Ranks
from shoe_lora_pipeline.core.training import loop as training  # where train_lora looks save_and_rotate up

FAULT = json.loads(os.environ["SHOE_LORA_TEST_FAULT"])
started: list[Ranks] = []
real_start, real_save = Ranks.start, training.save_and_rotate


def start(cpu: bool) -> Ranks:
    started.append(real_start(cpu))
    return started[-1]


def save_then_stall(accelerator: Any, root: Path, step: int, *args: Any, **kwargs: Any) -> Any:
    out = real_save(accelerator, root, step, *args, **kwargs)
    if step == FAULT["step"] and accelerator.is_main_process:
        Path(FAULT["marker"]).write_text(str(os.getpid()))
        while FAULT["kind"] == "hang" or not started[-1]._stop:
            time.sleep(0.05)
    return out


Ranks.start = staticmethod(start)  # type: ignore[method-assign]
training.save_and_rotate = save_then_stall

if __name__ == "__main__":
    sys.exit(train.main())
