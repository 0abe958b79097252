"""CFR's fit: CLIP+ERM, the calibration set, contrastive recalibration with per-epoch selection on val.

The fit records its whole curve (per epoch: loss terms, val scores) and why an epoch was
kept; see ``docs/methods/cfr.md`` for the protocol and what was measured.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...accuracy import class_metrics, worst_group_accuracy
from ...features import HEAD_ADAPTER, HEAD_TYPES, projection_head_type
from ...states import StateError
from ..base import Mitigation, RunContext
from .config import FEATURE_KIND, NAME, CFRConfig
from .heads import apply_head, init_head
from .losses import cosine_weight, feature_dropout, info_nce, make_logit_scale, supcon
from .sampling import AnchorCycle, authors_negatives, calibration_split, hard_negatives, sample_positives

_CHUNK = 4096  # rows per forward when scoring a whole split
#: per criterion: (name of the val score in the curve, higher is better, what it is)
CRITERIA = {
    "worst_group": ("val_worst_group_acc", True, "val worst-group accuracy (val group labels)"),
    "class_balanced": ("val_class_balanced_acc", True, "val mean per-class recall (no group labels)"),
    "val_ce": ("val_ce", False, "val cross-entropy at the training logit scale (no group labels)"),
}


@torch.no_grad()
def embed_all(head: torch.nn.Module, h: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
    """Normalised embeddings of many rows, in chunks."""
    return torch.cat([F.normalize(head(h[i:i + chunk]), dim=-1) for i in range(0, len(h), chunk)])


def make_optimizer(params, cfg: CFRConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum 0.9 (the authors' base code)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def select_epoch(values: list[float], higher_is_better: bool) -> int:
    """The best epoch (earliest on ties)."""
    best = max(values) if higher_is_better else min(values)
    return values.index(best)


class CFR(Mitigation):
    """CLIP+ERM, calibration set, contrastive recalibration of the projection head (docs/methods/cfr.md)."""

    def __init__(self, config: CFRConfig | None = None, model_type: str = "open_clip"):
        self.config = config or CFRConfig()
        #: the base model's ``--model_type`` (the run's, set in ``check``), recorded so the ``cfr`` loader can rebuild it
        self.model_type = model_type
        self.head_type: str | None = None
        self.head_state: dict[str, torch.Tensor] | None = None  # the selected head's tensors (CPU, float32)
        self._head: torch.nn.Module | None = None
        self._info: dict[str, Any] = {}
        #: after fit (not saved): the CLIP+ERM head's tensors and the calibration set (train row indices)
        self.erm_state: dict[str, torch.Tensor] | None = None
        self.calibration_indices: torch.Tensor | None = None
        #: diagnostics: called as ``f(epoch, head)`` after every recalibration epoch (head in eval mode)
        self.epoch_callback: Callable[[int, torch.nn.Module], None] | None = None

    # ---- scoring on val

    @torch.no_grad()
    def _val_scores(self, head, scale, x_val, y_val, g_val, text, n_classes) -> dict[str, float]:
        logits = scale * embed_all(head, x_val) @ text
        pred = logits.argmax(1).cpu().numpy()
        out = {
            "val_class_balanced_acc": round(class_metrics(pred, y_val, n_classes)["balanced_acc"], 6),
            "val_ce": round(float(F.cross_entropy(logits, torch.as_tensor(y_val, device=logits.device))), 6),
        }
        if g_val is not None:
            out["val_worst_group_acc"] = round(worst_group_accuracy(pred, y_val, g_val), 6)
        return out

    def check(self, ctx: RunContext) -> None:
        self.model_type = ctx.model_type

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
        # the one use of group labels: model selection on val (none with a label-free criterion)
        g_val = val.group_ids().numpy() if cfg.uses_group_labels else None
        text = ctx.zeroshot_head().float().to(device)
        model_scale = None
        if cfg.logit_scale == "model" and isinstance(getattr(ctx.model, "logit_scale", None), torch.Tensor):
            model_scale = float(ctx.model.logit_scale.detach().exp())
        self.head_type = projection_head_type(ctx.model)
        init = init_head(ctx.model, dim=x.shape[1]).to(device)
        key, higher, criterion_text = CRITERIA[cfg.selection]
        drop_gen = ctx.torch_generator(f"{NAME}/dropout")

        def score(head, scale):
            head.eval()
            out = self._val_scores(head, scale, x_val, y_val, g_val, text, ctx.n_classes)
            head.train()
            return out

        # Stage 1: CLIP+ERM (cross-entropy on the whole train split)
        erm = copy.deepcopy(init).train()
        erm_scale = make_logit_scale(cfg.logit_scale, model_scale).to(device)
        gen = ctx.torch_generator(f"{NAME}/erm")
        opt = make_optimizer([*erm.parameters(), *erm_scale.parameters()], cfg)
        erm_curve: list[dict[str, float]] = []
        erm_states = []
        for epoch in range(cfg.erm_epochs):
            order = torch.randperm(len(x), generator=gen).to(device)
            total = 0.0
            for s in range(0, len(x), cfg.batch_size):
                b = order[s:s + cfg.batch_size]
                h = feature_dropout(x[b], cfg.feature_dropout, drop_gen)
                loss = F.cross_entropy(erm_scale() * F.normalize(erm(h), dim=-1) @ text, y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
            erm_curve.append({"epoch": epoch, "loss": round(total / len(x), 6), **score(erm, erm_scale())})
            if cfg.erm_selection == "best":
                erm_states.append({k: v.detach().cpu().clone() for k, v in erm.state_dict().items()})
        erm_epoch = len(erm_curve) - 1
        if cfg.erm_selection == "best" and erm_curve:
            erm_epoch = select_epoch([e[key] for e in erm_curve], higher)
            erm.load_state_dict(erm_states[erm_epoch])
        del erm_states
        erm.eval()
        t_erm = time.perf_counter()

        # Stage 2: calibration set = what CLIP+ERM gets wrong; positive pool = what it gets right
        erm_embed = embed_all(erm, x)
        erm_pred = (erm_embed @ text).argmax(1)
        cal, correct = calibration_split(erm_pred.cpu(), y.cpu())
        negatives = torch.zeros(len(cal), 0, dtype=torch.long)
        if cfg.negatives == "hard":
            space = x if cfg.negative_space == "preproj" else erm_embed
            negatives = hard_negatives(space, y, cal.to(device), cfg.n_negatives)
            del space
        erm_val = score(erm, erm_scale())
        del erm_embed
        if len(cal) == 0:
            warnings.warn("cfr: CLIP+ERM classifies every training sample correctly; the calibration set is empty, "
                          "so only the supervised contrastive term trains the head", stacklevel=2)
        t_cal = time.perf_counter()

        # Stage 3: contrastive recalibration, starting from the model's own head
        head = copy.deepcopy(init).train()
        scale = make_logit_scale(cfg.logit_scale, model_scale).to(device)
        gen = ctx.torch_generator(f"{NAME}/recalibrate")
        opt = make_optimizer([*head.parameters(), *scale.parameters()], cfg)
        y_cpu = y.cpu()
        use_nce = len(cal) > 0 and (cfg.negatives == "authors" or negatives.shape[1] > 0)
        n_anchors = cfg.anchors_per_step or cfg.batch_size
        cycle = AnchorCycle(cal, gen)
        curve: list[dict[str, float]] = []
        best_value, best_epoch, best_state = None, -1, None

        def emb(rows: torch.Tensor) -> torch.Tensor:
            return F.normalize(head(feature_dropout(x[rows.to(device)], cfg.feature_dropout, drop_gen)), dim=-1)

        epochs = tqdm(range(cfg.epochs), desc="cfr", unit="epoch", disable=not ctx.progress, leave=False)
        for epoch in epochs:
            c = cosine_weight(epoch, cfg.epochs)
            order = torch.randperm(len(x), generator=gen)
            sums = {"ce": 0.0, "nce": 0.0, "supcon": 0.0}
            steps = 0
            for s in range(0, len(x), cfg.batch_size):
                b = order[s:s + cfg.batch_size]
                sc = supcon(emb(b), y[b.to(device)], cfg.supcon_tau)
                loss = cfg.supcon_weight * sc
                sums["supcon"] += sc.item()
                if len(cal):
                    anchors = cycle.take(min(len(b), n_anchors))
                    a_emb = emb(anchors)
                    ce = F.cross_entropy(scale() * a_emb @ text, y[anchors.to(device)])
                    loss = loss + cfg.ce_weight * c * ce
                    sums["ce"] += ce.item()
                    if use_nce:
                        pos_idx, valid = sample_positives(y_cpu[anchors], correct, y_cpu, cfg.n_positives, gen)
                        if cfg.negatives == "hard":
                            neg_idx = negatives[torch.searchsorted(cal, anchors)]  # rows of ``cal`` (sorted)
                        else:
                            neg_idx = authors_negatives(y_cpu[anchors], y_cpu, cfg.n_negatives, gen)
                        if valid.any():
                            pos_idx, neg_idx = pos_idx[valid], neg_idx[valid]
                            n_b, n_p, n_n = len(pos_idx), pos_idx.shape[1], neg_idx.shape[1]
                            nce = info_nce(a_emb[valid.to(device)], emb(pos_idx.flatten()).reshape(n_b, n_p, -1),
                                           emb(neg_idx.flatten()).reshape(n_b, n_n, -1), cfg.tau)
                            loss = loss + cfg.nce_weight * c * nce
                            sums["nce"] += nce.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
            row = {"epoch": epoch, "loss_weight": round(c, 6),
                   **{f"loss_{k}": round(v / max(steps, 1), 6) for k, v in sums.items()}, **score(head, scale())}
            if cfg.logit_scale == "learnable":
                row["logit_scale"] = round(float(scale().detach()), 4)
            curve.append(row)
            if self.epoch_callback is not None:
                head.eval()
                self.epoch_callback(epoch, head)
                head.train()
            value = row[key]
            if best_value is None or (value > best_value if higher else value < best_value):
                best_value, best_epoch = value, epoch
                best_state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
        t_end = time.perf_counter()

        self.head_state = best_state
        self._head = None
        self.erm_state = {k: v.detach().cpu().clone() for k, v in erm.state_dict().items()}
        self.calibration_indices = cal
        labels = ["class", "group"] if cfg.uses_group_labels else ["class"]
        self._info = {
            "head_type": self.head_type,
            "labels_used": labels,
            "group_labels_used_for": (
                "model selection on val (worst-group accuracy): the recalibration epoch"
                + (" and the CLIP+ERM epoch" if cfg.erm_selection == "best" else "")
                if cfg.uses_group_labels else "nothing"),
            "selection": {
                "criterion": cfg.selection, "split": "val", "metric": key, "epoch": best_epoch, "value": best_value,
                "reason": f"{'highest' if higher else 'lowest'} {criterion_text} over {cfg.epochs} recalibration "
                          "epochs (earliest on ties)",
            },
            "selected_epoch": best_epoch,
            "selection_metric": key,
            "selected_val_score": best_value,
            "val_scores": [r[key] for r in curve],
            "curve": curve,
            "logit_scale_used": "learnable (init 1/0.07)" if cfg.logit_scale == "learnable"
                                else (model_scale if cfg.logit_scale == "model" else float(cfg.logit_scale)),
            "erm_curve": erm_curve,
            "erm_selected_epoch": erm_epoch,
            "erm_val": erm_val,
            "erm_val_score": erm_val[key],
            "erm_train_acc": float((erm_pred.cpu() == y_cpu).float().mean()),
            "calibration_set_size": len(cal),
            "calibration_set_per_class": torch.bincount(y_cpu[cal], minlength=ctx.n_classes).tolist(),
            "positive_pool_size": len(correct),
            "n_negatives_used": (int(negatives.shape[1]) if cfg.negatives == "hard" else cfg.n_negatives) if len(cal) else 0,
            "n_train": len(x),
            "n_val": len(x_val),
            "preproj_dim": int(x.shape[1]),
            "stage3_init": "model's own head (the authors' CFR starts from CLIP, not CLIP+ERM)",
            "negatives_desc": (
                f"hard negatives: top-{cfg.n_negatives} other-class train samples by cosine similarity in the "
                f"{'frozen pre-projection' if cfg.negative_space == 'preproj' else 'CLIP+ERM embedding'} space"
                if cfg.negatives == "hard" else
                f"authors': {cfg.n_negatives} random train samples of the anchor's own class, redrawn every step"),
            "seconds": {
                "erm": round(t_erm - t_start, 3),
                "calibration": round(t_cal - t_erm, 3),
                "recalibration": round(t_end - t_cal, 3),
            },
        }

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

    def plots(self) -> Mapping[str, Callable[[str], None]]:
        """``curve``: the per-epoch val score and loss terms, with the selected epoch marked."""
        if not self._info.get("curve"):
            return {}
        from .plot import curve_writer

        return {"curve": curve_writer(self._info)}

    def as_open_clip(self, ctx: RunContext) -> torch.nn.Module:
        """A deep copy of ``ctx.model`` whose ``encode_image`` uses the fitted head."""
        if self.head_state is None:
            raise RuntimeError("cfr: as_open_clip() before fit() or load_state_dict()")
        return apply_head(copy.deepcopy(ctx.model), self.head_type, self.head_state)


__all__ = ["CFR", "CRITERIA", "embed_all", "make_optimizer", "select_epoch"]
