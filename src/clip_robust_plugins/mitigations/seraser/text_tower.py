"""Prompt features with learnable context vectors, through an open_clip text tower.

:class:`PromptEncoder` is open_clip's ``encode_text`` with the context token embeddings
swapped in, batched over one context per test image; :func:`text_tower` finds the tower's
parts (``CLIP`` or ``CustomTextCLIP``) and refuses, by name, towers it cannot run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import SEraserError

#: the attributes of an open_clip text tower that prompt tuning reads
TEXT_TOWER_ATTRIBUTES = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
POOL_TYPES = ("argmax", "eos")


@dataclass(frozen=True)
class TextTower:
    """The parts of an open_clip text tower that :class:`PromptEncoder` runs itself."""

    token_embedding: torch.nn.Module
    positional_embedding: torch.Tensor
    transformer: torch.nn.Module
    ln_final: torch.nn.Module
    text_projection: Any  # Parameter (D_w, D), nn.Linear or None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None


def text_tower(model: torch.nn.Module) -> TextTower:
    """The text tower of an open_clip ``CLIP`` (attributes on the model) or ``CustomTextCLIP``
    (``model.text``, a ``TextTransformer``); a clear error naming what is missing otherwise."""
    owner = model
    if not hasattr(model, "token_embedding") and hasattr(getattr(model, "text", None), "token_embedding"):
        owner = model.text
    where = type(model).__name__ + (".text" if owner is not model else "")
    for attr in TEXT_TOWER_ATTRIBUTES:
        if not hasattr(owner, attr):
            raise SEraserError(
                f"seraser: the text tower of {where} has no `{attr}`; prompt tuning needs open_clip's standard "
                f"text transformer ({', '.join(TEXT_TOWER_ATTRIBUTES)})"
            )
    if getattr(owner, "cls_emb", None) is not None:
        raise SEraserError(f"seraser: the text tower of {where} appends a class token (CoCa-style); not supported")
    if getattr(owner, "use_pad_mask", False):
        raise SEraserError(f"seraser: the text tower of {where} uses a padding mask; not supported")
    pool_type = getattr(owner, "text_pool_type", None) or getattr(owner, "pool_type", None) or "argmax"
    if pool_type not in POOL_TYPES:
        raise SEraserError(f"seraser: the text tower of {where} pools with {pool_type!r}; supported: {POOL_TYPES}")
    eos_id = getattr(owner, "text_eos_id", None) if owner is model else getattr(owner, "eos_id", None)
    return TextTower(
        token_embedding=owner.token_embedding,
        positional_embedding=owner.positional_embedding,
        transformer=owner.transformer,
        ln_final=owner.ln_final,
        text_projection=owner.text_projection,
        attn_mask=getattr(owner, "attn_mask", None),
        pool_type=pool_type,
        eos_id=eos_id,
    )


def _pool_positions(ids: torch.Tensor, pool_type: str, eos_id: int | None) -> torch.Tensor:
    """Where the pooled (EOS) token sits, as open_clip's ``text_global_pool`` picks it."""
    if pool_type == "argmax":
        return ids.argmax(dim=-1)
    if eos_id is None:
        raise SEraserError("seraser: the text tower pools at `eos` but has no eos id")
    return (ids == eos_id).int().argmax(dim=-1)


def model_logit_scale(model: torch.nn.Module, configured: float | str, method: str, flag: str) -> float:
    """The softmax scale a prompt-tuning method uses: ``configured``, or with ``"model"`` the
    model's own ``logit_scale.exp()`` (an error naming ``method`` and ``flag`` if it has none)."""
    from .config import MODEL_SCALE

    if configured != MODEL_SCALE:
        return float(configured)
    scale = getattr(model, "logit_scale", None)
    if not isinstance(scale, torch.Tensor):
        raise SEraserError(f"{method}: the model has no logit_scale; pass {flag}")
    return float(scale.detach().float().exp().flatten()[0])


