"""Measuring a CLIP's geometry in the world: zero-shot margins, recognition, planted shortcuts.

Everything clip_benchmark's zero-shot head does (normalised image features against the
normalised mean of the normalised template embeddings, logits at scale 100), on images
rendered here from attribute draws, so the training script and the tests measure the
same three figures:

- ``margin_median``: on balanced two-class tasks (every pair of shapes, every pair of
  scenes), the median over samples of top logit minus runner-up;
- ``shape_acc`` / ``scene_acc``: zero-shot recognition over all shapes / all scenes;
- ``shortcut``: on a task pairing two skewed shapes with their pretraining scenes,
  group-balanced, the mean and worst-group accuracy.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

from .pretrain import attribute_names
from .render import render
from .vocab import ATTRIBUTES, SCENES, SHAPES, prompt_name, templates_for

SCALE = 100.0


def balanced_draws(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``n`` attribute draws, each attribute independent and uniform (no co-occurrence)."""
    return {name: rng.integers(len(values), size=n) for name, values in ATTRIBUTES.items()}


def render_draws(rng: np.random.Generator, draws: dict[str, np.ndarray], size: int) -> np.ndarray:
    """(N, size, size, 3) uint8 images of the draws."""
    n = len(draws["shape"])
    return np.stack([render(rng, attribute_names(draws, i), size)[0] for i in range(n)])


def to_tensor(pixels: np.ndarray, mean: Any, std: Any):
    """uint8 (N, H, W, 3) to the normalised float tensor open_clip's preprocess gives at native size."""
    import torch

    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def image_features(model, images, batch_size: int = 256) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        feats = [F.normalize(model.encode_image(images[i:i + batch_size]), dim=-1) for i in range(0, len(images), batch_size)]
    return torch.cat(feats).numpy()


def zeroshot_head(model, tokenizer, field: str, values) -> np.ndarray:
    """clip_benchmark's head for ``values`` of ``field``: (C, D)."""
    import torch
    import torch.nn.functional as F

    rows = []
    with torch.no_grad():
        for v in values:
            prompts = [t.format(c=prompt_name(field, v)) for t in templates_for(field)]
            emb = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
            rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows).numpy()


def margins(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def measure(model, tokenizer, feats: np.ndarray, draws: dict[str, np.ndarray],
            shortcut_feats: np.ndarray, shortcut_y: np.ndarray, shortcut_a: np.ndarray,
            shortcut_classes: tuple[str, str]) -> dict[str, Any]:
    """The three figures from balanced features ``feats`` of ``draws`` and a shortcut task's features."""
    out: dict[str, Any] = {}
    all_margins = []
    for field, values in (("shape", SHAPES), ("scene", SCENES)):
        head = zeroshot_head(model, tokenizer, field, values)
        logits = SCALE * feats @ head.T
        out[f"{field}_acc"] = float((logits.argmax(1) == draws[field]).mean())
        for i, j in combinations(range(len(values)), 2):
            rows = np.isin(draws[field], (i, j))
            all_margins.append(margins(logits[rows][:, [i, j]]))
    out["margin_median"] = float(np.median(np.concatenate(all_margins)))
    head = zeroshot_head(model, tokenizer, "shape", shortcut_classes)
    pred = (shortcut_feats @ head.T).argmax(1)
    accs = [float((pred[(shortcut_y == y) & (shortcut_a == a)] == y).mean()) for y in (0, 1) for a in (0, 1)]
    out["shortcut_group_accs"] = accs
    out["shortcut_mean_acc"] = float((pred == shortcut_y).mean())
    out["shortcut_worst_group_acc"] = min(accs)
    return out
