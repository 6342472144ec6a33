"""Two ranks under ``accelerate launch`` meet in a collective; then rank 1 dies (for the fault tests).

Rank 0 goes on asking the collective of every training step (``Ranks.stop_requested``) and must not wait for
the dead peer for ever. No model is loaded: the launch costs only the processes' start.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from shoe_lora_pipeline.core.distributed import Ranks
from shoe_lora_pipeline.core.lifetime import die_with_parent

if __name__ == "__main__":
    die_with_parent()
    ranks = Ranks.start(cpu=True)
    ranks.barrier()
    if ranks.rank == 1:
        Path(sys.argv[1]).write_text(str(os.getpid()))
        os._exit(3)
    while True:
        ranks.stop_requested()
