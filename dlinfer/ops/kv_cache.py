"""Writing new keys and values into the paged KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dlinfer.ops import _checks, kv_quant, table
from dlinfer.ops._dispatch import eager, implementation, run

_FLOATS, _INDEX = _checks.FLOAT_DTYPES, _checks.INDEX_DTYPES
_Tensor = torch.Tensor
# (strided cache, quant_bits) -> the call's cache features (built once: the op path runs per layer); a 4-bit cache
# needs kv_quant4 besides kv_quant, so that a vendor can serve 8 bits without 4
_QUANT_FEATURES = {0: frozenset(), 8: frozenset({"kv_quant"}), 4: frozenset({"kv_quant", "kv_quant4"})}
_CACHE_FEATURES = {(strided, bits): frozenset({"strided_cache"} if strided else ()) | quant
                   for strided in (False, True) for bits, quant in _QUANT_FEATURES.items()}


def cache_call_features(key_cache: torch.Tensor, quant_bits: int = 0) -> frozenset[str]:
    return _CACHE_FEATURES[not key_cache.is_contiguous(), quant_bits or 0]


def cache_implementation(
    op: str,
    ref: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    head_size: int,
    quant_bits: int = 0,
    extra_features: frozenset[str] = frozenset(),
):
    """The implementation serving an op that reads or writes the paged cache (selected from its metadata)."""
    features = cache_call_features(key_cache, quant_bits)
    return implementation(op, ref, head_size, kv_quant.head_size_of(value_cache, quant_bits), key_cache.shape[1],
                          features | extra_features if extra_features else features)


def unquantized(quant_bits) -> bool:
    """``quant_bits`` is a plain 0 or None (eager fast paths; anything else takes the named checks)."""
    return quant_bits is None or (type(quant_bits) is int and quant_bits == 0)


def plain_caches(key_cache, value_cache, dtype: torch.dtype, device: torch.device, num_kv_heads: int,
                 head_size: int) -> int:
    """For the eager fast paths: unquantized ``[num_blocks, block_size, num_kv_heads, head_size]`` caches of
    ``dtype`` on ``device`` with last-dim stride 1 that :func:`check_cache` accepts. Returns the value head size,
    or 0 when the named checks must decide."""
    if not (isinstance(key_cache, _Tensor) and isinstance(value_cache, _Tensor) and key_cache.dim() == 4
            and value_cache.dim() == 4 and key_cache.dtype is dtype and value_cache.dtype is dtype):
        return 0
    blocks, block_size, heads, size = key_cache.shape
    vs = value_cache.shape
    if (heads == num_kv_heads and size == head_size and vs[0] == blocks and vs[1] == block_size and vs[2] == heads
            and key_cache.stride()[-1] == 1 and value_cache.stride()[-1] == 1 and key_cache.device == device
            and value_cache.device == device):
        return vs[3]
    return 0


def plain_fill(key, value, key_cache, value_cache, kv_start_indices) -> bool:
    """The common unquantized call of ``fill_kv_cache`` in eager mode, checked in one pass: when it holds,
    :func:`fill_kv_cache_checks` passes."""
    if not (eager(key) and isinstance(value, _Tensor) and isinstance(kv_start_indices, _Tensor) and key.dim() == 3
            and value.dim() == 3 and kv_start_indices.dim() == 1):
        return False
    dtype, device = key.dtype, key.device
    tokens, heads, head_size = key.shape
    vs = value.shape
    return (dtype in _FLOATS and value.dtype is dtype and kv_start_indices.dtype in _INDEX and vs[0] == tokens
            and vs[1] == heads and vs[2] > 0 and kv_start_indices.shape[0] == tokens and value.device == device
            and kv_start_indices.device == device
            and plain_caches(key_cache, value_cache, dtype, device, heads, head_size) == vs[2]
            and key_cache.data_ptr() != value_cache.data_ptr())


def check_slots(kv_start_indices: torch.Tensor, key_cache: torch.Tensor) -> None:
    """Value check (CPU always, accelerators with DLINFER_CHECK=1): slots in the cache or -1, each at most once."""
    if _checks.values_checked(kv_start_indices):
        slots = key_cache.shape[0] * key_cache.shape[1]
        _checks.in_range(
            "kv_start_indices",
            kv_start_indices,
            0,
            slots,
            f"slot ids of a cache of {key_cache.shape[0]} blocks x {key_cache.shape[1]}",
            allow=-1,
        )
        used = kv_start_indices[kv_start_indices >= 0]
        if used.numel() != torch.unique(used).numel():
            raise ValueError("kv_start_indices holds a slot id twice; each slot takes at most one token per call "
                             "(-1 for padding may repeat)")


def _fill_kv_cache_impl(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_start_indices: torch.Tensor,
    k_scales_zeros: list[torch.Tensor],
    v_scales_zeros: list[torch.Tensor],
    quant_bits: int,
) -> None:
    check_slots(kv_start_indices, key_cache)
    impl = cache_implementation("fill_kv_cache", key, key_cache, value_cache, key.shape[-1], quant_bits)
    impl(key, value, key_cache, value_cache, kv_start_indices, k_scales_zeros, v_scales_zeros, quant_bits)


_fill_kv_cache = table.define("fill_kv_cache", _fill_kv_cache_impl)


def check_cache(
    key_cache,
    value_cache,
    num_kv_heads: int | None,
    head_size: int | None,
    head_size_v: int | None = None,
    block_size: int | None = None,
) -> None:
    _checks.tensor("key_cache", key_cache, ndim=4)
    _checks.tensor("value_cache", value_cache, ndim=4)
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        _checks.last_dim_contiguous(name, cache)
    if value_cache.shape[:3] != key_cache.shape[:3]:
        raise ValueError(
            "value_cache must share key_cache's [num_blocks, block_size, num_kv_heads], got "
            f"{tuple(value_cache.shape)} vs {tuple(key_cache.shape)}"
        )
    if num_kv_heads is not None:
        _checks.dim_is("key_cache", key_cache, 2, num_kv_heads, "num_kv_heads")
    if head_size is not None:
        _checks.dim_is("key_cache", key_cache, 3, head_size, "the key head size")
    if head_size_v is not None:
        _checks.dim_is("value_cache", value_cache, 3, head_size_v, "the value head size")
    if block_size is not None:
        block_size = _checks.integer("block_size", block_size, minimum=1)
        if key_cache.shape[1] != block_size:
            raise ValueError(
                f"block_size ({block_size}) must equal key_cache.shape[1] "
                f"(caches are [num_blocks, block_size, num_kv_heads, head_size]), "
                f"got cache shape {tuple(key_cache.shape)}"
            )


def fill_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_start_indices: torch.Tensor,
    k_scales_zeros: Sequence[torch.Tensor | None] = (),
    v_scales_zeros: Sequence[torch.Tensor | None] = (),
    quant_bits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write each new token's key and value into its cache slot.

    Args:
        key: ``[T, Hk, D]`` new keys (any strides, last-dim stride 1).
        value: ``[T, Hk, Dv]`` new values.
        key_cache: ``[num_blocks, block_size, Hk, D]``; may be a strided view of a packed buffer (vLLM packs
            K and V in one tensor): it is written in place, never copied.
        value_cache: ``[num_blocks, block_size, Hk, Dv]``, likewise.
        kv_start_indices: ``[T]`` int32/int64 slot id per token, ``slot = block * block_size + offset``;
            ``-1`` marks a padding token, which is skipped. A slot id may appear at most once per call (which of
            two writes to one slot would land is not defined, as vendors write in parallel): the value checks
            (always on CPU tensors, elsewhere with ``DLINFER_CHECK=1``) refuse duplicates.
        k_scales_zeros, v_scales_zeros, quant_bits: KV-cache quantization (LMDeploy's ``quant_policy``):
            ``quant_bits=0`` writes the values as they are (the scales are not read); 8 or 4 quantizes each
            token's head into a ``uint8`` cache (``[..., D]`` for 8 bits, ``[..., D / 2]`` for 4) and writes its
            scale and zero point into ``k_scales_zeros``/``v_scales_zeros``: ``[scales, zeros]`` (each
            ``[num_blocks, block_size, Hk]``, float) or ``[scales_zeros]`` (one ``[..., Hk, 2]`` tensor, scale
            then zero, LMDeploy's CUDA cache layout). Layout and rounding: ``dlinfer.ops.kv_quant``.

    Returns:
        ``(key_cache, value_cache)``, the same tensor objects.
    """
    if unquantized(quant_bits) and plain_fill(key, value, key_cache, value_cache, kv_start_indices):
        _fill_kv_cache_impl(key, value, key_cache, value_cache, kv_start_indices, [], [], 0)
        return key_cache, value_cache
    quant_bits = fill_kv_cache_checks(key, value, key_cache, value_cache, kv_start_indices, quant_bits)
    k_sz, v_sz = fill_scales_zeros(key_cache, value_cache, k_scales_zeros, v_scales_zeros, quant_bits)
    run(
        _fill_kv_cache,
        _fill_kv_cache_impl,
        key,
        value,
        key_cache,
        value_cache,
        kv_start_indices,
        k_sz,
        v_sz,
        quant_bits,
    )
    return key_cache, value_cache


