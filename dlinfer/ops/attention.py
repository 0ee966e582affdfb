"""Attention: varlen prefill, paged (chunked) prefill, paged decode.

Layouts shared by the three ops (LMDeploy's TND layout):

* queries are packed token-major: ``query[T, Hq, D]``, the tokens of sequence 0 first, then sequence 1, ...
* the paged KV cache of one layer is ``key_cache[num_blocks, block_size, Hk, D]`` and
  ``value_cache[num_blocks, block_size, Hk, Dv]`` (``Dv = head_size_v`` may differ from ``D``). Caches may be
  strided views of one packed buffer (last-dim stride 1); they are read in place.
* ``block_offsets[b, i]`` (the public argument's name, as in LMDeploy; the vendor contract receives it as
  ``block_table``) is the cache block holding tokens
  ``[i * block_size, (i + 1) * block_size)`` of sequence ``b``; blocks need not be ordered or contiguous.
  Entries past a sequence's last block are ignored.
* GQA/MQA: query head ``h`` reads KV head ``h // (Hq // Hk)``.
* A quantized cache (``quant_bits`` 8 or 4, LMDeploy's ``quant_policy``) is ``uint8``, with one scale and zero
  point per token and KV head beside it (``kv_scales``/``kv_zeros``); the paged ops dequantize as they read
  (layout: ``dlinfer.ops.kv_quant``).
* ``softmax_scale`` defaults to ``1 / sqrt(D)``.
* Lengths may be host or device tensors (LMDeploy's ``*_cpu`` arguments may arrive on the device); the
  ``max_*`` integers are upper bounds only, so a CUDA graph captured at one length replays at any length up
  to the bound. No op here syncs with the host unless ``DLINFER_CHECK=1``.
* A sequence of length 0 (batch padding under CUDA graphs) produces zeros.
* NaN in, NaN out: a NaN or Inf in a query row, or in a key or value that row can see, makes the row NaN
  (never zeros). Only rows that see no key at all (a zero-length sequence) are zero, decided by the lengths,
  not by the values. Cache slots past a sequence's length are never read. A NaN value at a position the causal
  mask hides may still reach earlier rows of the same sequence (as in torch's SDPA and FlashAttention).
* ``attn_output``, when given, is written in place (it may be a strided view, e.g. of the query buffer,
  last-dim stride 1) and returned; otherwise a new ``[T, Hq, Dv]`` tensor is returned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dlinfer.ops import _batch, _checks, kv_quant, table
from dlinfer.ops._dispatch import _dispatch_modes, _is_compiling, eager, run, selector
from dlinfer.ops.kv_cache import cache_call_features, cache_implementation, check_cache, plain_caches, unquantized


#: The largest ``softmax_scale`` accepted (typical scales are ``1/sqrt(D)``; beyond this, scale times a q.k
#: product overflows float32).
MAX_SOFTMAX_SCALE = 1e36


_CAUSAL, _NON_CAUSAL = frozenset(), frozenset({"non_causal"})


def _features(causal: bool) -> frozenset[str]:
    return _CAUSAL if causal else _NON_CAUSAL


# --------------------------------------------------------------------------------------------- custom ops
_select_prefill = selector("prefill_attention")


def _prefill_attention_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    max_q_seq_len: int,
    softmax_scale: float,
    causal: bool,
    attn_output: torch.Tensor,
) -> None:
    if (_checks.values_checked(cu_seqlens_q) if cu_seqlens_kv is cu_seqlens_q
            else _checks.values_checked(cu_seqlens_q, cu_seqlens_kv)):
        _check_varlen_values(query, key, cu_seqlens_q, cu_seqlens_kv, max_q_seq_len, causal)
    impl = _select_prefill(query, query.shape[2], value.shape[2], 0, _features(causal))
    impl(query, key, value, cu_seqlens_q, cu_seqlens_kv, max_q_seq_len, softmax_scale, causal, attn_output)


_prefill_attention = table.define("prefill_attention", _prefill_attention_impl)


def _paged_prefill_attention_impl(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_seqlens: torch.Tensor,
    max_q_seq_len: int,
    max_kv_seq_len: int,
    softmax_scale: float,
    causal: bool,
    attn_output: torch.Tensor,
    kv_scales: list[torch.Tensor],
    kv_zeros: list[torch.Tensor],
    quant_bits: int,
) -> None:
    if _checks.values_checked(cu_seqlens_q, kv_seqlens, block_table):
        _check_paged_values(query, key_cache, block_table, kv_seqlens, max_kv_seq_len, cu_seqlens_q, max_q_seq_len)
    impl = cache_implementation(
        "paged_prefill_attention", query, key_cache, value_cache, query.shape[-1], quant_bits,
        extra_features=_features(causal)
    )
    # the quantized-cache arguments only when the cache is quantized (the table's optional_args)
    quant = (kv_scales, kv_zeros, quant_bits) if quant_bits else ()
    impl(
        query,
        key_cache,
        value_cache,
        block_table,
        cu_seqlens_q,
        kv_seqlens,
        max_q_seq_len,
        max_kv_seq_len,
        softmax_scale,
        causal,
        attn_output,
        *quant,
    )


_paged_prefill_attention = table.define("paged_prefill_attention", _paged_prefill_attention_impl)


_select_decode = selector("paged_decode_attention")


def _paged_decode_attention_impl(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_seqlens: torch.Tensor,
    max_kv_seq_len: int,
    softmax_scale: float,
    attn_output: torch.Tensor,
    kv_scales: list[torch.Tensor],
    kv_zeros: list[torch.Tensor],
    quant_bits: int,
) -> None:
    if _checks.values_checked(kv_seqlens, block_table):
        _check_paged_values(query, key_cache, block_table, kv_seqlens, max_kv_seq_len)
    impl = _select_decode(query, query.shape[-1], kv_quant.head_size_of(value_cache, quant_bits), key_cache.shape[1],
                          cache_call_features(key_cache, quant_bits))
    quant = (kv_scales, kv_zeros, quant_bits) if quant_bits else ()  # the table's optional_args
    impl(query, key_cache, value_cache, block_table, kv_seqlens, max_kv_seq_len, softmax_scale, attn_output, *quant)


_paged_decode_attention = table.define("paged_decode_attention", _paged_decode_attention_impl)


# ------------------------------------------------------------------------------------------- value checks
def _starts(name: str, starts: torch.Tensor, rows: int, holder: str, verb: str = "ends at") -> torch.Tensor:
    """Value check of ``[B + 1]`` start offsets: from 0, non-decreasing, within the ``rows`` of ``holder``;
    returns the lengths. ``name`` is the public argument the offsets were built from."""
    starts = starts.to("cpu", torch.int64)
    if starts.numel() and int(starts[0]) != 0:
        raise ValueError(f"{name} must start at 0 ([B + 1] start offsets), got {int(starts[0])}")
    lens = starts[1:] - starts[:-1]
    if bool((lens < 0).any()):
        raise ValueError(f"{name} must be non-decreasing ([B + 1] start offsets)")
    if starts.numel() and int(starts[-1]) > rows:
        raise ValueError(f"{name} {verb} {int(starts[-1])} but {holder} holds {rows} tokens")
    return lens


def _check_varlen_values(query, key, cu_seqlens_q, cu_seqlens_kv, max_q_seq_len, causal) -> None:
    q_lens = _starts("q_seqlens", cu_seqlens_q, query.shape[0], "query", "sum to")
    kv_lens = _starts("kv_seqlens", cu_seqlens_kv, key.shape[0], "key", "sum to")
    _checks.in_range("q_seqlens", q_lens, 0, max_q_seq_len + 1, "query lengths up to max_q_seq_len")
    if causal and bool((q_lens > kv_lens).any()):
        raise ValueError("causal attention needs q_seqlens <= kv_seqlens for every sequence")


def _check_paged_values(
    query, key_cache, block_table, kv_seqlens, max_kv_seq_len, cu_seqlens_q=None, max_q_seq_len=None
) -> None:
    num_blocks, block_size = key_cache.shape[0], key_cache.shape[1]
    capacity = block_table.shape[1] * block_size
    _checks.in_range(
        "kv_seqlens",
        kv_seqlens,
        0,
        min(capacity, max_kv_seq_len) + 1,
        f"lengths within max_kv_seq_len ({max_kv_seq_len}) and block_offsets' capacity "
        f"({block_table.shape[1]} blocks x {block_size} = {capacity} tokens)",
    )
    kv = kv_seqlens.to("cpu", torch.int64)
    table = block_table.to("cpu", torch.int64)
    used = torch.arange(table.shape[1]) < ((kv + block_size - 1) // block_size)[:, None]
    _checks.in_range("block_offsets", table[used], 0, num_blocks, f"block ids of a cache of {num_blocks} blocks")
    if cu_seqlens_q is not None:
        lens = _starts("cu_seqlens_q", cu_seqlens_q, query.shape[0], "query")
        if bool((lens > max_q_seq_len).any()):
            raise ValueError(f"a query length exceeds max_q_seq_len ({max_q_seq_len})")
        if bool((lens > kv).any()):
            raise ValueError("every sequence needs q_len <= kv_seqlens (kv_seqlens counts history + new tokens)")


# --------------------------------------------------------------------------------------- metadata checks
def _queries(query, num_q_heads: int, name: str = "query") -> torch.Tensor:
    _checks.tensor(name, query, ndim=(2, 3), dtypes=_checks.FLOAT_DTYPES)
    if query.dim() == 2:
        if query.shape[1] % num_q_heads:
            raise ValueError(f"{name} of shape {tuple(query.shape)} cannot be split into {num_q_heads} heads")
        query = query.view(query.shape[0], num_q_heads, query.shape[1] // num_q_heads)  # 0 tokens too
    _checks.dim_is(name, query, 1, num_q_heads, "num_q_heads")
    if query.shape[2] == 0:
        raise ValueError(f"{name} must have a head size >= 1, got shape {tuple(query.shape)}")
    _checks.last_dim_contiguous(name, query)
    return query


def _lengths(name: str, t, batch: int | None = None) -> torch.Tensor:
    _checks.tensor(name, t, ndim=1, dtypes=_checks.INDEX_DTYPES)
    if batch is not None:
        _checks.dim_is(name, t, 0, batch, "the batch size")
    return t


def _on_device(name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Lengths may come from the host (LMDeploy's ``*_cpu`` arguments); other devices are an error."""
    if t.device != device and t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; it must be on the host or on query's device {device}")
    return t


