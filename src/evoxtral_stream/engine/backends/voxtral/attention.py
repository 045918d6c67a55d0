"""SDPA whose one-token decode steps stay grouped-query when compiled.

transformers' ``sdpa`` attention runs a one-token query with grouped key and
value heads by folding the query heads of a group together (no copy of the
cache), but only when not compiling: under ``torch.compile`` it repeats every
cached key and value for each query head instead, which copies the whole
attended cache several times per layer and step. :data:`GROUPED_SDPA` is the
same attention with the folding kept when compiled; it is registered with
transformers under that name, with ``sdpa``'s mask, and delegates every
other case to ``sdpa`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GROUPED_SDPA", "grouped_sdpa", "mask_for", "register", "scores_add_mask"]

GROUPED_SDPA = "evoxtral_grouped_sdpa"


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract; (batch, 1, heads, dim) out for one token."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1))
    one_token = query.shape[2] == 1 and key.shape[1] * groups == query.shape[1]
    plain_mask = attention_mask is None or attention_mask.shape[1] == 1
    if groups == 1 or not one_token or not plain_mask or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, heads, _, dim = query.shape
    # (b, kv heads, group, dim): a group's queries become rows against their
    # shared key head; a (b, 1, 1, kv) mask broadcasts over both.
    folded = query.reshape(b, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def scores_add_mask(model: torch.nn.Module) -> bool:
    """True when ``model``'s language model runs eager attention, which adds
    its mask to the attention scores (a boolean mask would mask nothing)."""
    m: Any = model
    return bool(m.config.get_text_config()._attn_implementation == "eager")


def mask_for(allowed: torch.Tensor, additive: bool, dtype: torch.dtype) -> torch.Tensor:
    """A 4-D mask built outside transformers (``allowed``: True where a query
    attends to a key), in the form the attention takes it as given: boolean
    for ``sdpa`` and :data:`GROUPED_SDPA`; with ``additive`` (eager
    attention, :func:`scores_add_mask`) 0 where allowed and ``dtype``'s
    lowest value elsewhere, as transformers builds eager masks."""
    if not additive:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def register() -> None:
    """Make :data:`GROUPED_SDPA` a name transformers accepts (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
