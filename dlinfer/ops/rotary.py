"""Rotary position embedding."""

from __future__ import annotations

import torch

from dlinfer.ops import _checks, table
from dlinfer.ops._dispatch import eager, run, selector

_select = selector("apply_rotary_pos_emb")
_FLOATS = _checks.FLOAT_DTYPES
_Tensor = torch.Tensor


def _apply_rotary_pos_emb_impl(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    _select(query, query.shape[-1])(query, key, cos, sin)


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
    if plain_rotary(query, key, cos, sin):
        _apply_rotary_pos_emb_impl(query, key, cos, sin)
        return query, key
    cos, sin = rotary_checks(query, key, cos, sin)
    run(_apply_rotary_pos_emb, _apply_rotary_pos_emb_impl, query, key, cos, sin)
    return query, key


def _plain_table(t, shape, device) -> bool:
    return isinstance(t, _Tensor) and t.dtype in _FLOATS and t.shape == shape and t.device == device and (
        t.stride()[-1] == 1)


def plain_rotary(query, key, cos, sin) -> bool:
    """The common call of ``apply_rotary_pos_emb`` in eager mode, checked in one expression: 3-D ``query``/``key``
    of one float dtype on one device, ``[T, D]`` tables, last-dim stride 1, distinct memory. When it holds,
    :func:`rotary_checks` passes and returns ``cos``/``sin`` unchanged."""
    if not (eager(query) and type(key) is _Tensor and query.dim() == 3 and key.dim() == 3):
        return False
    dtype, device = query.dtype, query.device
    tokens, _, head_dim = qs = query.shape
    ks = key.shape
    return (dtype in _FLOATS and key.dtype is dtype and ks[0] == tokens and ks[2] == head_dim and head_dim > 0
            and not head_dim % 2 and query.stride()[-1] == 1 and key.stride()[-1] == 1 and key.device == device
            and query.data_ptr() != key.data_ptr()
            and _plain_table(cos, qs[::2], device) and _plain_table(sin, qs[::2], device))


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
