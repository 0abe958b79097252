"""How much of a text-side head's worst-group change is a class bias (a diagnostic, not a method).

    python3 scripts/text_head_bias.py --train TRAIN.safetensors --test TEST.safetensors \
        --head zeroshot=HEAD.safetensors --head orth_proj=STATE.safetensors [--head NAME=FILE ...]

TRAIN / TEST: feature-cache files of a split (``features`` (N, D), ``labels`` (N,), ``fields``
(N, F)); a head file is the zero-shot head of the cache (``head``, D x C) or a method's saved
state (``--save_mitigation_state``) holding ``class_embeddings`` (C x D).  For each head it
prints the per-group accuracy of its logits ``100 * x . w_c`` and of the same logits less a
per-class offset: the mean over the **train** images (labels unread) of each class's logit
minus the mean over classes.  Removing that offset is label-free; a head whose groups recover
once it is removed lost accuracy to a shift of the decision threshold (docs/methods/orth_proj.md).
"""

from __future__ import annotations

import argparse
import sys

import torch
from safetensors.torch import load_file

from clip_robust_plugins.mitigations.text.common import SCALE  # the text methods' own logit scale


def class_embeddings(path: str) -> torch.Tensor:
    """(C, D) unit rows from a cache head file or a text method's state file."""
    tensors = load_file(path)
    if "class_embeddings" in tensors:
        rows = tensors["class_embeddings"]
    elif "head" in tensors:
        rows = tensors["head"].T
    else:
        raise SystemExit(f"text_head_bias: {path}: neither 'class_embeddings' nor 'head' (keys {sorted(tensors)})")
    return torch.nn.functional.normalize(rows.double(), dim=-1)


def split(path: str) -> dict[str, torch.Tensor]:
    tensors = load_file(path)
    missing = {"features", "labels", "fields"} - set(tensors)
    if missing or tensors["features"].dim() != 2:
        raise SystemExit(f"text_head_bias: {path}: not a cached image-feature split (missing {sorted(missing)})")
    return tensors


def class_offsets(train_features: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per class: the mean train logit less the mean over classes (what argmax sees as a bias)."""
    mean_logits = SCALE * train_features.double().mean(0) @ w.T
    return mean_logits - mean_logits.mean()


def group_accuracies(pred: torch.Tensor, labels: torch.Tensor, fields: torch.Tensor) -> dict[tuple, float]:
    out = {}
    for values in sorted({tuple(v) for v in fields.tolist()}):
        rows = (fields == torch.tensor(values)).all(1)
        out[values] = float((pred[rows] == labels[rows]).double().mean())
    return out


def report(name: str, w: torch.Tensor, train: dict, test: dict) -> list[str]:
    offsets = class_offsets(train["features"], w)
    logits = SCALE * test["features"].double() @ w.T
    raw = group_accuracies(logits.argmax(1), test["labels"], test["fields"])
    centred = group_accuracies((logits - offsets).argmax(1), test["labels"], test["fields"])
    lines = [f"{name}: per-class offset on train images {[round(float(o), 2) for o in offsets]}"]
    for values in raw:
        lines.append(f"  fields {values}: acc {raw[values]:.3f}, offset removed {centred[values]:.3f}")
    lines.append(f"  worst group {min(raw.values()):.3f}, offset removed {min(centred.values()):.3f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="cached train split (labels are not read)")
    parser.add_argument("--test", required=True, help="cached test split")
    parser.add_argument("--head", action="append", required=True, metavar="NAME=FILE")
    args = parser.parse_args(argv)
    train, test = split(args.train), split(args.test)
    for item in args.head:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"text_head_bias: --head {item!r}: expected NAME=FILE")
        print("\n".join(report(name, class_embeddings(path), train, test)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
