"""RoboShot (Adila et al., ICLR 2024): reject (spurious) concept directions are projected out
of, accept (useful) ones added to, the normalised image embeddings.  Protocol and
deviations: docs/methods/roboshot.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...argtypes import option
from ...hookspecs import hookimpl
from ...specs import MitigationSpec, Needs
from . import encode, linalg
from .common import SCALE, TextMethod, as_tensor, head_rows, image_rows

if TYPE_CHECKING:  # pragma: no cover
    import torch

from .prompts import PromptConfig

NAME = "roboshot"


@dataclass(frozen=True)
class RoboShotConfig(PromptConfig):
    normalize_text: bool = option(False, "difference L2-normalised concept embeddings (the authors difference raw ones)")


class RoboShot(TextMethod):
    name = NAME
    prompt_parts = ("reject", "accept")

    def _directions(self, ctx, pairs) -> np.ndarray:
        if not pairs:
            return np.zeros((0, head_rows(ctx).shape[1]))
        emb = encode.encode_texts(ctx, [t for pair in pairs for t in pair], normalize=self.config.normalize_text)
        emb = emb.double().numpy()
        return linalg.orthonormal_directions(emb[0::2], emb[1::2])

    def _fit(self, ctx, prompts):
        return {
            "reject": as_tensor(self._directions(ctx, prompts.reject)),
            "accept": as_tensor(self._directions(ctx, prompts.accept)),
            "class_embeddings": as_tensor(head_rows(ctx)),
        }

    def predict(self, ctx, split: str) -> torch.Tensor:
        reject, accept = self._need("reject").double().numpy(), self._need("accept").double().numpy()
        x = linalg.roboshot_transform(image_rows(ctx, split), reject, accept)
        return as_tensor(SCALE * x @ self._need("class_embeddings").double().numpy().T)

    def _settings(self):
        return {**super()._settings(), "normalize_text": self.config.normalize_text,
                "reject_directions": int(self.state["reject"].shape[0]) if "reject" in self.state else None,
                "accept_directions": int(self.state["accept"].shape[0]) if "accept" in self.state else None}


@hookimpl
def register_mitigations(register):
    register(MitigationSpec(
        name=NAME, create=RoboShot, needs=Needs(), options=RoboShotConfig, option_prefix="roboshot_",
        description="reject/accept concept directions projected out of / added to image embeddings (no labels)",
        citation="Adila et al., Zero-Shot Robustification of Zero-Shot Models, ICLR 2024 (code: SprocketLab/roboshot)",
    ))
