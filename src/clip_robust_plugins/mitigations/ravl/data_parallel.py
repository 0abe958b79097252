"""Data-parallel fine-tuning of the image tower under ``torchrun`` (gloo on CPU, nccl on CUDA).

Every rank walks the same seeded stream of global batches (``--ravl_batch_size`` images); each
encodes its contiguous slice of a batch, the embeddings are all-gathered *with* gradients, every
rank computes the global-batch loss, and the gradients are all-reduced (averaged) before the
step, as DistributedDataParallel does.  The result equals one process with the same global
batch up to float summation order (tested).  See docs/methods/ravl.md ("Data-parallel").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int) -> tuple[int, int, int]:
        """(start, stop, largest slice) of this rank's contiguous slice of a batch of ``n``."""
        base, extra = divmod(n, self.world_size)
        sizes = [base + (r < extra) for r in range(self.world_size)]
        start = sum(sizes[:self.rank])
        return start, start + sizes[self.rank], max(sizes)

    def local(self, batch: Sequence) -> Sequence:
        start, stop, _ = self.bounds(len(batch))
        return batch[start:stop]

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The (n, ...) global batch from every rank's slice, differentiable (gradients reach the owner)."""
        from torch.distributed.nn.functional import all_gather

        _, _, largest = self.bounds(n)
        pad = largest - len(local)
        padded = torch.cat([local, local.new_zeros((pad, *local.shape[1:]))]) if pad else local
        parts = all_gather(padded.contiguous())
        sizes = [self.bounds_of(r, n) for r in range(self.world_size)]
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def bounds_of(self, rank: int, n: int) -> int:
        base, extra = divmod(n, self.world_size)
        return base + (rank < extra)

    def broadcast_parameters(self, params: Iterable[torch.Tensor]) -> None:
        """Rank 0's start weights on every rank (as DDP does at construction)."""
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """All-reduce the gradients in one flat buffer.  Every rank's loss is the whole batch's, and the
        gather's backward sums the copies, so each rank holds ``world_size`` x its share: the sum over
        ranks divided by ``world_size`` is the single-process gradient."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def current() -> DataParallel | None:
    """This process's place when torchrun started several ranks and the process group is up, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DataParallel(dist.get_rank(), dist.get_world_size())
