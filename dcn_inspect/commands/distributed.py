"""Running one analysis on several processes under ``torchrun``.

Launched by torchrun (``RANK`` and ``WORLD_SIZE`` set, world size > 1), :func:`join_world`
initialises the process group (gloo on CPU, nccl on CUDA, each rank on its local GPU) and
leaves it on exit if it created it. Work is sharded by dataset index (:meth:`World.shard`:
index ``i`` goes to rank ``i % world_size``), and :func:`World.gather` collects a picklable
payload of every rank, in rank order, on every rank (``all_gather_object``), which also serves
as a barrier. A single process is a world of size 1 where all of this is the identity.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import torch

from dcn_inspect.models.loading import resolve_device


@dataclass
class World:
    """This process's place among the ranks of a run."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the outputs."""
        return self.rank == 0

    def shard(self, count: int) -> List[int]:
        """This rank's dataset indices out of ``count``."""
        return [i for i in range(count) if i % self.size == self.rank]

    def gather(self, payload: Any) -> List[Any]:
        """Every rank's ``payload`` in rank order (a barrier as well)."""
        if not self.distributed:
            return [payload]
        import torch.distributed as dist

        gathered: List[Any] = [None] * self.size
        dist.all_gather_object(gathered, payload)
        return gathered

    def backend(self) -> Optional[str]:
        if not self.distributed:
            return None
        import torch.distributed as dist

        return str(dist.get_backend())


def launched_by_torchrun() -> bool:
    return (
        "RANK" in os.environ
        and "WORLD_SIZE" in os.environ
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
    )


@contextlib.contextmanager
def join_world(device: str) -> Iterator[Tuple[World, str]]:
    """The world this process belongs to and the device it should use; the process group is
    created here under torchrun and destroyed on exit."""
    if not launched_by_torchrun():
        yield World(), device
        return
    import torch.distributed as dist

    dev = resolve_device(device)
    if dev.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        created = True
    try:
        yield World(dist.get_rank(), dist.get_world_size()), device
    finally:
        if created:
            dist.destroy_process_group()