def fill_kv_cache_checks(key, value, key_cache, value_cache, kv_start_indices, quant_bits) -> int:
    """Metadata checks of ``fill_kv_cache``; returns ``quant_bits`` as an int."""
    _checks.tensor("key", key, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("value", value, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("kv_start_indices", kv_start_indices, ndim=1, dtypes=_checks.INDEX_DTYPES)
    quant_bits = kv_quant.quant_bits_arg(quant_bits)
    tokens, heads, head_size = key.shape
    _checks.dim_is("value", value, 0, tokens, "the number of key tokens")
    _checks.dim_is("value", value, 1, heads, "key's head count")
    _checks.dim_is("kv_start_indices", kv_start_indices, 0, tokens, "the number of key tokens")
    check_cache(key_cache, value_cache, heads, kv_quant.cache_head_size(head_size, quant_bits),
                kv_quant.cache_head_size(value.shape[2], quant_bits, "value"))
    _checks.same_device(
        key=key, value=value, key_cache=key_cache, value_cache=value_cache, kv_start_indices=kv_start_indices
    )
    if quant_bits:
        _checks.same_dtype(key=key, value=value)
        kv_quant.check_caches(key_cache, value_cache, quant_bits)
    else:
        _checks.same_dtype(key=key, value=value, key_cache=key_cache, value_cache=value_cache)
    _checks.distinct(key_cache=key_cache, value_cache=value_cache)
    return quant_bits


def fill_scales_zeros(key_cache, value_cache, k_scales_zeros, v_scales_zeros, quant_bits):
    """What the vendor receives: ``[scales, zeros]`` per cache with a quantized cache (see ``kv_quant``), else
    empty lists (the scales are not read)."""
    if not quant_bits:
        return [], []
    k_sz = kv_quant.scales_zeros("k_scales_zeros", k_scales_zeros, key_cache, "key_cache")
    v_sz = kv_quant.scales_zeros("v_scales_zeros", v_scales_zeros, value_cache, "value_cache")
    _checks.distinct(k_scales=k_sz[0], k_zeros=k_sz[1], v_scales=v_sz[0], v_zeros=v_sz[1])
    return k_sz, v_sz