def _scale(softmax_scale, head_size: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_size)
    scale = _checks.number("softmax_scale", softmax_scale)
    if not 0 < scale <= MAX_SOFTMAX_SCALE:
        raise ValueError(f"softmax_scale must be in (0, {MAX_SOFTMAX_SCALE:g}], got {scale} (larger scales overflow "
                         "the float32 scores of every vendor)")
    return scale


def _output(attn_output, query: torch.Tensor, head_size_v: int) -> torch.Tensor:
    tokens, num_heads = query.shape[0], query.shape[1]
    if attn_output is None:  # zeros: rows past the last sequence (padding) are never written by a vendor
        return query.new_zeros(tokens, num_heads, head_size_v)
    _checks.tensor("attn_output", attn_output, dtypes=(query.dtype,))
    if attn_output.dim() == 2 and attn_output.shape == (tokens, num_heads * head_size_v):
        attn_output = attn_output.view(tokens, num_heads, head_size_v)
    if tuple(attn_output.shape) != (tokens, num_heads, head_size_v):
        raise ValueError(
            f"attn_output must have shape [{tokens}, {num_heads}, {head_size_v}] "
            f"(or [{tokens}, {num_heads * head_size_v}]), got {tuple(attn_output.shape)}"
        )
    _checks.last_dim_contiguous("attn_output", attn_output)
    if attn_output.device != query.device:
        raise ValueError(f"attn_output is on {attn_output.device} but query is on {query.device}")
    return attn_output


