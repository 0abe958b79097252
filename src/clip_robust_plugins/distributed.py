"""Data-parallel feature extraction under ``torchrun`` (torch.distributed).

``torchrun --nproc_per_node K --no-python clip_benchmark_robust eval ...`` starts K
copies of the CLI.  Each one loads the model, extracts features of its share of the
data (grouped shards are split across ranks, then across DataLoader workers), and the
shares are gathered on rank 0, which restores the single-process sample order, writes
the feature cache, fits the mitigations and writes the one results file.  The other
ranks stop after extraction.  Multi-node runs use the same command on every node with
torchrun's rendezvous flags (``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``).

Nothing here runs unless torchrun's environment (``WORLD_SIZE`` > 1) is present, so
single-process use never touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass
class DistContext:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    device: str
    owns_group: bool  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (in rank order) on rank 0; None elsewhere."""
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        torch_dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


_opened: list[DistContext] = []


def close_default() -> None:
    """Tear down the process group :func:`from_env` opened (no-op otherwise)."""
    while _opened:
        _opened.pop().close()


def from_env(device: str) -> DistContext | None:
    """The job context when launched by torchrun with WORLD_SIZE > 1, else None.

    Initialises the default process group (gloo on CPU, nccl on CUDA) unless the caller
    already did; on CUDA each rank uses ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    owns = False
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if on_cuda else "gloo")
        owns = True
    context = DistContext(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, device, owns)
    _opened.append(context)
    return context
