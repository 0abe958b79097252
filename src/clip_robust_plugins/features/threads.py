"""How an extraction pass shares the cores between the forward and the decoding workers.

The rule (why and the measurements: ``docs/performance.md``, "Thread budget"):

- DataLoader workers (decode + preprocess): an explicit ``num_workers`` is kept as given.
  Otherwise, on a CPU, 0 below 4 cores (decoding in series costs less than taking a core
  from the forward) and ``max(1, cores // 8)`` from 4 cores up (decoding is about a tenth of
  a ViT-S/B forward's CPU time); on CUDA, where the forward needs no CPU, ``cores - 1``
  (at most 16), keeping one core for the process that feeds the GPU.
- the forward's torch intra-op threads: ``cores - workers``, at least 1, so the two never
  oversubscribe the cores; set only for the pass and restored after it (:func:`torch_threads`),
  so a library user's own ``torch.set_num_threads`` is never changed behind their back.
- each worker's own torch threads: 1 (torch's DataLoader already does this in its workers;
  :func:`worker_init` says it explicitly so the budget holds whatever the torch version).
  Without workers, the main process decodes and preprocesses each batch with one thread too
  (:func:`fetched_with`) and runs the forward with the budget's: per-image tensors are too small
  to gain from threads, and on a busy machine every parallel op of the transform waits for a
  descheduled OpenMP thread (measured: 150 ms instead of 3 ms per image).

No torch import at module level: the CLI resolves ``--num_workers`` with :func:`thread_budget`
before anything heavy is loaded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

#: CPU cores from which the decoding gets worker processes instead of running in series
CPU_WORKERS_FROM_CORES = 4
#: CPU cores per decoding worker above that (decode is about 1/10 of the forward's CPU time)
CPU_CORES_PER_WORKER = 8
#: the most DataLoader workers the CUDA default starts
CUDA_MAX_WORKERS = 16


@dataclass(frozen=True)
class ThreadBudget:
    """How one extraction pass uses ``cores``: ``workers`` decoding processes and ``threads``
    torch intra-op threads for the forward in this process."""

    cores: int
    workers: int
    threads: int
    explicit_workers: bool

    def describe(self) -> dict[str, int | bool]:
        return {"cores": self.cores, "num_workers": self.workers, "torch_threads": self.threads,
                "explicit_num_workers": self.explicit_workers}


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers(cores: int, device: str) -> int:
    """DataLoader workers when the user gave no ``--num_workers`` (see the module docstring)."""
    if str(device).startswith("cuda"):
        return max(0, min(cores - 1, CUDA_MAX_WORKERS))
    if cores < CPU_WORKERS_FROM_CORES:
        return 0
    return max(1, cores // CPU_CORES_PER_WORKER)


def thread_budget(cores: int, device: str, num_workers: int | None = None) -> ThreadBudget:
    """The budget for ``cores`` on ``device``; ``num_workers`` (the user's) is kept when given."""
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"--num_workers must be >= 0, got {num_workers}")
    cores = max(1, int(cores))
    explicit = num_workers is not None
    workers = int(num_workers) if explicit else default_workers(cores, device)
    return ThreadBudget(cores=cores, workers=workers, threads=max(1, cores - workers), explicit_workers=explicit)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block, then the caller's setting again."""
    import torch

    saved = torch.get_num_threads()
    if n == saved:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def worker_init(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's signature
    """A decoding worker runs one torch thread (the forward has the other cores)."""
    import torch

    torch.set_num_threads(1)


def fetched_with(items: Iterable[T], threads: int) -> Iterator[T]:
    """``items``, each one produced with ``threads`` torch threads; the caller's own setting holds
    between them (so the loop body, e.g. the forward, runs with the caller's threads)."""
    iterator = iter(items)
    end = object()
    while True:
        with torch_threads(threads):
            item = next(iterator, end)
        if item is end:
            return
        yield item
