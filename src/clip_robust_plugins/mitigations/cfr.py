"""CFR: contrastive feature recalibration of CLIP's image projection, without group labels in training.

You, Min, Dai, Sekhon, Staib & Duncan, "Calibrating Multi-modal Representations: A
Pursuit of Group Robustness without Annotations", CVPR 2024 (arXiv 2403.07241).

What is trained, and on what
----------------------------
Both CLIP encoders stay frozen; the classifier is the zero-shot text head
(``ctx.zeroshot_head()``, (D, C)) and never changes.  The trainable part is the image
*projection head*, initialised from the model, which maps cached pre-projection
features (feature kind ``"preproj"``, see :func:`clip_robust_plugins.features.preproj_features`)
to the embedding space:

- ``vit_proj`` (open_clip ``VisionTransformer``): ``visual.proj``, ``e = h @ proj``;
- ``attnpool`` (open_clip ``ModifiedResNet``): ``visual.attnpool`` on the layer4 map;
- ``adapter`` (any other tower): a residual linear adapter ``e = x + W x + b`` on the
  image embedding, initialised to the identity (``W = 0``, ``b = 0``).

Logits are ``100 * normalize(head(h)) @ text_head`` (clip_benchmark's logit scale),
so training needs only the cached features of ``train`` and ``val``: no image is read
again and no gradient goes through a tower.

Protocol (and where it comes from)
----------------------------------
The authors' code (a WILDS-based fork of "CLIP-spurious-finetune"; the search tools
here show its files without naming the repository) was read for these facts:

1. **CLIP+ERM** (their ``ERM_freeze-language_freeze-vision_train-projection_lr_1e-04_wd_1e-05_batchsize_128``
   checkpoint): the head trained with cross-entropy on the whole train split; AdamW,
   ``lr 1e-4``, ``weight_decay 1e-5``, batch 128.  We train it for a fixed number of
   epochs (``--cfr_erm_epochs``); the authors kept WILDS' best-val checkpoint, which
   would bring group labels into the calibration set, so we do not.
2. **Calibration set** (their generation script: ``all_wrong_predict_idxes``): the
   train samples CLIP+ERM misclassifies.  **Positives** (``correct_predict_embeddings``):
   train samples CLIP+ERM classifies correctly, of the anchor's class; 16 per anchor,
   redrawn at random for every batch (their ``__getitem__`` draws ``randperm[:16]``).
3. **Hard negatives** (their ``negative_embeddings``): for each calibration sample, the
   16 train samples *of other classes* most cosine-similar to it in the frozen
   **pre-projection** space (they hook ``layer4`` of the ERM model, whose backbone is
   frozen, so it is the base CLIP's pre-projection space), computed once.
   ``--cfr_negative_space erm`` uses the CLIP+ERM embedding space instead.
   *Deviation:* the authors' ``__getitem__`` computes these hard negatives and then
   overwrites them with 16 random samples **of the anchor's own class**
   (``all_class_embeddings[contra_y]``), which contradicts the paper and makes the
   "negatives" positives; that looks like a bug, and we implement the intended hard
   negatives from other classes.
4. **Recalibration**: each batch pairs ``B`` shuffled train samples with ``B`` anchors
   cycled from the calibration set (their ``idx % len(calibration set)``; we reshuffle
   the calibration order every epoch and walk it cyclically).  Stage 3 starts from the
   model's own head, not from CLIP+ERM (their CFR algorithm initialises a fresh CLIP;
   CLIP+ERM only builds the sets).  Loss, per batch (their ``objective``)::

       c(e) * CE(anchors) + c(e) * InfoNCE(anchor; positives, negatives) + SupCon(train batch)
       c(e) = 1 + 0.5 * cos(2 * pi * e / E),  e = 0 .. E-1

   - CE on the anchors only, with the zero-shot text head (their ``labeled_loss``);
   - InfoNCE: for every positive ``p_j`` of an anchor ``a``, cross-entropy of
     ``[a.p_j, a.n_1 .. a.n_16] / tau`` towards ``p_j``, averaged (their ``contra_loss``,
     cosine similarities, ``tau = 1``);
   - SupCon: supervised contrastive loss (Khosla et al. 2020) over the normalised
     embeddings of the batch's train samples, temperature 0.07.  *Simplification:*
     the authors use "targeted supervised contrastive" (``TSC``: a MoCo-style queue of
     1,280 keys plus fixed class targets, ``T = 0.07``, target weight 0.2); we use the
     plain in-batch form, which needs no queue or precomputed targets.
   - AdamW, ``lr 1e-4``, ``weight_decay 1e-5``, batch 128, 100 epochs (their run script);
     their feature dropout 0.1 is not used.  Training runs in float32.
5. **Model selection** on ``val``: after every epoch the head is scored and the best
   epoch (earliest on ties) is kept.  ``--cfr_selection worst_group`` (default, the
   paper's protocol) uses val **group labels**: this is the only place they enter.
   ``--cfr_selection class_balanced`` uses the mean per-class recall instead, a fully
   annotation-free run.  ``Needs.labels`` declares the superset ``{class, group}``;
   ``hyperparameters()["labels_used"]`` records what a run actually read.

Randomness comes only from ``ctx.torch_generator`` (salted per stage), never from the
global RNG, so a seed reproduces a fit exactly on the CPU.

The fitted state is the head's tensors (``head.*``) and ``head_type`` (index into
:data:`~clip_robust_plugins.features.HEAD_TYPES`).  :meth:`CFR.as_open_clip` puts the
head into a copy of the model, and the model loader ``cfr``
(``--model_type cfr --model BASE --pretrained STATE.safetensors``) rebuilds that model
from a state file written by ``--save_mitigation_state``, so every clip_benchmark task
runs on it.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..argtypes import at_least, config_from_options, positive_float
from ..features import (
    HEAD_ADAPTER,
    HEAD_ATTNPOOL,
    HEAD_TYPES,
    HEAD_VIT_PROJ,
    attnpool_input_shape,
    projection_head_type,
)
from ..hookspecs import hookimpl
from ..records import MitigationSpec, ModelLoaderSpec, Needs
from ..states import StateError, load_base_model
from .adapted import AdaptedCLIP
from .base import Mitigation, RunContext

NAME = "cfr"
FEATURE_KIND = "preproj"
#: clip_benchmark's logit scale (``100. * image_features @ classifier``)
LOGIT_SCALE = 100.0
SELECTIONS = ("worst_group", "class_balanced")
NEGATIVE_SPACES = ("preproj", "erm")
CITATION = (
    "You, Min, Dai, Sekhon, Staib & Duncan, Calibrating Multi-modal Representations: "
    "A Pursuit of Group Robustness without Annotations, CVPR 2024"
)
_CHUNK = 4096  # rows per forward when scoring a whole split


@dataclass(frozen=True)
class CFRConfig:
    """Settings of one CFR fit (defaults: the authors' run script, see the module docstring)."""

    epochs: int = 100
    erm_epochs: int = 20
    lr: float = 1e-4
    weight_decay: float = 1e-5
    batch_size: int = 128
    n_positives: int = 16
    n_negatives: int = 16
    tau: float = 1.0
    supcon_tau: float = 0.07
    selection: str = "worst_group"
    negative_space: str = "preproj"

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"cfr: selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.negative_space not in NEGATIVE_SPACES:
            raise ValueError(f"cfr: negative space must be one of {NEGATIVE_SPACES}, got {self.negative_space!r}")
        for name in ("epochs", "batch_size", "n_positives", "n_negatives"):
            if getattr(self, name) < 1:
                raise ValueError(f"cfr: {name} must be at least 1, got {getattr(self, name)}")
        if self.erm_epochs < 0:
            raise ValueError(f"cfr: erm_epochs must be >= 0, got {self.erm_epochs}")
        if self.tau <= 0 or self.supcon_tau <= 0:
            raise ValueError("cfr: temperatures must be positive")


# --------------------------------------------------------------------------- heads


class VitProjHead(torch.nn.Module):
    """``visual.proj`` of an open_clip ViT: ``e = h @ proj``."""

    def __init__(self, proj: torch.Tensor):
        super().__init__()
        self.proj = torch.nn.Parameter(proj.detach().clone().float())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.proj


class AttnPoolHead(torch.nn.Module):
    """``visual.attnpool`` of an open_clip ModifiedResNet on the flattened layer4 map."""

    def __init__(self, attnpool: torch.nn.Module):
        super().__init__()
        self.attnpool = copy.deepcopy(attnpool).float()
        self.shape = attnpool_input_shape(attnpool)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attnpool(h.reshape(-1, *self.shape))


class ResidualAdapter(torch.nn.Module):
    """``e = x + W x + b`` on the image embedding, the identity at initialisation."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(dim, dim)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


def embed_dim(model: torch.nn.Module) -> int:
    """The width of ``model.encode_image``'s output (from the text head or the tower)."""
    visual = getattr(model, "visual", None)
    for attr in ("output_dim", "embed_dim"):
        if isinstance(getattr(visual, attr, None), int):
            return getattr(visual, attr)
    text_projection = getattr(model, "text_projection", None)
    if isinstance(text_projection, torch.Tensor):
        return text_projection.shape[-1]
    raise ValueError("cfr: cannot tell the image embedding width of this model")


def init_head(model: torch.nn.Module, dim: int | None = None) -> torch.nn.Module:
    """The trainable head of ``model``, initialised from it (see :func:`projection_head_type`)."""
    kind = projection_head_type(model)
    if kind == HEAD_VIT_PROJ:
        return VitProjHead(model.visual.proj)
    if kind == HEAD_ATTNPOOL:
        return AttnPoolHead(model.visual.attnpool)
    return ResidualAdapter(dim if dim is not None else embed_dim(model))


def apply_head(model: torch.nn.Module, head_type: str, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Put a fitted head into ``model`` (in place for ViT/ResNet); returns the open_clip-compatible model.

    ``tensors`` are the head's own state (``proj``; ``attnpool.*``; ``linear.*``).  For
    ``adapter`` heads the result is an :class:`~clip_robust_plugins.mitigations.base.AdaptedCLIP`
    around ``model``.  ``encode_text`` and ``logit_scale`` are never touched.
    """
    actual = projection_head_type(model)
    if actual != head_type:
        raise StateError(f"cfr: the state holds a {head_type!r} head, but this model's image head is {actual!r}")
    if head_type == HEAD_VIT_PROJ:
        proj = model.visual.proj
        if tuple(proj.shape) != tuple(tensors["proj"].shape):
            raise StateError(f"cfr: projection of shape {tuple(tensors['proj'].shape)} for a model with {tuple(proj.shape)}")
        with torch.no_grad():
            proj.copy_(tensors["proj"])
        return model
    if head_type == HEAD_ATTNPOOL:
        prefix = "attnpool."
        model.visual.attnpool.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        return model
    weight = tensors["linear.weight"]
    adapter = ResidualAdapter(weight.shape[0])
    adapter.load_state_dict(tensors)
    device = next(model.parameters()).device
    return AdaptedCLIP(model, adapter.to(device)).eval()


# --------------------------------------------------------------------------- protocol pieces


def cosine_weight(epoch: int, epochs: int) -> float:
    """The authors' loss weight ``c(e) = 1 + 0.5 * cos(2 pi e / E)`` (epochs counted from 0)."""
    return 1.0 + 0.5 * math.cos(2.0 * math.pi * epoch / epochs)


def class_logits(head: torch.nn.Module, h: torch.Tensor, text_head: torch.Tensor) -> torch.Tensor:
    """``100 * normalize(head(h)) @ text_head``."""
    return LOGIT_SCALE * F.normalize(head(h), dim=-1) @ text_head


@torch.no_grad()
def embed_all(head: torch.nn.Module, h: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
    """Normalised embeddings of many rows, in chunks."""
    return torch.cat([F.normalize(head(h[i:i + chunk]), dim=-1) for i in range(0, len(h), chunk)])


def calibration_split(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices CLIP+ERM gets wrong: the calibration set, indices it gets right: the positive pool)."""
    wrong = pred != y
    return wrong.nonzero().flatten(), (~wrong).nonzero().flatten()


def hard_negatives(space: torch.Tensor, y: torch.Tensor, anchors: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """For each anchor, the ``k`` most cosine-similar rows of ``space`` whose class differs.

    Returns (len(anchors), min(k, n_other)) indices into ``space``, most similar first.
    ``k`` shrinks to the smallest number of other-class samples any anchor has.
    """
    if len(anchors) == 0:
        return torch.zeros(0, 0, dtype=torch.long)
    unit = F.normalize(space.float(), dim=-1)
    per_class = torch.bincount(y)
    k = min(k, int((len(y) - per_class[y[anchors]]).min()))
    out = []
    for i in range(0, len(anchors), chunk):
        idx = anchors[i:i + chunk]
        sim = unit[idx] @ unit.T
        sim[y.unsqueeze(0) == y[idx].unsqueeze(1)] = -float("inf")  # same class (self included) is never a negative
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out).cpu()


def sample_positives(
    anchor_y: torch.Tensor, pool: torch.Tensor, y: torch.Tensor, k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` correctly classified same-class samples per anchor, drawn afresh.

    Without replacement where the class has at least ``k`` of them, with replacement
    otherwise.  Returns (indices (B, k), valid (B,)): an anchor whose class has no
    correctly classified sample gets no positives (``valid`` False).
    """
    out = torch.zeros(len(anchor_y), k, dtype=torch.long)
    valid = torch.zeros(len(anchor_y), dtype=torch.bool)
    pool_y = y[pool]
    for c in torch.unique(anchor_y).tolist():
        rows = (anchor_y == c).nonzero().flatten()
        members = pool[pool_y == c]
        if len(members) == 0:
            continue
        if len(members) >= k:
            pick = torch.rand(len(rows), len(members), generator=generator).argsort(dim=1)[:, :k]
        else:
            pick = torch.randint(len(members), (len(rows), k), generator=generator)
        out[rows] = members[pick]
        valid[rows] = True
    return out, valid


def info_nce(anchor: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over anchors and positives of CE([a.p_j, a.n_1..a.n_K] / tau, 0); inputs normalised.

    ``anchor`` (B, D), ``positives`` (B, P, D), ``negatives`` (B, K, D).
    """
    pos = torch.einsum("bd,bpd->bp", anchor, positives) / tau
    neg = torch.einsum("bd,bkd->bk", anchor, negatives) / tau
    logits = torch.cat([pos.unsqueeze(-1), neg.unsqueeze(1).expand(-1, pos.shape[1], -1)], dim=-1)
    return (torch.logsumexp(logits, dim=-1) - pos).mean()


def supcon(z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) over one batch of normalised ``z``."""
    n = len(z)
    sim = z @ z.T / tau
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, -float("inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (y.unsqueeze(0) == y.unsqueeze(1)) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not has.any():
        return z.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~pos, 0.0)).sum(1)[has] / n_pos[has]
    return per_anchor.mean()


def worst_group_accuracy(pred: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Minimum accuracy over the non-empty groups."""
    return float(min((pred[groups == g] == y[groups == g]).mean() for g in np.unique(groups)))


def class_balanced_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean per-class recall over the classes present (no group labels)."""
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


# --------------------------------------------------------------------------- the mitigation


class CFR(Mitigation):
    """CLIP+ERM, calibration set, contrastive recalibration of the projection head; see the module docstring."""

    def __init__(self, config: CFRConfig | None = None, model_type: str = "open_clip"):
        self.config = config or CFRConfig()
        #: the base model's ``--model_type``, recorded so the ``cfr`` loader can rebuild it
        self.model_type = model_type
        self.head_type: str | None = None
        self.head_state: dict[str, torch.Tensor] | None = None  # the selected head's tensors (CPU, float32)
        self._head: torch.nn.Module | None = None
        self._info: dict[str, Any] = {}
        #: after fit (not saved): the CLIP+ERM head's tensors and the calibration set (train row indices)
        self.erm_state: dict[str, torch.Tensor] | None = None
        self.calibration_indices: torch.Tensor | None = None

    # ---- fitting

    def fit(self, ctx: RunContext) -> None:
        cfg = self.config
        t_start = time.perf_counter()
        device = torch.device(ctx.device)
        train = ctx.features("train", FEATURE_KIND)
        val = ctx.features("val", FEATURE_KIND)
        x = train.features.float().to(device)
        y = train.y.to(device)  # class labels only: the group fields of train are never read
        x_val = val.features.float().to(device)
        y_val = val.y.numpy()
        # the one use of group labels: model selection on val (none with class_balanced selection)
        g_val = val.group_ids().numpy() if cfg.selection == "worst_group" else None
        text = ctx.zeroshot_head().float().to(device)
        self.head_type = projection_head_type(ctx.model)
        init = init_head(ctx.model, dim=x.shape[1]).to(device)

        # Stage 1: CLIP+ERM (cross-entropy on the whole train split)
        erm = copy.deepcopy(init).train()
        gen = ctx.torch_generator(f"{NAME}/erm")
        opt = torch.optim.AdamW(erm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        erm_losses = []
        for _ in range(cfg.erm_epochs):
            order = torch.randperm(len(x), generator=gen).to(device)
            total = 0.0
            for s in range(0, len(x), cfg.batch_size):
                b = order[s:s + cfg.batch_size]
                loss = F.cross_entropy(class_logits(erm, x[b], text), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
            erm_losses.append(total / len(x))
        erm.eval()
        t_erm = time.perf_counter()

        # Stage 2: calibration set = what CLIP+ERM gets wrong; positive pool = what it gets right
        erm_embed = embed_all(erm, x)
        erm_pred = (LOGIT_SCALE * erm_embed @ text).argmax(1)
        cal, correct = calibration_split(erm_pred.cpu(), y.cpu())
        space = x if cfg.negative_space == "preproj" else erm_embed
        negatives = hard_negatives(space, y, cal.to(device), cfg.n_negatives)
        erm_val_score = self._val_score(erm, x_val, y_val, g_val, text)
        del erm_embed, space
        if len(cal) == 0:
            warnings.warn("cfr: CLIP+ERM classifies every training sample correctly; the calibration set is empty, "
                          "so only the supervised contrastive term trains the head", stacklevel=2)
        t_cal = time.perf_counter()

        # Stage 3: contrastive recalibration, starting from the model's own head
        head = copy.deepcopy(init).train()
        gen = ctx.torch_generator(f"{NAME}/recalibrate")
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        y_cpu = y.cpu()
        cal_y = y_cpu[cal]
        use_nce = len(cal) > 0 and negatives.shape[1] > 0
        val_scores: list[float] = []
        losses: list[dict[str, float]] = []
        best_score, best_epoch, best_state = -1.0, -1, None
        cursor = 0
        cal_order = cal[torch.randperm(len(cal), generator=gen)] if len(cal) else cal
        epochs = tqdm(range(cfg.epochs), desc="cfr", unit="epoch", disable=not ctx.progress, leave=False)
        for epoch in epochs:
            c = cosine_weight(epoch, cfg.epochs)
            order = torch.randperm(len(x), generator=gen)
            sums = {"ce": 0.0, "nce": 0.0, "supcon": 0.0, "steps": 0}
            for s in range(0, len(x), cfg.batch_size):
                b = order[s:s + cfg.batch_size]
                loss = supcon(F.normalize(head(x[b.to(device)]), dim=-1), y[b.to(device)], cfg.supcon_tau)
                sums["supcon"] += loss.item()
                if len(cal):
                    # anchors cycled from the calibration set (reshuffled each time it wraps around)
                    picks = []
                    need = len(b)
                    while need:
                        if cursor == len(cal_order):
                            cal_order, cursor = cal[torch.randperm(len(cal), generator=gen)], 0
                        take = min(need, len(cal_order) - cursor)
                        picks.append(cal_order[cursor:cursor + take])
                        cursor += take
                        need -= take
                    anchors = torch.cat(picks)
                    a_emb = F.normalize(head(x[anchors.to(device)]), dim=-1)
                    ce = F.cross_entropy(LOGIT_SCALE * a_emb @ text, y[anchors.to(device)])
                    loss = loss + c * ce
                    sums["ce"] += ce.item()
                    if use_nce:
                        pos_idx, valid = sample_positives(y_cpu[anchors], correct, y_cpu, cfg.n_positives, gen)
                        if valid.any():
                            rows = torch.searchsorted(cal, anchors)  # position of each anchor in ``cal`` (sorted)
                            neg_idx = negatives[rows][valid]
                            pos_idx = pos_idx[valid]
                            n_b, n_p, n_n = len(pos_idx), pos_idx.shape[1], neg_idx.shape[1]
                            p_emb = F.normalize(head(x[pos_idx.flatten().to(device)]), dim=-1).reshape(n_b, n_p, -1)
                            n_emb = F.normalize(head(x[neg_idx.flatten().to(device)]), dim=-1).reshape(n_b, n_n, -1)
                            nce = info_nce(a_emb[valid.to(device)], p_emb, n_emb, cfg.tau)
                            loss = loss + c * nce
                            sums["nce"] += nce.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums["steps"] += 1
            head.eval()
            score = self._val_score(head, x_val, y_val, g_val, text)
            head.train()
            val_scores.append(score)
            steps = max(sums.pop("steps"), 1)
            losses.append({k: round(v / steps, 6) for k, v in sums.items()})
            if score > best_score:
                best_score, best_epoch = score, epoch
                best_state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
        t_end = time.perf_counter()

        self.head_state = best_state
        self._head = None
        self.erm_state = {k: v.detach().cpu().clone() for k, v in erm.state_dict().items()}
        self.calibration_indices = cal
        per_class = torch.bincount(cal_y, minlength=ctx.n_classes).tolist()
        self._info = {
            "head_type": self.head_type,
            "labels_used": ["class", "group"] if cfg.selection == "worst_group" else ["class"],
            "group_labels_used_for": (
                "model selection on val (worst-group accuracy)" if cfg.selection == "worst_group" else "nothing"
            ),
            "selected_epoch": best_epoch,
            "selection_metric": "val_worst_group_acc" if cfg.selection == "worst_group" else "val_class_balanced_acc",
            "selected_val_score": best_score,
            "val_scores": val_scores,
            "erm_val_score": erm_val_score,
            "erm_train_acc": float((erm_pred.cpu() == y_cpu).float().mean()),
            "erm_losses": [round(v, 6) for v in erm_losses],
            "losses": losses,
            "calibration_set_size": len(cal),
            "calibration_set_per_class": per_class,
            "positive_pool_size": len(correct),
            "n_negatives_used": int(negatives.shape[1]) if len(cal) else 0,
            "n_train": len(x),
            "n_val": len(x_val),
            "preproj_dim": int(x.shape[1]),
            "stage3_init": "model's own head (the authors' CFR starts from CLIP, not CLIP+ERM)",
            "negatives": f"hard negatives: top-{cfg.n_negatives} other-class train samples by cosine similarity "
                         f"in the {'frozen pre-projection' if cfg.negative_space == 'preproj' else 'CLIP+ERM embedding'} space",
            "seconds": {
                "erm": round(t_erm - t_start, 3),
                "calibration": round(t_cal - t_erm, 3),
                "recalibration": round(t_end - t_cal, 3),
            },
        }

    @torch.no_grad()
    def _val_score(self, head, x_val, y_val, g_val, text) -> float:
        pred = (LOGIT_SCALE * embed_all(head, x_val) @ text).argmax(1).cpu().numpy()
        if g_val is None:
            return class_balanced_accuracy(pred, y_val)
        return worst_group_accuracy(pred, y_val, g_val)

    # ---- using the fitted head

    def _fitted_head(self, ctx: RunContext) -> torch.nn.Module:
        if self.head_state is None:
            raise RuntimeError("cfr: predict() before fit() or load_state_dict()")
        if self._head is None:
            kind = projection_head_type(ctx.model)
            if kind != self.head_type:
                raise StateError(f"cfr: the state holds a {self.head_type!r} head, but this model's image head is {kind!r}")
            dim = self.head_state["linear.weight"].shape[0] if kind == HEAD_ADAPTER else None
            head = init_head(ctx.model, dim=dim)
            head.load_state_dict(self.head_state)
            self._head = head.to(ctx.device).eval()
        return self._head

    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        head = self._fitted_head(ctx)
        h = ctx.features(split, FEATURE_KIND).features.float().to(ctx.device)
        return ctx.zeroshot_logits(embed_all(head, h))

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.head_state is None:
            return {}
        state = {f"head.{k}": v for k, v in self.head_state.items()}
        state["head_type"] = torch.tensor([HEAD_TYPES.index(self.head_type)], dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "head_type" not in state:
            raise StateError(f"cfr: not a CFR state (keys {sorted(state)})")
        code = int(state["head_type"].flatten()[0])
        if not 0 <= code < len(HEAD_TYPES):
            raise StateError(f"cfr: unknown head type code {code}")
        self.head_type = HEAD_TYPES[code]
        self.head_state = {k[len("head."):]: v.float() for k, v in state.items() if k.startswith("head.")}
        self._head = None
        self._info = {"head_type": self.head_type, "loaded_from_state": True}

    def hyperparameters(self) -> dict[str, Any]:
        return {"method": "CFR (You et al., CVPR 2024)", "model_type": self.model_type, **asdict(self.config), **self._info}

    def as_open_clip(self, ctx: RunContext) -> torch.nn.Module:
        """A deep copy of ``ctx.model`` whose ``encode_image`` uses the fitted head."""
        if self.head_state is None:
            raise RuntimeError("cfr: as_open_clip() before fit() or load_state_dict()")
        return apply_head(copy.deepcopy(ctx.model), self.head_type, self.head_state)


# --------------------------------------------------------------------------- model loader


def load_cfr_model(model_name: str, pretrained: str, cache_dir: str | None = None, device: str | torch.device = "cpu", *,
                   registry=None):
    """``--model_type cfr --model BASE --pretrained STATE``: the base model with the fitted CFR head.

    ``STATE`` is a ``<output>_state_cfr.safetensors`` file; its metadata names the base
    model and checkpoint (``model``, ``pretrained``), which are loaded through
    :func:`clip_robust_plugins.models.load_open_clip` (or, when the fit recorded another
    ``--model_type``, through that registered loader).  Returns ``(model, transform, tokenizer)``.
    """
    state, model, transform, tokenizer = load_base_model(pretrained, NAME, model_name, cache_dir, device, registry)
    cfr = CFR()
    cfr.load_state_dict(state.tensors)
    model = apply_head(model, cfr.head_type, cfr.head_state)
    return model.to(device).eval(), transform, tokenizer


# --------------------------------------------------------------------------- registration


def _create(options: argparse.Namespace) -> CFR:
    return CFR(
        config_from_options(CFRConfig, "cfr_", options),
        model_type=getattr(options, "model_type", None) or "open_clip",
    )


@hookimpl
def add_arguments(parser):
    d = CFRConfig()
    parser.add_argument("--cfr_epochs", type=at_least(1), default=d.epochs,
                        help=f"cfr: contrastive recalibration epochs, one val check each (default {d.epochs}, the authors')")
    parser.add_argument("--cfr_erm_epochs", type=at_least(0), default=d.erm_epochs,
                        help=f"cfr: CLIP+ERM epochs that build the calibration set (default {d.erm_epochs})")
    parser.add_argument("--cfr_lr", type=positive_float, default=d.lr, help=f"cfr: AdamW learning rate, both stages (default {d.lr:g})")
    parser.add_argument("--cfr_weight_decay", type=float, default=d.weight_decay,
                        help=f"cfr: AdamW weight decay (default {d.weight_decay:g})")
    parser.add_argument("--cfr_batch_size", type=at_least(2), default=d.batch_size,
                        help=f"cfr: train samples (and calibration anchors) per step (default {d.batch_size})")
    parser.add_argument("--cfr_selection", choices=SELECTIONS, default=d.selection,
                        help="cfr: per-epoch model selection on val: worst_group (uses val group labels, the paper's "
                             "protocol) or class_balanced (mean per-class recall, no group labels at all)")
    parser.add_argument("--cfr_negative_space", choices=NEGATIVE_SPACES, default=d.negative_space,
                        help="cfr: space in which hard negatives are the most similar other-class samples: the frozen "
                             "pre-projection features (default, the authors') or the CLIP+ERM embeddings")
    parser.add_argument("--cfr_tau", type=positive_float, default=d.tau,
                        help=f"cfr: InfoNCE temperature on cosine similarities (default {d.tau:g}, the authors')")
    parser.add_argument("--cfr_supcon_tau", type=positive_float, default=d.supcon_tau,
                        help=f"cfr: supervised contrastive temperature (default {d.supcon_tau:g})")


@hookimpl
def register_mitigations(register):
    register(
        MitigationSpec(
            name=NAME,
            create=_create,
            # group labels: only val's, only for model selection (none with --cfr_selection class_balanced)
            needs=Needs(fit_splits=("train", "val"), labels=frozenset({"class", "group"}), feature_kinds=(FEATURE_KIND,)),
            description="CFR: recalibrate CLIP's image projection contrastively on ERM-misclassified train samples "
                        "(class labels; val group labels only for model selection)",
            citation=CITATION,
        )
    )


@hookimpl
def register_model_loaders(register):
    register(
        ModelLoaderSpec(
            NAME, load_cfr_model,
            "a base open_clip model with a fitted CFR head: --model BASE --pretrained <output>_state_cfr.safetensors",
            takes_registry=True,
        )
    )
