"""The iterable torch datasets behind the readers' ordered passes (imported on first read,
so registering a dataset plugin imports no torch)."""

from __future__ import annotations

import torch

from .order import order_key


class EveryNth(torch.utils.data.IterableDataset):
    """An iterable dataset thinned to this rank's and this DataLoader worker's share."""

    def __init__(self, data: torch.utils.data.IterableDataset, rank: int, world_size: int):
        self.data = data
        self.rank = rank
        self.world_size = world_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        parts, part = self.world_size * workers, self.rank * workers + worker
        for index, item in enumerate(self.data):
            if index % parts == part:
                yield (order_key(0, index), *item)


class NoSamples(torch.utils.data.IterableDataset):
    """An empty share (more DataLoader workers or ranks than shards)."""

    def __iter__(self):
        return iter(())
