"""Quantized KV caches (LMDeploy's ``quant_policy`` 8 and 4): the layout the cache ops read and write, its checks.

The layout is stock LMDeploy's on CUDA, so a cache written by either side reads back on the other:

* ``quant_bits=8``: ``key_cache``/``value_cache`` are ``uint8 [num_blocks, block_size, Hk, D]`` (``Dv``);
* ``quant_bits=4``: ``uint8 [num_blocks, block_size, Hk, D / 2]``, two 4-bit values per byte: byte ``i`` holds
  element ``i`` in its low nibble and element ``i + D / 2`` in its high nibble (``D`` even);
* beside each cache, one scale and one zero point per token and KV head: ``[num_blocks, block_size, Hk]``
  float tensors (LMDeploy keeps them in one ``[num_blocks, block_size, Hk, 2]`` tensor in the model's dtype,
  scale at ``[..., 0]``, zero at ``[..., 1]``); element ``d`` of a token's head dequantizes to
  ``(q[d] - zero) * scale``.

Quantization of a token's head ``x`` (``D`` values; ``L = 2 ** quant_bits - 1`` levels), in float32, the same in
every vendor so the bytes agree::

    mn, mx = min(x), max(x)
    scale = max((mx - mn) / L, max(|mn|, |mx|) / (64 * L))   # rounded to the scales' dtype
    scale = 1 if mx == mn or scale == 0 else scale
    zero  = -mn / scale                                        # rounded to the zeros' dtype
    q     = clamp(floor(x / scale + zero + 0.5), 0, L)

which is LMDeploy's ``(max - min) / L`` scale except where that fails: a constant row (``max == min``: LMDeploy
divides by zero) gets scale 1 and zero ``-mn``, so it is stored exactly (``q = 0``), and a row whose range is
tiny against its magnitude keeps a zero point that fits a float16 (a quantization step never finer than
``2^-6 / L`` of the row's largest magnitude, below float16's own resolution for 8 bits). NaN in, NaN out: a row holding NaN or Inf gets scale and zero NaN and
``q = 0``, so it dequantizes to NaN.

Public arguments (LMDeploy's dlinfer signatures) and what vendors receive:

* ``fill_kv_cache(k_scales_zeros=..., v_scales_zeros=...)``: per cache, ``[scales, zeros]`` (two
  ``[num_blocks, block_size, Hk]`` tensors, or ``[..., 1]``) or ``[scales_zeros]`` (one ``[..., Hk, 2]`` tensor,
  stock LMDeploy's); the vendor gets ``[scales, zeros]`` views, written in place.
* ``paged_*_attention(kv_scales=..., kv_zeros=...)``: ``kv_scales`` is ``[k_scales, v_scales]`` (a pair of
  ``[num_blocks, block_size, Hk]`` tensors, or one ``[2, num_blocks, block_size, Hk]`` tensor, K first),
  ``kv_zeros`` likewise; the vendor gets both as two-element lists of views.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dlinfer.ops import _checks

#: quant_bits values served: 0 (a float cache), 4 and 8 (uint8 caches, LMDeploy's quant_policy 4 and 8).
QUANT_BITS = (0, 4, 8)
#: The largest quantized value per quant_bits (``2 ** bits - 1``).
LEVELS = {4: 15, 8: 255}
#: The quantization step is never finer than ``max(|x|) / (MIN_STEP_DIVISOR * L)`` (see the module doc).
MIN_STEP_DIVISOR = 64


def quant_bits_arg(quant_bits) -> int:
    """``quant_bits`` as an int (``None`` is 0); one of :data:`QUANT_BITS` or a ValueError naming it."""
    quant_bits = _checks.integer("quant_bits", 0 if quant_bits is None else quant_bits, minimum=0)
    if quant_bits not in QUANT_BITS:
        raise ValueError(f"quant_bits must be 0 (no KV quantization), 8 (uint8 cache) or 4 (4-bit cache), as "
                         f"LMDeploy's quant_policy; got {quant_bits}")
    return quant_bits


def cache_head_size(head_size: int, quant_bits: int, name: str = "key") -> int:
    """The cache's last dimension for a head size: ``head_size / 2`` for 4-bit caches, else ``head_size``."""
    if quant_bits == 4:
        if head_size % 2:
            raise ValueError(f"quant_bits=4 packs two values per byte: the {name} head size must be even, got "
                             f"{head_size}")
        return head_size // 2
    return head_size


