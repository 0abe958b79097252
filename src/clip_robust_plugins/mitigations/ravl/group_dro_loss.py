"""``clip_ft_group_dro``: GroupDRO (Sagawa et al., ICLR 2020) on the CLIP loss, with exponentiated
group weights as SubpopBench updates them (docs/methods/ravl.md, "Robust fine-tuning baselines")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss_per_sample(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """(B,) per-pair terms of the symmetric CLIP loss of ``losses.clip_loss``: pair i's image-to-text
    and text-to-image cross-entropies, halved; their mean is ``clip_loss`` (tested)."""
    logits = image @ text.T / tau
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    pos = same | torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    i2t = -(F.log_softmax(logits, dim=1) * pos).sum(1) / pos.sum(1)
    t2i = -(F.log_softmax(logits, dim=0) * pos).sum(0) / pos.sum(0)
    return 0.5 * (i2t + t2i)


class GroupDRO:
    """Online GroupDRO: per step, ``q_g <- q_g exp(eta L_g)`` (groups absent from the batch have
    ``L_g = 0``, so only their share changes through the normalisation), ``q <- q / sum q``, and
    the loss is ``sum_g q_g L_g`` with ``L_g`` the mean per-sample loss of group g in the batch."""

    def __init__(self, n_groups: int, eta: float, device: str | torch.device = "cpu"):
        self.eta = eta
        self.q = torch.full((n_groups,), 1.0 / n_groups, device=device)

    def group_losses(self, per_sample: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        n = len(self.q)
        sums = torch.zeros(n, device=per_sample.device, dtype=per_sample.dtype).index_add(0, groups, per_sample)
        counts = torch.bincount(groups, minlength=n).to(per_sample.dtype)
        return sums / counts.clamp_min(1)

    def loss(self, per_sample: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        losses = self.group_losses(per_sample, groups)
        with torch.no_grad():
            self.q = self.q * torch.exp(self.eta * losses.detach())
            self.q = self.q / self.q.sum()
        return (self.q * losses).sum()