class PromptEncoder:
    """Text features of ``[SOS] ctx <class prompt> [EOS]`` for a batch of context tensors.

    ``encode(ctx)`` with ``ctx`` (B, n_ctx, width) returns L2-normalised text features
    (B, C, D): row b holds the C class prompts built with image b's context.  It is
    open_clip's ``CLIP.encode_text`` with the context token embeddings swapped in
    (token embedding, + positional embedding, transformer with the causal mask,
    ``ln_final``, the EOS token as ``text_global_pool`` picks it, ``text_projection``).
    With a causal mask the positions after the last EOS are dropped: they cannot reach
    the EOS token, so the features are the same and the text tower does a fraction of the work.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable,
        classnames: Sequence[str],
        *,
        ctx_init: str = "a photo of",
        n_ctx: int | None = None,
        class_prompt: str = "a {c}.",
        device: str | torch.device = "cpu",
        generator: torch.Generator | None = None,
    ):
        self.tower = text_tower(model)
        self.device = torch.device(device)
        ctx_init = " ".join(ctx_init.replace("_", " ").split())
        if ctx_init:
            k = self._count_tokens(tokenizer, ctx_init)
            if n_ctx is not None and n_ctx != k:
                raise SEraserError(
                    f"seraser: --seraser_n_ctx {n_ctx} but --seraser_ctx_init {ctx_init!r} is {k} tokens; "
                    "give one of them, or an init of that many tokens"
                )
            prefix = ctx_init
        else:
            k = 3 if n_ctx is None else n_ctx
            prefix = " ".join(["X"] * k)  # placeholders (CoOp); their embeddings are replaced
        self.n_ctx = k
        self.prompts = [f"{prefix} {class_prompt.format(c=name)}" for name in classnames]
        ids = tokenizer(self.prompts)
        if not isinstance(ids, torch.Tensor):
            raise SEraserError(f"seraser: the tokenizer returned {type(ids).__name__}, not a tensor of token ids")
        ids = ids.to(self.device)
        eos = _pool_positions(ids, self.tower.pool_type, self.tower.eos_id)
        if int(eos.min()) < k + 1:
            raise SEraserError(f"seraser: a prompt is too short for {k} context tokens: {self.prompts}")
        if int(eos.max()) >= ids.shape[1] - 1 and bool((ids[:, -1] != 0).any()):
            # open_clip's tokenizer truncates and puts EOS last: the class prompt did not fit
            raise SEraserError(f"seraser: prompts do not fit the text context of {ids.shape[1]} tokens: {self.prompts}")
        if ctx_init:
            init_ids = tokenizer([ctx_init]).to(self.device)[0, 1:1 + k]
            if not bool((ids[:, 1:1 + k] == init_ids).all()):
                raise SEraserError(f"seraser: {ctx_init!r} tokenises differently at the start of the prompts {self.prompts}")
        if self.tower.attn_mask is not None:
            # causal attention: nothing after the EOS token reaches it, so the padding is dropped
            # (8 of crp-tiny's 16 positions, about 65 of OpenAI CLIP's 77); the features are unchanged
            ids = ids[:, : int(eos.max()) + 1]
        self.ids = ids
        self.cast_dtype = self._cast_dtype()
        with torch.no_grad():
            embedded = self.tower.token_embedding(ids).float()  # (C, L, W)
            self.prefix = embedded[:, :1]
            self.suffix = embedded[:, 1 + k:]
            if ctx_init:
                self.init_ctx = embedded[0, 1:1 + k].clone()
            else:
                width = embedded.shape[-1]
                self.init_ctx = (torch.randn(k, width, generator=generator) * 0.02).to(self.device)
        self.width = int(self.init_ctx.shape[-1])

    @staticmethod
    def _count_tokens(tokenizer: Callable, text: str) -> int:
        ids = tokenizer([text])
        if not isinstance(ids, torch.Tensor):
            raise SEraserError(f"seraser: the tokenizer returned {type(ids).__name__}, not a tensor of token ids")
        nonzero = int((ids[0] != 0).sum())
        return nonzero - 2  # minus SOS and EOS

    def _cast_dtype(self) -> torch.dtype:
        get = getattr(self.tower.transformer, "get_cast_dtype", None)
        return get() if callable(get) else self.tower.positional_embedding.dtype

    @property
    def n_classes(self) -> int:
        return int(self.ids.shape[0])

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        """(B, n_ctx, width) context -> (B, C, D) normalised text features (differentiable in ``ctx``)."""
        b, c = ctx.shape[0], self.n_classes
        length = self.ids.shape[1]
        x = torch.cat(
            [
                self.prefix.unsqueeze(0).expand(b, -1, -1, -1),
                ctx.unsqueeze(1).expand(-1, c, -1, -1),
                self.suffix.unsqueeze(0).expand(b, -1, -1, -1),
            ],
            dim=2,
        ).reshape(b * c, length, -1)
        t = self.tower
        x = x.to(self.cast_dtype) + t.positional_embedding[:length].to(self.cast_dtype)
        attn_mask = t.attn_mask[:length, :length] if t.attn_mask is not None else None
        x = t.transformer(x, attn_mask=attn_mask)
        x = t.ln_final(x)
        ids = self.ids.repeat(b, 1)
        x = x[torch.arange(x.shape[0], device=x.device), _pool_positions(ids, t.pool_type, t.eos_id)]
        if isinstance(t.text_projection, torch.nn.Linear):
            x = t.text_projection(x)
        elif t.text_projection is not None:
            x = x @ t.text_projection
        return F.normalize(x.float(), dim=-1).reshape(b, c, -1)


