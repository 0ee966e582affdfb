"""Rotary embedding fused with the KV-cache write: one launch rotates q and k in place and writes the rotated
k and the value into the paged cache.

It saves re-reading k after rotation (and one launch) on every layer: ``apply_rotary_pos_emb`` followed by
``fill_kv_cache`` reads k twice and writes it twice; this reads it once and writes it twice (in place and into
the cache). Serves the op ``apply_rotary_pos_emb_fill_kv_cache`` (``dlinfer.ops.fused``);
:func:`rotary_fill_kv_cache` is the same kernel with its own argument checks, for direct callers.

Grid: ``(T, q head groups + k head groups)``; q groups only rotate, k groups rotate, then write k and v to the
token's slot (slot ``-1``: padding, rotated in place but not cached).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlinfer.vendor.registry import Capabilities
from dlinfer.vendor.triton.kv_cache import _copy_heads
from dlinfer.vendor.triton.rotary import _load_cos_sin, _rotate_heads, launch_config as rotary_launch_config


@triton.jit
def _rotary_fill_kv_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, slot_ptr,
                           n_q_heads, n_k_heads, half, head_dim_v, block_size,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
                           stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, q_groups,
                           HEADS_Q: tl.constexpr, HEADS_K: tl.constexpr, HALF: tl.constexpr, DV: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cos1, cos2, sin1, sin2 = _load_cos_sin(cos_ptr, sin_ptr, token, stride_cos, stride_sin, half, HALF)
    if group < q_groups:
        _rotate_heads(q_ptr, token, stride_qt, stride_qh, group * HEADS_Q, n_q_heads, half,
                      cos1, cos2, sin1, sin2, HEADS_Q, HALF)
    else:
        out1, out2, heads, mask = _rotate_heads(k_ptr, token, stride_kt, stride_kh, (group - q_groups) * HEADS_K,
                                                n_k_heads, half, cos1, cos2, sin1, sin2, HEADS_K, HALF)
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            block = slot // block_size
            offset = slot % block_size
            dims = tl.arange(0, HALF)
            dst = kc_ptr + block * stride_kcb + offset * stride_kcs + heads[:, None] * stride_kch + dims[None, :]
            tl.store(dst, out1.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + half, out2.to(kc_ptr.dtype.element_ty), mask=mask)
            _copy_heads(v_ptr, vc_ptr, token, stride_vt, stride_vh, block, offset, stride_vcb, stride_vcs,
                        stride_vch, heads, heads < n_k_heads, head_dim_v, DV)


def _check(query, key, value, key_cache, value_cache, cos, sin, kv_start_indices) -> None:
    for name, t, ndim in (("query", query, 3), ("key", key, 3), ("value", value, 3), ("key_cache", key_cache, 4),
                          ("value_cache", value_cache, 4), ("cos", cos, 2), ("sin", sin, 2),
                          ("kv_start_indices", kv_start_indices, 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
        if t.shape[-1] > 1 and t.stride(-1) != 1 and name != "kv_start_indices":
            raise ValueError(f"{name} must have stride 1 in its last dimension, got strides {t.stride()}")
    tokens, _, head_dim = query.shape
    if head_dim % 2:
        raise ValueError(f"query's head size must be even for rotate-half rotary, got {head_dim}")
    if key.shape[0] != tokens or key.shape[2] != head_dim:
        raise ValueError(f"key must be [{tokens}, Hk, {head_dim}], got {tuple(key.shape)}")
    if tuple(value.shape[:2]) != tuple(key.shape[:2]):
        raise ValueError(f"value must be [{tokens}, {key.shape[1]}, Dv], got {tuple(value.shape)}")
    if tuple(key_cache.shape[2:]) != (key.shape[1], head_dim):
        raise ValueError(f"key_cache must be [num_blocks, block_size, {key.shape[1]}, {head_dim}], "
                         f"got {tuple(key_cache.shape)}")
    if tuple(value_cache.shape) != (*key_cache.shape[:3], value.shape[2]):
        raise ValueError(f"value_cache must be [{', '.join(map(str, key_cache.shape[:3]))}, {value.shape[2]}], "
                         f"got {tuple(value_cache.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (tokens, head_dim):
            raise ValueError(f"{name} must be [{tokens}, {head_dim}], got {tuple(t.shape)}")
    if kv_start_indices.shape[0] != tokens or kv_start_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_start_indices must be int32/int64 [{tokens}], got {kv_start_indices.dtype} "
                         f"{tuple(kv_start_indices.shape)}")
    if not (query.dtype == key.dtype == value.dtype == key_cache.dtype == value_cache.dtype):
        raise ValueError("query, key, value, key_cache and value_cache must share one dtype")


def rotary_fill_kv_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                         value_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         kv_start_indices: torch.Tensor) -> None:
    """Rotate ``query`` ``[T, Hq, D]`` and ``key`` ``[T, Hk, D]`` in place (rotate-half, fp32 math) and write the
    rotated key and ``value`` ``[T, Hk, Dv]`` to ``key_cache``/``value_cache`` ``[NB, BS, Hk, D|Dv]`` (any strides,
    last-dim stride 1) at ``kv_start_indices`` ``[T]`` (``slot = block * BS + offset``, ``-1`` skipped)."""
    _check(query, key, value, key_cache, value_cache, cos, sin, kv_start_indices)
    _launch(query, key, value, key_cache, value_cache, cos, sin, kv_start_indices)


def _launch(query, key, value, key_cache, value_cache, cos, sin, kv_start_indices) -> None:
    """The op implementation: arguments already checked by ``dlinfer.ops.apply_rotary_pos_emb_fill_kv_cache``."""
    tokens, n_q_heads, head_dim = query.shape
    n_k_heads, head_dim_v = key.shape[1], value.shape[2]
    if tokens == 0:
        return
    half_block, heads_q, heads_k, warps = rotary_launch_config(n_q_heads, n_k_heads, head_dim)
    q_groups = triton.cdiv(n_q_heads, heads_q)
    k_groups = triton.cdiv(n_k_heads, heads_k)
    _rotary_fill_kv_kernel[(tokens, q_groups + k_groups)](
        query, key, value, key_cache, value_cache, cos, sin, kv_start_indices,
        n_q_heads, n_k_heads, head_dim // 2, head_dim_v, key_cache.shape[1],
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos.stride(0), sin.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), q_groups,
        HEADS_Q=heads_q, HEADS_K=heads_k, HALF=half_block, DV=triton.next_power_of_2(head_dim_v), num_warps=warps)


OPS = {"apply_rotary_pos_emb_fill_kv_cache": _launch}
# Strided (packed) caches are served; there is no quantized variant of this fusion.
CAPABILITIES = {"apply_rotary_pos_emb_fill_kv_cache": Capabilities(features=frozenset({"strided_cache"}))}
