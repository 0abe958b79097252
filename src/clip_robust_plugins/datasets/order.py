"""The order key every reader puts before each sample of an ordered pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def order_key(major: int, minor: int) -> torch.Tensor:
    """The sort key :meth:`RobustDataset.ordered_samples` puts before each sample: sorting
    every part's items by it gives the order of ``samples``, whatever the worker count."""
    import torch

    return torch.tensor([major, minor], dtype=torch.int64)