def _paged_common(query, key_cache, value_cache, kv_scales, kv_zeros, quant_bits):
    """The metadata checks both paged ops share; returns ``query`` (3-D), the value head size, the quant bits and
    the vendor's ``kv_scales``/``kv_zeros`` (``[k, v]`` views with a quantized cache, else empty lists)."""
    num_q_heads = _heads_of("query", query)
    _checks.tensor("key_cache", key_cache, ndim=4)
    _checks.tensor("value_cache", value_cache, ndim=4)
    _checks.heads(num_q_heads, key_cache.shape[2])
    query = _queries(query, num_q_heads)
    quant_bits = kv_quant.quant_bits_arg(quant_bits)
    head_size_v = kv_quant.head_size_of(value_cache, quant_bits)
    check_cache(key_cache, value_cache, key_cache.shape[2], kv_quant.cache_head_size(query.shape[-1], quant_bits),
                value_cache.shape[-1], key_cache.shape[1])
    if not quant_bits:
        _checks.same_dtype(query=query, key_cache=key_cache, value_cache=value_cache)
        return query, head_size_v, 0, [], []
    kv_quant.check_caches(key_cache, value_cache, quant_bits)
    scales = kv_quant.kv_pair("kv_scales", kv_scales, key_cache)
    zeros = kv_quant.kv_pair("kv_zeros", kv_zeros, key_cache)
    return query, head_size_v, quant_bits, scales, zeros


def _causal(attn_mask) -> bool:
    if attn_mask is None or isinstance(attn_mask, torch.Tensor):
        raise TypeError(
            f"attn_mask must be a sequence ([] for non-causal, non-empty for causal), got {type(attn_mask).__name__}"
        )
    return len(attn_mask) > 0


def _heads_of(name: str, t) -> int:
    """The head count of a ``[T, H, D]`` tensor (the clean contract takes 3-D tensors)."""
    _checks.tensor(name, t, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    return t.shape[1]


def _offsets(name: str, t, device: torch.device, batch: int | None = None) -> torch.Tensor:
    """An int32 index tensor of the contract's layout on ``device`` (``[B + 1]`` offsets or ``[B]`` lengths)."""
    _checks.tensor(name, t, ndim=1, dtypes=(torch.int32,))
    if batch is not None:
        _checks.dim_is(name, t, 0, batch, "the batch size" if name == "kv_seqlens" else "len(cu_seqlens_q)")
    elif t.shape[0] == 0:
        raise ValueError(f"{name} must hold B + 1 start offsets (at least one element), got shape (0,)")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}; the contract's layout lives on query's device {device}")
    return t


def _lmdeploy_paged(query, key_cache, value_cache, block_size, num_q_heads, num_kv_heads, head_size_v, quant_bits):
    """What LMDeploy's paged signatures add to the clean contract: the head counts (and a 2-D query), the block
    size, ``head_size_v`` and ``quant_bits``, each checked against the tensors; returns ``query`` as 3-D."""
    _checks.heads(num_q_heads, num_kv_heads)
    quant_bits = kv_quant.quant_bits_arg(quant_bits)
    query = _queries(query, num_q_heads)
    _checks.tensor("key_cache", key_cache, ndim=4)
    _checks.tensor("value_cache", value_cache, ndim=4)
    _checks.dim_is("key_cache", key_cache, 2, num_kv_heads, "num_kv_heads")
    block_size = _checks.integer("block_size", block_size, minimum=1)
    if key_cache.shape[1] != block_size:
        raise ValueError(f"block_size ({block_size}) must equal key_cache.shape[1] (caches are [num_blocks, "
                         f"block_size, num_kv_heads, head_size]), got cache shape {tuple(key_cache.shape)}")
    if head_size_v is not None:
        head_size_v = _checks.integer("head_size_v", head_size_v, minimum=1)
        _checks.dim_is("value_cache", value_cache, 3, kv_quant.cache_head_size(head_size_v, quant_bits, "value"),
                       "the value head size" + (" / 2 (two 4-bit values per byte)" if quant_bits == 4 else ""))
    return query


