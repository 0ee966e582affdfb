"""An independent float64 oracle of every op of the contract (``dlinfer.ops.CORE_OPS`` + ``EXTRA_OPS``).

Written from the op definitions, not from ``dlinfer/vendor/reference`` (which computes in float32 with
batched einsums): here every op is plain float64 math, attention over each sequence's keys
gathered token by token from the block table, MoE expert by expert.

Two layers:

* dense helpers (``silu_and_mul_64``, ``rms_norm_64``, ``rotary_64``, ``attention_64``, ``gather_tokens``,
  ``moe_64``) take tensors of any floating dtype and return float64 results; the core tests use them;
* ``OPS``: one function per op with the vendor signature (the arguments the custom op passes to a vendor's
  implementation, as in ``dlinfer/vendor/<name>/``). They compute in float64 and write in place where the
  op does (rotary into ``query``/``key``, caches, ``attn_output``); given float64 tensors they are the float64
  oracle. :func:`upcast_op` wraps one so it takes tensors of any dtype: floating inputs are copied to
  float64, the oracle runs, results are cast back and in-place arguments written back (what the conformance
  kit runs for ``dlinfer check --vendor reference``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

F64 = torch.float64


# ------------------------------------------------------------------------------------------ dense math
def silu_and_mul_64(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` with ``d = x.shape[-1] // 2``."""
    d = x.shape[-1] // 2
    gate, up = x[..., :d].to(F64), x[..., d:].to(F64)
    return gate / (1.0 + torch.exp(-gate)) * up


def rms_norm_64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.to(F64)
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w.to(F64)


