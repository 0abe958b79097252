"""Contrastive adapters (Zhang & Re, NeurIPS 2022): a residual MLP on frozen image embeddings,
trained with a contrastive loss against the frozen class text embeddings; val worst-group
accuracy selects the epoch.  Registration only (torch-free); training is in :mod:`.training`.
Protocol, deviations and measured numbers: docs/methods/contrastive_adapter.md.
"""

from __future__ import annotations

from ...hookspecs import hookimpl
from ...specs import MitigationSpec, Needs
from .config import CITATION, NAME, PREFIX, ContrastiveAdapterConfig


def _create(config: ContrastiveAdapterConfig):
    from .training import ContrastiveAdapter

    return ContrastiveAdapter(config)


@hookimpl
def register_mitigations(register):
    register(MitigationSpec(
        name=NAME,
        create=_create,
        needs=Needs(fit_splits=("train", "val"), labels=frozenset({"class", "group"})),
        description="contrastive adapter: residual MLP on frozen image embeddings, contrastive loss with hard "
                    "positives (zero-shot predictions) and nearest-neighbour hard negatives, epoch by val worst-group",
        citation=CITATION,
        options=ContrastiveAdapterConfig,
        option_prefix=PREFIX,
    ))