def _block_table(block_table, batch: int) -> torch.Tensor:
    _checks.tensor("block_offsets", block_table, ndim=2, dtypes=_checks.INDEX_DTYPES)
    _checks.dim_is("block_offsets", block_table, 0, batch, "the batch size (len(kv_seqlens))")
    return block_table


# -------------------------------------------------------------------------------------- eager fast paths
# The common call of each LMDeploy-shaped wrapper (eager mode, plain tensors, 3-D query, unquantized cache),
# checked in one pass. Each ``_plain_*`` function either runs the op and returns its output, or returns None
# having run nothing, and the wrapper's named checks decide (they give the errors). It accepts nothing those
# checks refuse: only what they pass, with stricter conditions where that is cheaper (a float softmax_scale,
# last-dim stride 1).
_FLOATS, _INDEX, _I32 = _checks.FLOAT_DTYPES, _checks.INDEX_DTYPES, torch.int32
_Tensor = torch.Tensor
_MASKS = (list, tuple)


def _dims(t, n: int) -> bool:
    return isinstance(t, _Tensor) and t.dim() == n


def _contract_layout(t: torch.Tensor, device: torch.device) -> bool:
    """int32 on query's device: the contract's offsets and lengths (what :func:`_offsets` accepts)."""
    return t.dtype is _I32 and t.device == device


def _plain_heads(num_q_heads, num_kv_heads) -> bool:
    return (type(num_q_heads) is int and type(num_kv_heads) is int and num_q_heads >= 1 and num_kv_heads >= 1
            and not num_q_heads % num_kv_heads)


def _plain_lengths(t) -> bool:
    return isinstance(t, _Tensor) and t.dim() == 1 and t.dtype in _INDEX


def _near(t: torch.Tensor, device: torch.device) -> bool:
    """On ``device`` or the host (what :func:`_on_device` accepts)."""
    return t.is_cpu or t.device == device


def _plain_scale(softmax_scale, head_size: int) -> float:
    """The scale :func:`_scale` returns, or 0.0 when it must decide."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_size)
    if type(softmax_scale) is float and 0.0 < softmax_scale <= MAX_SOFTMAX_SCALE:
        return softmax_scale
    return 0.0


def _plain_output(attn_output, query: torch.Tensor, shape: tuple[int, int, int], device: torch.device):
    """What :func:`_output` returns for a 3-D or absent ``attn_output``, or None when it must decide."""
    if attn_output is None:
        return query.new_zeros(shape)
    if (isinstance(attn_output, _Tensor) and attn_output.dtype is query.dtype and attn_output.shape == shape
            and attn_output.stride()[-1] == 1 and attn_output.device == device):
        return attn_output
    return None


def _plain_paged(query, key_cache, value_cache, block_table, block_size, num_q_heads, num_kv_heads, head_size_v,
                 quant_bits, lengths, batch: int | None) -> int:
    """The metadata both paged wrappers share: returns the value head size, or 0. ``batch`` is the number of
    sequences (``None``: one query token each, decode); ``lengths`` the ``[B]`` KV lengths."""
    if not (unquantized(quant_bits) and eager(query) and _plain_heads(num_q_heads, num_kv_heads)
            and query.dim() == 3 and type(block_size) is int and block_size > 0 and _plain_lengths(lengths)
            and isinstance(block_table, _Tensor) and block_table.dim() == 2 and block_table.dtype in _INDEX):
        return 0
    dtype, device = query.dtype, query.device
    tokens, heads, head_size = query.shape
    batch = tokens if batch is None else batch
    if not (dtype in _FLOATS and heads == num_q_heads and head_size > 0 and query.stride()[-1] == 1
            and lengths.shape[0] == batch and block_table.shape[0] == batch and block_table.device == device
            and _near(lengths, device)):
        return 0
    head_size_v_cache = plain_caches(key_cache, value_cache, dtype, device, num_kv_heads, head_size)
    if (not head_size_v_cache or key_cache.shape[1] != block_size
            or (head_size_v is not None and (type(head_size_v) is not int or head_size_v != head_size_v_cache))):
        return 0
    return head_size_v_cache


def _plain_decode(query, key_cache, value_cache, block_offsets, block_size, kv_seqlens, max_kv_seq_len,
                  num_q_heads, num_kv_heads, head_size_v, softmax_scale, attn_output, quant_bits, contract=False):
    """``kv_seqlens``: host or device, int32 or int64 (converted); with ``contract``, int32 on query's device."""
    if not (type(max_kv_seq_len) is int and max_kv_seq_len >= 0):
        return None
    dv = _plain_paged(query, key_cache, value_cache, block_offsets, block_size, num_q_heads, num_kv_heads,
                      head_size_v, quant_bits, kv_seqlens, None)
    if dv and contract and not _contract_layout(kv_seqlens, query.device):
        return None
    scale = _plain_scale(softmax_scale, query.shape[2]) if dv else 0.0
    out = _plain_output(attn_output, query, (query.shape[0], num_q_heads, dv), query.device) if scale else None
    if out is None:
        return None
    kv_seqlens = _batch.lengths_on(kv_seqlens, query.device)
    _paged_decode_attention_impl(query, key_cache, value_cache, block_offsets, kv_seqlens, max_kv_seq_len, scale, out,
                                 [], [], 0)
    return out


