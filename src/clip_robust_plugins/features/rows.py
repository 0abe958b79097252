"""Growing row buffers for the extraction pass, so its memory stays flat in the number of images.

Keeping one small tensor per batch (features, fields, order keys) and concatenating at
the end made the pass's resident memory grow by about 65 KB per image on CPU (4,096
images: +270 MB, freed only when the pass ended): each small live block pins the heap
above the freed activations of its batch, so glibc's heap cannot reuse or trim them
(its dynamic mmap threshold has by then moved the activations onto the heap). One
buffer per kind, sized to the split's declared count (or doubled when a count is not
known), leaves no small blocks between batches (docs/performance.md, "Memory").
"""

from __future__ import annotations

import torch


class RowBuffer:
    """Rows appended batch by batch into one preallocated tensor; ``rows()`` is what was appended."""

    def __init__(self, capacity: int | None = None) -> None:
        self._capacity = max(int(capacity or 0), 0)
        self._data: torch.Tensor | None = None
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, values: torch.Tensor) -> None:
        """Copy ``values`` (rows along dim 0; same trailing shape and dtype every call) in."""
        needed = self._n + values.shape[0]
        if self._data is None:
            self._data = torch.empty((max(self._capacity, needed), *values.shape[1:]), dtype=values.dtype)
        elif values.shape[1:] != self._data.shape[1:] or values.dtype != self._data.dtype:
            raise ValueError(f"row buffer: rows of shape {tuple(values.shape[1:])} {values.dtype} after "
                             f"{tuple(self._data.shape[1:])} {self._data.dtype}")
        elif needed > self._data.shape[0]:
            grown = torch.empty((max(needed, 2 * self._data.shape[0]), *self._data.shape[1:]), dtype=self._data.dtype)
            grown[: self._n] = self._data[: self._n]
            self._data = grown
        self._data[self._n:needed] = values
        self._n = needed

    def rows(self) -> torch.Tensor:
        """The appended rows; the buffer itself when it is full (no copy)."""
        if self._data is None:
            raise ValueError("row buffer: no rows were appended")
        if self._n == self._data.shape[0]:
            return self._data
        return self._data[: self._n].clone()  # fewer rows than the declared count: do not keep the slack
