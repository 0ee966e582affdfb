"""Rotary position embedding."""

from __future__ import annotations

import torch

from dlinfer.ops import _checks, table
from dlinfer.ops._dispatch import implementation, run


def _apply_rotary_pos_emb_impl(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    implementation("apply_rotary_pos_emb", query, head_size=query.shape[-1])(query, key, cos, sin)


_apply_rotary_pos_emb = table.define("apply_rotary_pos_emb", _apply_rotary_pos_emb_impl)


def _as_table(name: str, t: torch.Tensor, tokens: int, head_dim: int) -> torch.Tensor:
    _checks.tensor(name, t, dtypes=_checks.FLOAT_DTYPES)
    if t.dim() < 2 or t.shape[-1] != head_dim or t.numel() != tokens * head_dim:
        raise ValueError(
            f"{name} must hold one row of {head_dim} values per token ([{tokens}, {head_dim}], "
            f"optionally with size-1 leading dims), got shape {tuple(t.shape)}"
        )
    t = t.reshape(tokens, head_dim)
    _checks.last_dim_contiguous(name, t)
    return t


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (GPT-NeoX/Llama style) rotary embedding, in place.

    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``, computed in
    float32 and written back into ``query`` and ``key``.

    Args:
        query: ``[T, Hq, D]``; may be a strided view (e.g. of a fused qkv projection), last-dim stride 1.
        key: ``[T, Hk, D]``, same dtype and token count; may be strided likewise.
        cos, sin: ``[T, D]`` per-token tables (the two halves repeated, as Llama builds them); leading
            size-1 dims (``[1, T, D]``) are accepted.

    Returns:
        ``(query, key)``, the same tensor objects, rotated in place.
    """
    cos, sin = rotary_checks(query, key, cos, sin)
    run(_apply_rotary_pos_emb, _apply_rotary_pos_emb_impl, query, key, cos, sin)
    return query, key


def rotary_checks(query, key, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """Metadata checks of ``apply_rotary_pos_emb``; returns ``cos``/``sin`` as ``[T, D]``."""
    _checks.tensor("query", query, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("key", key, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.same_dtype(query=query, key=key)
    tokens, _, head_dim = query.shape
    _checks.dim_is("key", key, 0, tokens, "the number of query tokens")
    _checks.dim_is("key", key, 2, head_dim, "query's head size")
    if head_dim % 2:
        raise ValueError(f"query's head size must be even for rotate-half rotary, got {head_dim}")
    _checks.last_dim_contiguous("query", query)
    _checks.last_dim_contiguous("key", key)
    _checks.distinct(query=query, key=key)
    cos = _as_table("cos", cos, tokens, head_dim)
    sin = _as_table("sin", sin, tokens, head_dim)
    _checks.same_device(query=query, key=key, cos=cos, sin=sin)
    return cos, sin
