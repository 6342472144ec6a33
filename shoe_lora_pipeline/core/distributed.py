"""The training processes of one run: who is rank 0, how they agree, and how they all end together.

One process (the in-process asset, ``python -m shoe_lora_pipeline.train`` without a launcher) is rank 0 of
1 and every method here is a no-op. Under ``accelerate launch`` (torchrun) each process is one rank of the
``WORLD_SIZE`` the launcher set in the environment; :meth:`Ranks.start` joins the process group through
accelerate and keeps a small gloo group beside it for the control messages (the start decision, the
logged losses, a stop request), so they travel over the CPU whatever the training backend (gloo or NCCL)
and never force a GPU sync.

Ending together:

* SIGINT (a cancelled Dagster run: Pipes sends it to the launcher, which passes it to every rank) only
  sets a flag; the ranks compare their flags at the start of every optimizer step
  (:meth:`Ranks.stop_requested`) and all stop before the same step, after the last complete checkpoint.
  A second SIGINT stops at once.
* A rank that dies: torchrun sees it and terminates the others.
* A launcher that is killed (SIGKILL of the Dagster step process, of ``accelerate launch``): nothing runs
  in it any more, so each child asks the kernel to kill it when its parent dies (``core.lifetime.die_with_parent``).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def env_world_size() -> int:
    """The number of processes the launcher started (torchrun's ``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Ranks:
    """Rank, world size and the few collectives the training loop needs (all no-ops for one process)."""

    def __init__(self, rank: int = 0, world_size: int = 1, group: Any = None) -> None:
        self.rank, self.world_size, self._group = rank, world_size, group
        self._stop = False
        self._previous_handler: Any = None

    @classmethod
    def start(cls, cpu: bool) -> Ranks:
        """Join the launcher's process group (accelerate's ``PartialState``: gloo on the CPU, NCCL on CUDA,
        the device of the local rank) when ``WORLD_SIZE`` > 1; a single rank otherwise."""
        if env_world_size() <= 1:
            return cls()
        import torch.distributed as dist
        from accelerate import PartialState

        state = PartialState(cpu=cpu)
        group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        ranks = cls(state.process_index, state.num_processes, group)
        ranks._catch_sigint()
        return ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def _catch_sigint(self) -> None:
        def request_stop(signum: int, frame: Any) -> None:
            if self._stop:  # the second one: stop now
                raise KeyboardInterrupt
            self._stop = True

        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, request_stop)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (CPU, same shape everywhere) stacked in rank order: ``[world, *shape]``."""
        if not self.distributed:
            return tensor.unsqueeze(0)
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self._group)
        return torch.stack(parts)

    def stop_requested(self) -> bool:
        """Whether any rank got SIGINT; the same answer on every rank (one tiny CPU all-reduce)."""
        if not self.distributed:
            return self._stop
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self._stop else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def close(self) -> None:
        """Leave the process group (all ranks) and restore the SIGINT handler."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def on_main(ranks: Ranks, action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0 only (it may move folders); every rank gets its result."""
    return ranks.broadcast(action() if ranks.is_main else None)