def _plain_paged_prefill(query, key_cache, value_cache, block_offsets, block_size, cu_seqlens_q, kv_seqlens,
                         max_q_seq_len, max_kv_seq_len, num_q_heads, num_kv_heads, causal, head_size_v,
                         softmax_scale, attn_output, quant_bits, contract=False):
    """``cu_seqlens_q``: LMDeploy's ``[B]`` cumulative ends and ``[B]`` lengths, host or device (converted); with
    ``contract``, the contract's int32 ``[B + 1]`` offsets and ``[B]`` lengths on query's device."""
    if not (type(max_q_seq_len) is int and type(max_kv_seq_len) is int and max_q_seq_len >= 0
            and max_kv_seq_len >= 0 and _plain_lengths(cu_seqlens_q)):
        return None
    batch = cu_seqlens_q.shape[0] - 1 if contract else cu_seqlens_q.shape[0]
    dv = _plain_paged(query, key_cache, value_cache, block_offsets, block_size, num_q_heads, num_kv_heads,
                      head_size_v, quant_bits, kv_seqlens, batch)
    device = query.device if dv else None
    if not dv or not (_contract_layout(cu_seqlens_q, device) and _contract_layout(kv_seqlens, device) if contract
                      else _near(cu_seqlens_q, device)):
        return None
    scale = _plain_scale(softmax_scale, query.shape[2])
    out = _plain_output(attn_output, query, (query.shape[0], num_q_heads, dv), device) if scale else None
    if out is None:
        return None
    if not contract:
        cu_seqlens_q = _batch.starts_from_ends(cu_seqlens_q, device)
        kv_seqlens = _batch.lengths_on(kv_seqlens, device)
    _paged_prefill_attention_impl(query, key_cache, value_cache, block_offsets, cu_seqlens_q, kv_seqlens,
                                  max_q_seq_len, max_kv_seq_len, scale, bool(causal), out, [], [], 0)
    return out


def _plain_prefill(query, key, value, q_seqlens, kv_seqlens, max_q_seq_len, num_q_heads, num_kv_heads, causal,
                   softmax_scale, attn_output, contract=False):
    """``q_seqlens``/``kv_seqlens``: LMDeploy's ``[B]`` lengths, host or device (converted); with ``contract``, the
    contract's int32 ``[B + 1]`` offsets on query's device.

    Time to first token runs this eagerly once per layer, so it reads each attribute once and calls no helper it
    can inline (each tensor attribute costs ~0.1 µs here and several times that on a busy serving host)."""
    if not (type(query) is _Tensor and type(key) is _Tensor and type(value) is _Tensor
            and type(q_seqlens) is _Tensor and type(kv_seqlens) is _Tensor and type(max_q_seq_len) is int
            and max_q_seq_len >= 0 and _plain_heads(num_q_heads, num_kv_heads) and not query.is_meta
            and not _is_compiling() and not _dispatch_modes()):
        return None
    qs, ks, vs, ls, kls = query.shape, key.shape, value.shape, q_seqlens.shape, kv_seqlens.shape
    if not (len(qs) == 3 and len(ks) == 3 and len(vs) == 3 and len(ls) == 1 and ls == kls):
        return None
    dtype, device = query.dtype, query.device
    tokens, heads, head_size = qs
    kv_tokens, kv_heads, key_size = ks
    if not (dtype in _FLOATS and key.dtype is dtype and value.dtype is dtype and heads == num_q_heads
            and kv_heads == num_kv_heads and head_size > 0 and key_size == head_size and vs[0] == kv_tokens
            and vs[1] == kv_heads and vs[2] > 0 and query.stride()[2] == 1 and key.stride()[2] == 1
            and value.stride()[2] == 1 and key.device == device and value.device == device):
        return None
    same = kv_seqlens is q_seqlens
    if contract:
        if not (ls[0] > 0 and q_seqlens.dtype is _I32 and q_seqlens.device == device
                and (same or (kv_seqlens.dtype is _I32 and kv_seqlens.device == device))):
            return None
    elif not (q_seqlens.dtype in _INDEX and (q_seqlens.is_cpu or q_seqlens.device == device)
              and (same or (kv_seqlens.dtype in _INDEX and (kv_seqlens.is_cpu or kv_seqlens.device == device)))):
        return None
    scale = _plain_scale(softmax_scale, head_size)
    out = _plain_output(attn_output, query, (tokens, heads, vs[2]), device) if scale else None
    if out is None:
        return None
    if contract:
        cu_seqlens_q, cu_seqlens_kv = q_seqlens, kv_seqlens
    else:
        cu_seqlens_q = _batch.starts_from_lengths(q_seqlens, device)
        cu_seqlens_kv = cu_seqlens_q if same else _batch.starts_from_lengths(kv_seqlens, device)
    _prefill_attention_impl(query, key, value, cu_seqlens_q, cu_seqlens_kv, max_q_seq_len, scale, bool(causal), out)
    return out


