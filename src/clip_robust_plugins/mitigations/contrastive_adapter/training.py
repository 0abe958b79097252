"""Training of the contrastive adapter from cached features (see docs/methods/contrastive_adapter.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...accuracy import worst_group_accuracy
from ..base import Mitigation, RunContext
from .config import NAME, ContrastiveAdapterConfig

#: anchors per block when hard negatives are searched (memory O(CHUNK x pool))
CHUNK = 1024


class Adapter(torch.nn.Module):
    """``x + W2 relu(BN(W1 x))``; ``W2`` starts at zero, so epoch 0 is the frozen embedding."""

    def __init__(self, dim: int, hidden: int, generator: torch.Generator):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)
        bound = 1.0 / dim ** 0.5  # nn.Linear's default range, drawn from the run's generator
        with torch.no_grad():
            self.fc1.weight.copy_((torch.rand(hidden, dim, generator=generator) * 2 - 1) * bound)
            self.fc1.bias.copy_((torch.rand(hidden, generator=generator) * 2 - 1) * bound)
            self.fc2.weight.zero_()
            self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.bn(self.fc1(x))))


def hard_negatives(unit: torch.Tensor, y: np.ndarray, k: int, pool: int, rng: np.random.Generator) -> np.ndarray:
    """(N, k) per anchor the ``k`` most similar samples of other classes in a seeded pool (-1: fewer exist)."""
    n = len(unit)
    out = np.full((n, k), -1, dtype=np.int64)
    if k == 0:
        return out
    cand = np.sort(rng.choice(n, size=min(pool, n), replace=False))
    cand_t, cand_y = torch.from_numpy(cand), torch.from_numpy(y[cand])
    keep = min(k, len(cand))
    for start in range(0, n, CHUNK):
        sims = unit[start:start + CHUNK] @ unit[cand_t].T
        same = torch.from_numpy(y[start:start + CHUNK])[:, None] == cand_y[None, :]
        sims[same] = -torch.inf
        val, idx = sims.topk(keep, dim=1)
        picked = cand_t[idx].numpy()
        picked[~torch.isfinite(val).numpy()] = -1
        out[start:start + CHUNK, :keep] = picked
    return out


def sample_positives(y: np.ndarray, zs_pred: np.ndarray, p: int, rng: np.random.Generator) -> np.ndarray:
    """(N, p) same-class samples, drawn among those the zero-shot model predicts differently from the anchor
    (hard positives) when there are any, else among all of the class (-1: the class has one sample)."""
    n = len(y)
    out = np.full((n, p), -1, dtype=np.int64)
    if p == 0:
        return out
    for c in np.unique(y):
        for q in np.unique(zs_pred[y == c]):
            anchors = np.flatnonzero((y == c) & (zs_pred == q))
            cand = np.flatnonzero((y == c) & (zs_pred != q))
            if len(cand) == 0:
                cand = np.flatnonzero(y == c)
                if len(cand) < 2:
                    continue
            out[anchors] = cand[rng.integers(0, len(cand), size=(len(anchors), p))]
    return out


def contrastive_loss(adapter: Adapter, x: torch.Tensor, y: torch.Tensor, anchors: torch.Tensor,
                     pos: torch.Tensor, neg: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per anchor: positives are its class's text embedding and ``pos`` samples, negatives the other classes'
    text embeddings and ``neg`` samples (-1 entries masked); mean over positives of
    ``-log(exp(s_pos) / (exp(s_pos) + sum exp(s_neg)))`` on cosine similarities / temperature."""
    b, p, k = len(anchors), pos.shape[1], neg.shape[1]
    rows = torch.cat([anchors, pos.clamp(min=0).reshape(-1), neg.clamp(min=0).reshape(-1)])
    z = torch.nn.functional.normalize(adapter(x[rows]), dim=-1)
    za, zp, zn = z[:b], z[b:b + b * p].reshape(b, p, -1), z[b + b * p:].reshape(b, k, -1)
    s_text = za @ text.T / temperature  # (B, C)
    s_pos = torch.cat([s_text.gather(1, y[anchors][:, None]), (zp @ za[:, :, None]).squeeze(-1) / temperature], 1)
    pos_ok = torch.cat([torch.ones(b, 1, dtype=torch.bool), pos >= 0], 1)
    other = torch.ones_like(s_text, dtype=torch.bool).scatter_(1, y[anchors][:, None], False)
    s_neg = torch.cat([s_text.masked_fill(~other, -torch.inf),
                       ((zn @ za[:, :, None]).squeeze(-1) / temperature).masked_fill(neg < 0, -torch.inf)], 1)
    neg_lse = torch.logsumexp(s_neg, dim=1, keepdim=True)  # (B, 1)
    log_prob = s_pos - torch.logaddexp(s_pos, neg_lse.expand_as(s_pos))
    return -(log_prob * pos_ok).sum() / pos_ok.sum()


