"""Fusions beyond LMDeploy's contract, each with a plain definition in the reference vendor."""

from __future__ import annotations

import torch

from dlinfer.ops import table
from dlinfer.ops._dispatch import run
from dlinfer.ops.kv_cache import cache_implementation, check_slots, fill_kv_cache_checks, plain_fill
from dlinfer.ops.rotary import plain_rotary, rotary_checks


def _rotary_fill_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_start_indices: torch.Tensor,
) -> None:
    check_slots(kv_start_indices, key_cache)
    impl = cache_implementation("apply_rotary_pos_emb_fill_kv_cache", query, key_cache, value_cache, key.shape[-1])
    impl(query, key, value, key_cache, value_cache, cos, sin, kv_start_indices)


_rotary_fill = table.define("apply_rotary_pos_emb_fill_kv_cache", _rotary_fill_impl)


def apply_rotary_pos_emb_fill_kv_cache(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_start_indices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb`` then ``fill_kv_cache`` of the rotated keys and the values, in one pass.

    Same arguments and semantics as the two ops (see their docstrings): ``query``/``key`` are rotated in
    place (strided views allowed), the rotated keys and ``value`` are written at ``kv_start_indices``
    (``-1`` skipped) into the possibly strided caches. Returns ``(query, key)``.
    """
    if plain_rotary(query, key, cos, sin) and plain_fill(key, value, key_cache, value_cache, kv_start_indices):
        _rotary_fill_impl(query, key, value, key_cache, value_cache, cos, sin, kv_start_indices)
        return query, key
    cos, sin = rotary_checks(query, key, cos, sin)
    fill_kv_cache_checks(key, value, key_cache, value_cache, kv_start_indices, 0)
    run(_rotary_fill, _rotary_fill_impl, query, key, value, key_cache, value_cache, cos, sin, kv_start_indices)
    return query, key