# ----------------------------------------------------------------------------------------- public wrappers
def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor | None,
    value_cache: torch.Tensor | None,
    q_seqlens: torch.Tensor,
    kv_seqlens: torch.Tensor,
    max_q_seq_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    attn_mask: Sequence[torch.Tensor | None],
    softmax_scale: float | None = None,
    attn_output: torch.Tensor | None = None,
    actual_seq_lengths_cpu: torch.Tensor | None = None,
) -> torch.Tensor:
    """Variable-length attention over new tokens only (no history in the cache).

    Sequence ``b`` has ``q_seqlens[b]`` query tokens and ``kv_seqlens[b]`` key/value tokens, packed one
    sequence after the other in ``query`` and ``key``/``value``. Causal attention aligns the ends (query ``i``
    sees keys ``j <= i + kv_len - q_len``), so ``q_seqlens == kv_seqlens`` is the usual LLM prefill.

    Args:
        query: ``[T, Hq, D]`` (or ``[T, Hq * D]``), float32/float16/bfloat16.
        key: ``[Tk, Hk, D]``; value: ``[Tk, Hk, Dv]``.
        key_cache, value_cache: accepted for LMDeploy's signature and ignored (the new tokens are attended
            from ``key``/``value``; ``fill_kv_cache`` writes the cache).
        q_seqlens, kv_seqlens: ``[B]`` int32/int64 lengths (not cumulative), host or device.
        max_q_seq_len: upper bound of ``q_seqlens``.
        num_q_heads, num_kv_heads: ``Hq`` and ``Hk``; ``Hq % Hk == 0``.
        attn_mask: a non-empty sequence means causal (LLM) attention; ``[]`` means non-causal (vision
            encoders). Mask tensors themselves are not read.
        softmax_scale: default ``1/sqrt(D)``; at most ``MAX_SOFTMAX_SCALE`` (1e36).
        attn_output: optional ``[T, Hq, Dv]`` destination; rows past ``sum(q_seqlens)`` (padding) are zeros in a
            new output and left unwritten in a given one.
        actual_seq_lengths_cpu: cumulative query ends as LMDeploy passes them; not needed and ignored.

    Returns:
        ``attn_output`` (given or new), ``[T, Hq, Dv]``.
    """
    out = None if type(attn_mask) not in _MASKS else _plain_prefill(
        query, key, value, q_seqlens, kv_seqlens, max_q_seq_len, num_q_heads, num_kv_heads, len(attn_mask) > 0,
        softmax_scale, attn_output)
    if out is not None:
        return out
    _checks.heads(num_q_heads, num_kv_heads)
    query = _queries(query, num_q_heads)
    key = _queries(key, num_kv_heads, "key")
    value = _queries(value, num_kv_heads, "value")
    q_seqlens = _lengths("q_seqlens", q_seqlens)
    kv_seqlens = _lengths("kv_seqlens", kv_seqlens, q_seqlens.shape[0])
    causal = _causal(attn_mask)
    cu_seqlens_q = _batch.starts_from_lengths(_on_device("q_seqlens", q_seqlens, query.device), query.device)
    cu_seqlens_kv = _batch.starts_from_lengths(_on_device("kv_seqlens", kv_seqlens, query.device), query.device)
    return varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_kv, max_q_seq_len,
                            softmax_scale=softmax_scale, causal=causal, attn_output=attn_output)


