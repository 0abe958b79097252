"""TPT: test-time prompt tuning (Shu et al., NeurIPS 2022), the test-time baseline SEraser compares against.

This module holds only the hook (settings in :mod:`.config`), so registering imports no
torch.  The implementation, imported on first use: :mod:`.views` (the augmented views, a
cached feature kind), :mod:`.tuning` (selection, the marginal entropy, the batched tuning)
and :mod:`.method` (the mitigation); the text tower is SEraser's prompt encoder.
Protocol, deviations, costs and results: ``docs/methods/tpt.md``.
"""

from __future__ import annotations

from ...hookspecs import hookimpl
from ...lazy import lazy_getattr
from ...specs import MitigationSpec, Needs
from .config import CITATION, NAME, PREFIX, TptConfig, TptError  # noqa: F401 - re-exported


def _create(config: TptConfig):
    from .method import Tpt

    return Tpt(config)


@hookimpl
def register_mitigations(register):
    register(
        MitigationSpec(
            name=NAME,
            create=_create,
            needs=Needs(fit_splits=(), labels=frozenset(), feature_kinds=("image",), live_model=True),
            description="TPT: per test image, one AdamW step on the prompt context minimising the entropy of the "
                        "averaged prediction over its most confident augmented views (no labels)",
            citation=CITATION,
            options=TptConfig,
            option_prefix=PREFIX,
            # the demo runs every built-in: 15 views instead of the paper's 63 keep it about 40 s
            # shorter there (docs/methods/tpt.md); eval uses the paper's defaults
            demo_flags=("--tpt_views", "15"),
        )
    )


#: implementation names re-exported lazily (importing them imports torch)
_LAZY = {
    "Tpt": "method",
    "TuneResult": "tuning", "tune_batch": "tuning", "marginal_entropy": "tuning", "select_confident": "tuning",
    "view_entropy": "tuning",
    "CropViews": "views", "crop_box": "views", "views_kind": "views",
}


__getattr__ = lazy_getattr(__name__, _LAZY)