def rotary_64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary of ``x [T, H, D]`` with ``cos``/``sin [T, D]``: first half pairs with second half."""
    x = x.to(F64)
    h = x.shape[-1] // 2
    c, s = cos.to(F64)[:, None, :], sin.to(F64)[:, None, :]
    out = torch.empty_like(x)
    out[..., :h] = x[..., :h] * c[..., :h] - x[..., h:] * s[..., :h]
    out[..., h:] = x[..., h:] * c[..., h:] + x[..., :h] * s[..., h:]
    return out


def attention_64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """q ``[Lq, Hq, D]``, k ``[Lk, Hk, D]``, v ``[Lk, Hk, Dv]`` -> ``[Lq, Hq, Dv]`` float64.

    Causal aligns the ends (query i sees keys ``j <= i + Lk - Lq``); a query that sees no key gives zeros.
    NaN in, NaN out: a NaN or infinite score among a query's visible keys (NaN/Inf in the query, in a key it
    sees, or an overflowing product) makes its row NaN, as the softmax's definition does; values are never
    used to decide which rows are empty.
    """
    lq, hq, _ = q.shape
    lk, hk, dv = v.shape
    if lq == 0 or lk == 0:
        return torch.zeros(lq, hq, dv, dtype=F64, device=q.device)
    group = hq // hk  # query head h reads key/value head h // group
    q4 = q.to(F64).reshape(lq, hk, group, -1)
    scores = torch.einsum("igkd,jgd->gkij", q4, k.to(F64)) * scale  # [Hk, group, Lq, Lk]
    last_visible = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
    if causal:
        scores = scores.masked_fill(torch.arange(lk, device=q.device)[None, :] > last_visible, -math.inf)
        seen = last_visible >= 0  # [Lq, 1]: rows with at least one visible key (by position)
    else:
        seen = torch.ones_like(last_visible, dtype=torch.bool)
    top = scores.max(dim=-1, keepdim=True).values  # NaN if any visible score is NaN
    p = torch.exp(scores - torch.where(seen, top, torch.zeros_like(top)))
    p = torch.where(seen, p / p.sum(dim=-1, keepdim=True), torch.zeros_like(p))
    out = torch.einsum("gkij,jgd->igkd", p, v.to(F64))  # [Lq, Hk, group, Dv]
    return out.reshape(lq, hq, dv)


def gather_tokens(cache: torch.Tensor, table_row: torch.Tensor, length: int, scales_zeros=None,
                  quant_bits: int = 0) -> torch.Tensor:
    """Token j of a sequence is ``cache[table_row[j // block_size], j % block_size]``; only ``length`` tokens.

    A quantized cache (``quant_bits`` 8 / 4, ``scales_zeros = (scales, zeros)``) gives float64
    ``(q - zero) * scale``; 4 bits: byte i holds element i (low nibble) and element i + D/2 (high nibble)."""
    bs = cache.shape[1]
    j = torch.arange(length, device=cache.device)
    blocks = table_row.to(cache.device).long()[j // bs] if length else j
    tokens = cache[blocks, j % bs]
    if not quant_bits:
        return tokens
    scales, zeros = scales_zeros
    q = tokens.to(torch.int64)
    if quant_bits == 4:
        q = torch.cat((q % 16, q // 16), dim=-1)
    return (q.to(F64) - zeros[blocks, j % bs].to(F64)[..., None]) * scales[blocks, j % bs].to(F64)[..., None]


def quantize_kv_row(x: torch.Tensor, quant_bits: int, scale_dtype: torch.dtype, zero_dtype: torch.dtype):
    """One token's head ``x [D]`` -> ``(q int64 [D], scale, zero)`` by the definition (``dlinfer.ops.kv_quant``):
    float32 arithmetic, scale and zero rounded to their storage dtypes."""
    levels = 2 ** quant_bits - 1
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        return torch.zeros(x.shape, dtype=torch.int64), math.nan, math.nan
    lo, hi = x.min(), x.max()
    # divisors as tensors on x's device: torch's CUDA `tensor / number` multiplies by a float32 reciprocal
    scale = torch.maximum((hi - lo) / torch.full_like(hi, levels),
                          torch.maximum(lo.abs(), hi.abs()) / torch.full_like(hi, 64 * levels))
    scale = scale.to(scale_dtype).to(torch.float32)
    if float(scale) == 0.0 or float(hi) == float(lo):
        scale = torch.ones((), dtype=torch.float32)
    zero = (-lo / scale).to(zero_dtype).to(torch.float32)
    q = torch.floor(x / scale + zero + 0.5).clamp(0, levels).to(torch.int64)
    return q, float(scale), float(zero)


def moe_64(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
           renormalize: bool) -> torch.Tensor:
    """Mixture of experts: ``sum_j w[t, j] * down[e] @ silu_and_mul(gate_up[e] @ x[t])`` with ``e = ids[t, j]``."""
    w = weights.to(F64)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    ids = ids.long()
    out = torch.zeros(x.shape, dtype=F64, device=x.device)
    for e in range(gate_up.shape[0]):
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        h = x[token].to(F64) @ gate_up[e].to(F64).T  # [n, 2I]
        y = silu_and_mul_64(h) @ down[e].to(F64).T  # [n, H]
        out.index_add_(0, token, y * w[token, slot, None])
    return out


# ------------------------------------------------------------------- the ops, with vendor signatures
def silu_and_mul(x):
    return silu_and_mul_64(x)


def rms_norm(hidden_states, weight, epsilon):
    return rms_norm_64(hidden_states, weight, epsilon)


def add_rms_norm(hidden_states, residual, weight, epsilon):
    added = hidden_states.to(F64) + residual.to(F64)
    return rms_norm_64(added, weight, epsilon), added


def apply_rotary_pos_emb(query, key, cos, sin) -> None:
    query.copy_(rotary_64(query, cos, sin))
    key.copy_(rotary_64(key, cos, sin))


def fill_kv_cache(key, value, key_cache, value_cache, kv_start_indices, k_scales_zeros=None, v_scales_zeros=None,
                  quant_bits=0) -> None:
    """Token t goes to slot ``kv_start_indices[t]`` (block ``s // block_size``, row ``s % block_size``); -1 skips.
    Quantized (``quant_bits`` 8 / 4): each head is quantized by :func:`quantize_kv_row`, 4 bits packed two to a
    byte (element i low nibble, i + D/2 high), its scale and zero written to ``[scales, zeros]``."""
    bs = key_cache.shape[1]
    for t, s in enumerate(kv_start_indices.tolist()):
        if s < 0:
            continue
        for new, cache, scales_zeros in ((key, key_cache, k_scales_zeros), (value, value_cache, v_scales_zeros)):
            if not quant_bits:
                cache[s // bs, s % bs] = new[t]
                continue
            scales, zeros = scales_zeros
            for h in range(new.shape[1]):
                q, scale, zero = quantize_kv_row(new[t, h], quant_bits, scales.dtype, zeros.dtype)
                if quant_bits == 4:
                    half = q.shape[0] // 2
                    q = q[:half] + 16 * q[half:]
                cache[s // bs, s % bs, h] = q.to(cache.dtype)
                scales[s // bs, s % bs, h] = scale
                zeros[s // bs, s % bs, h] = zero


def _kv_scales_zeros(kv_scales, kv_zeros, quant_bits):
    """The attention ops' ``kv_scales = [k, v]``, ``kv_zeros = [k, v]`` -> ``(k_scales, k_zeros), (v_scales, v_zeros)``."""
    if not quant_bits:
        return None, None
    return (kv_scales[0], kv_zeros[0]), (kv_scales[1], kv_zeros[1])


def prefill_attention(query, key, value, cu_seqlens_q, cu_seqlens_kv, max_q_seq_len, softmax_scale, causal,
                      attn_output) -> None:
    """Sequence b has queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and keys ``cu_seqlens_kv[b]:cu_seqlens_kv[b+1]``."""
    qs = ks = 0
    q_lens, kv_lens = cu_seqlens_q.diff().tolist(), cu_seqlens_kv.diff().tolist()
    for ql, kl in zip(q_lens, kv_lens):
        if ql:
            attn_output[qs:qs + ql] = attention_64(query[qs:qs + ql], key[ks:ks + kl], value[ks:ks + kl],
                                                   softmax_scale, causal).to(attn_output.dtype)
        qs, ks = qs + ql, ks + kl


def paged_prefill_attention(query, key_cache, value_cache, block_table, cu_seqlens_q, kv_seqlens, max_q_seq_len,
                            max_kv_seq_len, softmax_scale, causal, attn_output, kv_scales=(), kv_zeros=(),
                            quant_bits=0) -> None:
    """Sequence b has queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` (the last ones of its ``kv_seqlens[b]`` keys)."""
    begin = 0
    k_sz, v_sz = _kv_scales_zeros(kv_scales, kv_zeros, quant_bits)
    for b, (end, kl) in enumerate(zip(cu_seqlens_q[1:].tolist(), kv_seqlens.tolist())):
        if end > begin:
            k = gather_tokens(key_cache, block_table[b], kl, k_sz, quant_bits)
            v = gather_tokens(value_cache, block_table[b], kl, v_sz, quant_bits)
            attn_output[begin:end] = attention_64(query[begin:end], k, v, softmax_scale, causal).to(attn_output.dtype)
        begin = end


def paged_decode_attention(query, key_cache, value_cache, block_table, kv_seqlens, max_kv_seq_len, softmax_scale,
                           attn_output, kv_scales=(), kv_zeros=(), quant_bits=0) -> None:
    """One query token per sequence, seeing all ``kv_seqlens[b]`` keys; a zero-length sequence gives zeros."""
    q = query.to(F64)  # read before writing: attn_output may alias query
    rows = []
    k_sz, v_sz = _kv_scales_zeros(kv_scales, kv_zeros, quant_bits)
    for b, n in enumerate(kv_seqlens.tolist()):
        k = gather_tokens(key_cache, block_table[b], n, k_sz, quant_bits)
        v = gather_tokens(value_cache, block_table[b], n, v_sz, quant_bits)
        rows.append(attention_64(q[b:b + 1], k, v, softmax_scale, False)[0])
    if rows:
        attn_output.copy_(torch.stack(rows).to(attn_output.dtype))


def moe_gating_topk_softmax(router_logits, topk):
    """Top-k of softmax probabilities, ties to the lower expert id: (weights float64, ids int64)."""
    probs = torch.softmax(router_logits.to(F64), dim=-1)
    ids = torch.zeros(probs.shape[0], topk, dtype=torch.int64, device=probs.device)
    for t in range(probs.shape[0]):
        row = probs[t].tolist()
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))[:topk]
        ids[t] = torch.tensor(order, dtype=torch.int64)
    return probs.gather(1, ids), ids


def fused_moe(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, renormalize):
    return moe_64(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, renormalize)


def linear(x, weight, bias):
    out = x.to(F64) @ weight.to(F64).T
    return out + bias.to(F64) if bias is not None else out


def apply_rotary_pos_emb_fill_kv_cache(query, key, value, key_cache, value_cache, cos, sin,
                                       kv_start_indices) -> None:
    apply_rotary_pos_emb(query, key, cos, sin)
    fill_kv_cache(key, value, key_cache, value_cache, kv_start_indices)


# quantized ops: float64 math from the definitions; they take inputs of any dtype and return the op's declared
# dtypes themselves (upcast_op hands them out as they are)
def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """AWQ order: nibble i of a word holds column (0, 2, 4, 6, 1, 3, 5, 7)[i] of its group of 8."""
    rows, words = packed.shape
    out = torch.empty(rows, words * 8, dtype=F64, device=packed.device)
    for nibble, column in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
        out[:, column::8] = ((packed >> (4 * nibble)) & 15).to(F64)
    return out


def _per_token_64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale is a float32 tensor by contract and ``q = round(x / scale)`` a float32 quotient: at a tie (frequent
    with 16-bit inputs, e.g. x = amax / 2) a float64 quotient would round the other way."""
    amax = x.abs().amax(-1, keepdim=True)
    # a divisor tensor on x's device: on CUDA torch's float64 `tensor / number` multiplies by the reciprocal
    scale = torch.where(amax > 0, amax / torch.full_like(amax, 127.0), torch.full_like(amax, 1 / 127.0))
    scale = scale.to(torch.float32)
    return torch.round(x.to(torch.float32) / scale).clamp(-127, 127).to(torch.int8), scale


def weight_quant_matmul(x, qweight, scale, offset, bias, group_size):
    q = _unpack_int4(qweight)
    zeros = _unpack_int4(offset) if offset is not None else torch.full_like(scale, 8, dtype=F64)
    group = torch.arange(q.shape[0], device=q.device) // group_size
    w = (q - zeros[group]) * scale.to(F64)[group]
    out = x.to(F64) @ w
    return (out + bias.to(F64) if bias is not None else out).to(x.dtype)


def dynamic_quant(x, quant_dtype, quant_granularity):
    return _per_token_64(x.to(F64))


def linear_w8a8(a, b, rms_scale, linear_scale, out_dtype, quant_dtype, bias):
    out = (a.to(F64) @ b.to(F64).T) * rms_scale.to(F64).reshape(-1, 1).reshape(*a.shape[:-1], 1)
    out = out * linear_scale.to(F64).reshape(-1)
    return (out + bias.to(F64) if bias is not None else out).to(out_dtype)


def linear_w8a8_static(x, weight, input_scale, input_offset, deq_scale, out_dtype, quant_dtype, quant_bias):
    xq = (torch.round(x.to(F64) / input_scale.to(F64).reshape(())) + input_offset.to(F64).reshape(())).clamp(-128, 127)
    acc = xq @ weight.to(F64).T
    if quant_bias is not None:
        acc = acc + quant_bias.to(F64)
    return (acc * deq_scale.to(F64).reshape(-1)).to(out_dtype)


def rms_norm_w8a8(hidden_states, weight, epsilon, quant_dtype):
    return _per_token_64(rms_norm_64(hidden_states, weight, epsilon))


def add_rms_norm_w8a8(hidden_states, residual, weight, epsilon, quant_dtype):
    added = (hidden_states.to(F64) + residual.to(F64)).to(hidden_states.dtype)  # the op rounds the sum first
    return (*_per_token_64(rms_norm_64(added, weight, epsilon)), added)


def fused_moe_w8a8(hidden_states, gate_up_weights, gate_up_scales, down_weights, down_scales, topk_weights, topk_ids,
                   renormalize):
    w = topk_weights.to(F64)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    xq, xs = _per_token_64(hidden_states.to(F64))
    out = torch.zeros(hidden_states.shape, dtype=F64, device=hidden_states.device)
    for t in range(hidden_states.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            gu = (gate_up_weights[e].to(F64) @ xq[t].to(F64)) * xs[t].to(F64) * gate_up_scales[e].to(F64).reshape(-1)
            gate, up = gu.chunk(2)
            act = (gate * torch.sigmoid(gate) * up).to(hidden_states.dtype).to(F64)
            aq, as_ = _per_token_64(act)
            y = (down_weights[e].to(F64) @ aq.to(F64)) * as_.to(F64) * down_scales[e].to(F64).reshape(-1)
            out[t] += w[t, k] * y
    return out.to(hidden_states.dtype)


QUANT_OPS: dict[str, Callable[..., Any]] = {
    "weight_quant_matmul": weight_quant_matmul,
    "dynamic_quant": dynamic_quant,
    "linear_w8a8": linear_w8a8,
    "linear_w8a8_static": linear_w8a8_static,
    "rms_norm_w8a8": rms_norm_w8a8,
    "add_rms_norm_w8a8": add_rms_norm_w8a8,
    "fused_moe_w8a8": fused_moe_w8a8,
}

OPS: dict[str, Callable[..., Any]] = {
    "silu_and_mul": silu_and_mul,
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "apply_rotary_pos_emb": apply_rotary_pos_emb,
    "fill_kv_cache": fill_kv_cache,
    "prefill_attention": prefill_attention,
    "paged_prefill_attention": paged_prefill_attention,
    "paged_decode_attention": paged_decode_attention,
    "moe_gating_topk_softmax": moe_gating_topk_softmax,
    "fused_moe": fused_moe,
    "linear": linear,
    "apply_rotary_pos_emb_fill_kv_cache": apply_rotary_pos_emb_fill_kv_cache,
}
OPS.update(QUANT_OPS)

# dtype of the returned floating tensors, where the contract fixes it (others: the first floating input's)
_RETURN_DTYPE = {"moe_gating_topk_softmax": torch.float32}
# positions of the arguments each op writes in place
IN_PLACE_ARGS = {"apply_rotary_pos_emb": (0, 1), "fill_kv_cache": (2, 3), "prefill_attention": (8,),
                 "paged_prefill_attention": (10,), "paged_decode_attention": (7,),
                 "apply_rotary_pos_emb_fill_kv_cache": (0, 1, 3, 4)}


def upcast_op(op: str) -> Callable[..., Any]:
    """``OPS[op]`` for tensors of any dtype: float64 inside, results cast back, in-place writes kept.

    Every floating tensor argument is copied to float64 (aliases stay aliases: one copy per distinct tensor,
    so ``attn_output`` passed as ``query`` stays the same tensor); after the oracle, the copies of the
    arguments the op writes (``IN_PLACE_ARGS``) are written back into the originals (so in-place results land
    in the caller's tensors, strided views of a packed buffer included) and returned tensors are cast to the
    input dtype (``float32`` weights for ``moe_gating_topk_softmax``).
    """
    if op not in OPS:
        raise ValueError(f"op: unknown op {op!r}; known: {', '.join(OPS)}")
    fn = OPS[op]
    if op in QUANT_OPS:  # any input dtype already, declared output dtypes
        return fn
    if op == "fill_kv_cache":  # a quantized write rounds in float32 to the scales' own dtypes: never upcast it
        upcast = _upcast(op, fn)
        return lambda *args: fn(*args) if args[-1] else upcast(*args)
    return _upcast(op, fn)


def _upcast(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:

    def run(*args):
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        dtype = None

        def up(a):
            nonlocal dtype
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                dtype = dtype or a.dtype
                for orig, copy in copies:
                    if orig is a:
                        return copy
                copy = a.detach().to(F64, copy=True)
                copies.append((a, copy))
                return copy
            if isinstance(a, (list, tuple)):
                return type(a)(up(x) for x in a)
            return a

        args64 = [up(a) for a in args]
        result = fn(*args64)
        for i in IN_PLACE_ARGS.get(op, ()):
            if isinstance(args[i], torch.Tensor) and args[i] is not args64[i]:
                args[i].copy_(args64[i])
        out_dtype = _RETURN_DTYPE.get(op, dtype)

        def down(r):
            if isinstance(r, torch.Tensor) and r.is_floating_point():
                return r.to(out_dtype)
            if isinstance(r, tuple):
                return tuple(down(x) for x in r)
            return r

        return down(result)

    run.__name__ = f"oracle_{op}"
    return run


__all__ = ["IN_PLACE_ARGS", "OPS", "add_rms_norm", "apply_rotary_pos_emb", "apply_rotary_pos_emb_fill_kv_cache",
           "attention_64",
           "fill_kv_cache", "fused_moe", "gather_tokens", "linear", "moe_64", "moe_gating_topk_softmax",
           "paged_decode_attention", "paged_prefill_attention", "prefill_attention", "quantize_kv_row", "rms_norm",
           "rms_norm_64",
           "rotary_64", "silu_and_mul", "silu_and_mul_64", "upcast_op"]