def adapter_logits(adapter: Adapter, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """``100 cos(adapter(x), class text embedding)`` in eval mode, in chunks."""
    adapter.eval()
    with torch.no_grad():
        return torch.cat([100.0 * torch.nn.functional.normalize(adapter(x[s:s + 8192]), dim=-1) @ head
                          for s in range(0, len(x), 8192)]) if len(x) else x.new_zeros(0, head.shape[1])


class ContrastiveAdapter(Mitigation):
    """The contrastive adapter, trained from cached image features (see the module docs)."""

    def __init__(self, config: ContrastiveAdapterConfig):
        self.config = config
        self.adapter: Adapter | None = None
        self.head: torch.Tensor | None = None
        self._info: dict[str, Any] = {}

    def check(self, ctx: RunContext) -> None:
        for split in ("train", "val"):
            if split not in ctx.dataset.splits():
                raise ValueError(f"{NAME}: dataset {ctx.dataset_name!r} has no {split!r} split")

    def fit(self, ctx: RunContext) -> None:
        cfg = self.config
        train, val = ctx.features("train"), ctx.features("val")
        x, y = train.features.float(), train.y.long()
        head = ctx.zeroshot_head().float().cpu()  # (D, C), unit columns: frozen class text embeddings
        text = torch.nn.functional.normalize(head.T, dim=-1)
        unit = torch.nn.functional.normalize(x, dim=-1)
        zs_pred = (unit @ head).argmax(1).numpy()
        rng = ctx.rng(NAME)
        negs = torch.from_numpy(hard_negatives(unit, y.numpy(), cfg.negatives, cfg.neighbour_pool, rng))
        gen = ctx.torch_generator(NAME)
        adapter = Adapter(x.shape[1], cfg.hidden, gen)
        opt = torch.optim.SGD(adapter.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        xv, yv, gv = val.features.float(), val.y.numpy(), val.group_ids().numpy()
        curve = [self._score(adapter, xv, yv, gv, head, 0, None)]
        best = (curve[0]["val_worst_group_acc"], 0, {k: v.clone() for k, v in adapter.state_dict().items()})
        for epoch in range(1, cfg.epochs + 1):
            pos = torch.from_numpy(sample_positives(y.numpy(), zs_pred, cfg.positives, rng))
            order = torch.randperm(len(x), generator=gen)
            adapter.train()
            total, steps = 0.0, 0
            for start in range(0, len(x), cfg.batch_size):
                a = order[start:start + cfg.batch_size]
                if len(a) < 2:  # BatchNorm needs two rows; a last single anchor waits for the next epoch
                    continue
                loss = contrastive_loss(adapter, x, y, a, pos[a], negs[a], text, cfg.temperature)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, steps = total + float(loss.detach()), steps + 1
            row = self._score(adapter, xv, yv, gv, head, epoch, total / max(steps, 1))
            curve.append(row)
            if row["val_worst_group_acc"] > best[0]:  # ties: the earlier epoch
                best = (row["val_worst_group_acc"], epoch, {k: v.clone() for k, v in adapter.state_dict().items()})
        adapter.load_state_dict(best[2])
        adapter.eval()
        self.adapter, self.head = adapter, head
        self._info = {"selection": {"criterion": "worst_group_acc", "split": "val", "epoch": best[1],
                                    "value": best[0]},
                      "curve": curve, "hard_negatives_found": int((negs >= 0).sum()),
                      "zero_shot_train_acc": float((zs_pred == y.numpy()).mean())}

    @staticmethod
    def _score(adapter, xv, yv, gv, head, epoch: int, loss: float | None) -> dict[str, Any]:
        pred = adapter_logits(adapter, xv, head).argmax(1).numpy()
        return {"epoch": epoch, "train_loss": None if loss is None else round(loss, 5),
                "val_acc": float((pred == yv).mean()), "val_worst_group_acc": worst_group_accuracy(pred, yv, gv)}

    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        if self.adapter is None:
            raise RuntimeError(f"{NAME}: predict() before fit()")
        return adapter_logits(self.adapter, ctx.features(split).features.float(), self.head)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        return {**state, "head": self.head}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "head" not in state or "adapter.fc1.weight" not in state:
            raise ValueError(f"{NAME}: state has keys {sorted(state)}, expected head and adapter.*")
        hidden, dim = state["adapter.fc1.weight"].shape
        adapter = Adapter(dim, hidden, torch.Generator().manual_seed(0))
        adapter.load_state_dict({k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")})
        adapter.eval()
        self.adapter, self.head = adapter, state["head"].float()

    def hyperparameters(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self.config), "optimizer": "SGD", "init": "second layer zero (epoch 0 = zero-shot)",
                **self._info}

    def plots(self):
        if not self._info.get("curve"):
            return {}
        return {"curve": curve_writer(self._info)}


def curve_writer(info: dict[str, Any]):
    """``writer(png_path)``: val accuracy and worst-group accuracy per epoch, the kept epoch marked."""
    curve, selection = [dict(r) for r in info["curve"]], dict(info["selection"])

    def write(path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        epochs = [r["epoch"] for r in curve]
        ax.plot(epochs, [r["val_worst_group_acc"] for r in curve], "-", label="val_worst_group_acc")
        ax.plot(epochs, [r["val_acc"] for r in curve], "--", label="val_acc")
        ax.axvline(selection["epoch"], color="k", lw=1, alpha=0.6)
        ax.set_xlabel("epoch (0: zero-shot)")
        ax.set_ylabel("val accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"contrastive adapter: epoch {selection['epoch']} kept (val worst-group "
                     f"{selection['value']:.3f})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100, format="png")
        plt.close(fig)

    return write