def paged_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_offsets: torch.Tensor,
    block_size: int,
    cu_seqlens_q: torch.Tensor,
    kv_seqlens: torch.Tensor,
    max_q_seq_len: int,
    max_kv_seq_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    attn_mask: Sequence[torch.Tensor | None],
    head_size_v: int | None = None,
    softmax_scale: float | None = None,
    attn_output: torch.Tensor | None = None,
    kv_scales: torch.Tensor | None = None,
    kv_zeros: torch.Tensor | None = None,
    quant_bits: int | None = 0,
) -> torch.Tensor:
    """Chunked prefill: new queries attend to their sequence's history and themselves, all from the cache.

    The new tokens' keys and values must already be in the cache (``fill_kv_cache`` first). Sequence ``b``'s
    queries are ``query[cu_seqlens_q[b-1]:cu_seqlens_q[b]]`` (0 for ``b = 0``), and they are the LAST
    ``q_len_b`` of its ``kv_seqlens[b]`` tokens: query ``i`` sits at position ``kv_len - q_len + i`` and, when
    causal, sees cache positions ``0 ..`` that position.

    Args:
        query: ``[T, Hq, D]``; output rows past ``cu_seqlens_q[-1]`` (padding) are zeros in a new output and
            left unwritten in a given ``attn_output``.
        key, value: the new tokens (LMDeploy passes them); not read, the cache holds them.
        key_cache, value_cache: ``[num_blocks, block_size, Hk, D]`` / ``[..., Dv]``, possibly strided views.
        block_offsets: ``[B, max_blocks]`` int32/int64 block table.
        block_size: tokens per block, equal to ``key_cache.shape[1]``.
        cu_seqlens_q: ``[B]`` cumulative query END of each sequence (``cu_seqlens[1:]``), not lengths.
        kv_seqlens: ``[B]`` total tokens per sequence (history + new), host or device.
        max_q_seq_len, max_kv_seq_len: upper bounds of the query and KV lengths.
        num_q_heads, num_kv_heads: ``Hq``, ``Hk``.
        attn_mask: non-empty = causal, ``[]`` = non-causal.
        head_size_v: ``Dv``; defaults to the value cache's (``value_cache.shape[-1]``, twice that for 4 bits).
        softmax_scale: default ``1/sqrt(D)``; at most ``MAX_SOFTMAX_SCALE`` (1e36).
        attn_output: optional ``[T, Hq, Dv]`` destination.
        kv_scales, kv_zeros, quant_bits: ``quant_bits=0``: float caches (the scales are not read). 8 or 4
            (LMDeploy's ``quant_policy``): ``uint8`` caches as ``fill_kv_cache`` writes them, dequantized as they
            are read (``(q - zero) * scale``); ``kv_scales`` is ``[k_scales, v_scales]`` (two ``[num_blocks,
            block_size, Hk]`` float tensors, or one ``[2, num_blocks, block_size, Hk]``), ``kv_zeros``
            likewise (``dlinfer.ops.kv_quant``).

    Returns:
        ``attn_output`` (given or new).
    """
    out = None if type(attn_mask) not in _MASKS else _plain_paged_prefill(
        query, key_cache, value_cache, block_offsets, block_size, cu_seqlens_q, kv_seqlens, max_q_seq_len,
        max_kv_seq_len, num_q_heads, num_kv_heads, len(attn_mask) > 0, head_size_v, softmax_scale, attn_output,
        quant_bits)
    if out is not None:
        return out
    query = _lmdeploy_paged(query, key_cache, value_cache, block_size, num_q_heads, num_kv_heads, head_size_v,
                            quant_bits)
    cu_seqlens_q = _lengths("cu_seqlens_q", cu_seqlens_q)
    kv_seqlens = _lengths("kv_seqlens", kv_seqlens, cu_seqlens_q.shape[0])
    causal = _causal(attn_mask)
    cu_seqlens_q = _batch.starts_from_ends(_on_device("cu_seqlens_q", cu_seqlens_q, query.device), query.device)
    kv_seqlens = _batch.lengths_on(_on_device("kv_seqlens", kv_seqlens, query.device), query.device)
    return paged_prefill(query, key_cache, value_cache, block_offsets, cu_seqlens_q, kv_seqlens, max_q_seq_len,
                         max_kv_seq_len, softmax_scale=softmax_scale, causal=causal, attn_output=attn_output,
                         kv_scales=kv_scales, kv_zeros=kv_zeros, quant_bits=quant_bits)


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_offsets: torch.Tensor,
    block_size: int,
    cu_seqlens_q: torch.Tensor | None,
    kv_seqlens: torch.Tensor,
    max_kv_seq_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_size_v: int | None = None,
    softmax_scale: float | None = None,
    attn_output: torch.Tensor | None = None,
    kv_scales: torch.Tensor | None = None,
    kv_zeros: torch.Tensor | None = None,
    quant_bits: int | None = 0,
) -> torch.Tensor:
    """Decode: one new query token per sequence attends to its whole sequence in the paged cache.

    Args:
        query: ``[B, Hq, D]`` (or ``[B, Hq * D]``), one token per sequence.
        key_cache, value_cache: ``[num_blocks, block_size, Hk, D]`` / ``[..., Dv]``, possibly strided views;
            the new token's key/value are already in them.
        block_offsets: ``[B, max_blocks]`` int32/int64 block table.
        block_size: tokens per block, equal to ``key_cache.shape[1]``.
        cu_seqlens_q: LMDeploy's cumulative query ends (``1..B`` for decode); accepted and not read.
        kv_seqlens: ``[B]`` tokens per sequence including the new one, host or device; 0 (a padded batch
            slot) gives a zero output row.
        max_kv_seq_len: upper bound of ``kv_seqlens``.
        num_q_heads, num_kv_heads: ``Hq``, ``Hk``.
        head_size_v: ``Dv``; defaults to the value cache's (``value_cache.shape[-1]``, twice that for 4 bits).
        softmax_scale: default ``1/sqrt(D)``; at most ``MAX_SOFTMAX_SCALE`` (1e36).
        attn_output: optional ``[B, Hq, Dv]`` destination.
        kv_scales, kv_zeros, quant_bits: a quantized cache, as in ``paged_prefill_attention``.

    Returns:
        ``attn_output`` (given or new).
    """
    out = _plain_decode(query, key_cache, value_cache, block_offsets, block_size, kv_seqlens, max_kv_seq_len,
                        num_q_heads, num_kv_heads, head_size_v, softmax_scale, attn_output, quant_bits)
    if out is not None:
        return out
    query = _lmdeploy_paged(query, key_cache, value_cache, block_size, num_q_heads, num_kv_heads, head_size_v,
                            quant_bits)
    kv_seqlens = _lengths("kv_seqlens", kv_seqlens, query.shape[0])
    kv_seqlens = _batch.lengths_on(_on_device("kv_seqlens", kv_seqlens, query.device), query.device)
    return paged_decode(query, key_cache, value_cache, block_offsets, kv_seqlens, max_kv_seq_len,
                        softmax_scale=softmax_scale, attn_output=attn_output, kv_scales=kv_scales, kv_zeros=kv_zeros,
                        quant_bits=quant_bits)