def head_size_of(cache: torch.Tensor, quant_bits: int) -> int:
    """The head size a cache holds (twice its last dimension for 4-bit caches)."""
    return cache.shape[-1] * 2 if quant_bits == 4 else cache.shape[-1]


def check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor, quant_bits: int) -> None:
    """Quantized caches are uint8 (LMDeploy's storage dtype for quant_policy 4 and 8)."""
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dtype != torch.uint8:
            raise ValueError(f"{name} must be a uint8 tensor with quant_bits={quant_bits} (a quantized KV cache), "
                             f"got {str(cache.dtype).replace('torch.', '')}")


def _per_token(name: str, t, cache: torch.Tensor, cache_name: str, allow_pair_dim: bool) -> torch.Tensor:
    """``t`` as a ``[num_blocks, block_size, Hk]`` view (a trailing dimension of 1 is dropped)."""
    _checks.tensor(name, t, dtypes=_checks.FLOAT_DTYPES)
    want = tuple(cache.shape[:3])
    shape = tuple(t.shape)
    if shape == want + (1,):
        t = t[..., 0]
    elif shape != want:
        extra = " or [..., 2] (scale, zero)" if allow_pair_dim else ""
        raise ValueError(f"{name} must be [num_blocks, block_size, num_kv_heads] = {list(want)} (one value per "
                         f"token and KV head of {cache_name}){extra}, got {list(shape)}")
    if t.device != cache.device:
        raise ValueError(f"{name} is on {t.device} but {cache_name} is on {cache.device}; all must share a device")
    return t


def _items(name: str, value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if value is None or isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of tensors with a quantized KV cache, got "
                        f"{type(value).__name__}")
    return [t for t in value if t is not None]


def scales_zeros(name: str, value, cache: torch.Tensor, cache_name: str) -> list[torch.Tensor]:
    """``fill_kv_cache``'s ``k_scales_zeros``/``v_scales_zeros`` -> ``[scales, zeros]`` views of ``cache``'s
    per-token layout (see the module doc)."""
    items = _items(name, value)
    want = list(cache.shape[:3])
    if len(items) == 1:
        t = _checks.tensor(name, items[0], dtypes=_checks.FLOAT_DTYPES)
        if list(t.shape) != want + [2]:
            raise ValueError(f"{name} must be [scales, zeros] ({want} each) or one {want + [2]} tensor (scale at "
                             f"[..., 0], zero at [..., 1], as LMDeploy's cache), got one tensor of shape "
                             f"{list(t.shape)}")
        if t.device != cache.device:
            raise ValueError(f"{name} is on {t.device} but {cache_name} is on {cache.device}; all must share a "
                             "device")
        return [t[..., 0], t[..., 1]]
    if len(items) != 2:
        raise ValueError(f"{name} must be [scales, zeros] (two {want} tensors) or one {want + [2]} tensor with "
                         f"a quantized KV cache, got {len(items)} tensors")
    return [_per_token(f"{name}[{i}]", t, cache, cache_name, True) for i, t in enumerate(items)]


def kv_pair(name: str, value, key_cache: torch.Tensor) -> list[torch.Tensor]:
    """The attention ops' ``kv_scales``/``kv_zeros`` -> ``[k, v]`` views (see the module doc)."""
    if value is None:
        raise ValueError(f"{name} is required with a quantized KV cache (quant_bits != 0): [k, v], each "
                         f"[num_blocks, block_size, num_kv_heads] = {list(key_cache.shape[:3])}")
    if isinstance(value, torch.Tensor):
        _checks.tensor(name, value, dtypes=_checks.FLOAT_DTYPES)
        if value.dim() < 1 or value.shape[0] != 2:
            raise ValueError(f"{name} must be [k, v]: a pair of [num_blocks, block_size, num_kv_heads] tensors "
                             f"or one [2, num_blocks, block_size, num_kv_heads] tensor, got shape "
                             f"{list(value.shape)}")
        items = list(value.unbind(0))
    else:
        items = _items(name, value)
        if len(items) != 2:
            raise ValueError(f"{name} must be [k, v] (two [num_blocks, block_size, num_kv_heads] tensors), got "
                             f"{len(items)} tensors")
    return [_per_token(f"{name}[{i}]", t, key_cache, "key_cache", False) for i, t in enumerate(items)]


__all__ = ["LEVELS", "MIN_STEP_DIVISOR", "QUANT_BITS", "cache_head_size", "check_caches", "head_size_of",
           "kv_pair", "quant_bits_arg", "scales_zeros"]
