"""WiSE-FT (Wortsman et al., CVPR 2022): the zero-shot head and a fine-tuned head, interpolated in
weight space, alpha chosen on val.  Registration only (torch-free); the method is in :mod:`.linear`.
Protocol, deviations and measured numbers: docs/methods/wise_ft.md.
"""

from __future__ import annotations

from ...hookspecs import hookimpl
from ...specs import MitigationSpec, Needs
from .config import CITATION, NAME, PREFIX, WiseFTConfig


def _create(config: WiseFTConfig):
    from .linear import WiseFTLinear

    return WiseFTLinear(config)


@hookimpl
def register_mitigations(register):
    register(MitigationSpec(
        name=NAME,
        create=_create,
        needs=Needs(fit_splits=("train", "val"), labels=frozenset({"class", "group"})),
        description="WiSE-FT, linear-head form: the zero-shot head interpolated with a head fine-tuned from it on "
                    "train features (cross-entropy), alpha swept 0..1 and chosen on val",
        citation=CITATION,
        options=WiseFTConfig,
        option_prefix=PREFIX,
    ))