# ------------------------------------------------------------------------------------ the clean contract
def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    max_q_seq_len: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
    attn_output: torch.Tensor | None = None,
) -> torch.Tensor:
    """``prefill_attention`` in the vendor contract's layout, for adapters that build it once per step.

    Args:
        query: ``[T, Hq, D]``; key: ``[Tk, Hk, D]``; value: ``[Tk, Hk, Dv]`` (``Hq % Hk == 0``).
        cu_seqlens_q, cu_seqlens_kv: int32 ``[B + 1]`` start offsets on query's device, ``[0] == 0``.
        max_q_seq_len: upper bound of the query lengths.
        softmax_scale: default ``1/sqrt(D)``; causal: ends-aligned causal mask (``False`` for encoders).
        attn_output: optional ``[T, Hq, Dv]`` (or ``[T, Hq * Dv]``) destination.

    Returns:
        ``attn_output`` (given or new).
    """
    if _dims(query, 3) and _dims(key, 3):
        out = _plain_prefill(query, key, value, cu_seqlens_q, cu_seqlens_kv, max_q_seq_len, query.shape[1],
                             key.shape[1], causal, softmax_scale, attn_output, contract=True)
        if out is not None:
            return out
    query = _queries(query, _heads_of("query", query))
    key = _queries(key, _heads_of("key", key), "key")
    value = _queries(value, key.shape[1], "value")
    _checks.heads(query.shape[1], key.shape[1])
    _checks.same_dtype(query=query, key=key, value=value)
    _checks.dim_is("key", key, 2, query.shape[2], "query's head size")
    _checks.dim_is("value", value, 0, key.shape[0], "the number of key tokens")
    _checks.same_device(query=query, key=key, value=value)
    cu_seqlens_q = _offsets("cu_seqlens_q", cu_seqlens_q, query.device)
    cu_seqlens_kv = _offsets("cu_seqlens_kv", cu_seqlens_kv, query.device, cu_seqlens_q.shape[0])
    max_q_seq_len = _checks.integer("max_q_seq_len", max_q_seq_len, minimum=0)
    scale = _scale(softmax_scale, query.shape[-1])
    out = _output(attn_output, query, value.shape[-1])
    run(_prefill_attention, _prefill_attention_impl, query, key, value, cu_seqlens_q, cu_seqlens_kv, max_q_seq_len,
        scale, bool(causal), out)
    return out if attn_output is None or attn_output.dim() == 3 else attn_output


def paged_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_seqlens: torch.Tensor,
    max_q_seq_len: int,
    max_kv_seq_len: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
    attn_output: torch.Tensor | None = None,
    kv_scales=None,
    kv_zeros=None,
    quant_bits: int = 0,
) -> torch.Tensor:
    """``paged_prefill_attention`` in the vendor contract's layout (``cu_seqlens_q`` int32 ``[B + 1]`` start
    offsets, ``kv_seqlens`` int32 ``[B]``, both on query's device); see that op for the semantics."""
    if _dims(query, 3) and _dims(key_cache, 4):
        out = _plain_paged_prefill(query, key_cache, value_cache, block_table, key_cache.shape[1], cu_seqlens_q,
                                   kv_seqlens, max_q_seq_len, max_kv_seq_len, query.shape[1], key_cache.shape[2],
                                   causal, None, softmax_scale, attn_output, quant_bits, contract=True)
        if out is not None:
            return out
    query, head_size_v, quant_bits, kv_scales, kv_zeros = _paged_common(query, key_cache, value_cache, kv_scales,
                                                                        kv_zeros, quant_bits)
    cu_seqlens_q = _offsets("cu_seqlens_q", cu_seqlens_q, query.device)
    kv_seqlens = _offsets("kv_seqlens", kv_seqlens, query.device, cu_seqlens_q.shape[0] - 1)
    block_table = _block_table(block_table, kv_seqlens.shape[0])
    max_q_seq_len = _checks.integer("max_q_seq_len", max_q_seq_len, minimum=0)
    max_kv_seq_len = _checks.integer("max_kv_seq_len", max_kv_seq_len, minimum=0)
    scale = _scale(softmax_scale, query.shape[-1])
    out = _output(attn_output, query, head_size_v)
    _checks.same_device(query=query, key_cache=key_cache, block_offsets=block_table)
    run(_paged_prefill_attention, _paged_prefill_attention_impl, query, key_cache, value_cache, block_table,
        cu_seqlens_q, kv_seqlens, max_q_seq_len, max_kv_seq_len, scale, bool(causal), out, kv_scales, kv_zeros,
        quant_bits)
    return out if attn_output is None or attn_output.dim() == 3 else attn_output


def paged_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_seqlens: torch.Tensor,
    max_kv_seq_len: int,
    *,
    softmax_scale: float | None = None,
    attn_output: torch.Tensor | None = None,
    kv_scales=None,
    kv_zeros=None,
    quant_bits: int = 0,
) -> torch.Tensor:
    """``paged_decode_attention`` in the vendor contract's layout (``kv_seqlens`` int32 ``[B]`` on query's
    device); see that op for the semantics."""
    if _dims(query, 3) and _dims(key_cache, 4):
        out = _plain_decode(query, key_cache, value_cache, block_table, key_cache.shape[1], kv_seqlens, max_kv_seq_len,
                            query.shape[1], key_cache.shape[2], None, softmax_scale, attn_output, quant_bits,
                            contract=True)
        if out is not None:
            return out
    query, head_size_v, quant_bits, kv_scales, kv_zeros = _paged_common(query, key_cache, value_cache, kv_scales,
                                                                        kv_zeros, quant_bits)
    kv_seqlens = _offsets("kv_seqlens", kv_seqlens, query.device, query.shape[0])
    block_table = _block_table(block_table, query.shape[0])
    max_kv_seq_len = _checks.integer("max_kv_seq_len", max_kv_seq_len, minimum=0)
    scale = _scale(softmax_scale, query.shape[-1])
    out = _output(attn_output, query, head_size_v)
    _checks.same_device(query=query, key_cache=key_cache, block_offsets=block_table)
    run(_paged_decode_attention, _paged_decode_attention_impl, query, key_cache, value_cache, block_table,
        kv_seqlens, max_kv_seq_len, scale, out, kv_scales, kv_zeros, quant_bits)
    return out if attn_output is None or attn_output.dim() == 3 else attn_output
