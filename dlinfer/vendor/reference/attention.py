"""Attention by the definition: per sequence, gather its keys and values, softmax(q k^T * scale) v in fp32.

NaN in, NaN out (the contract every vendor keeps): a NaN or Inf in a query row, or in a key or value that row
can see, makes the row NaN, as softmax's definition does; only rows that see no key at all (a zero-length
sequence) are zero, decided by lengths and positions, never by values. Cache slots past a sequence's length are
never read. A NaN value at a position the causal mask hides may still reach earlier rows of its sequence
(``0 * NaN`` in ``p @ v``, as in torch's SDPA and FlashAttention); the conformance kit does not test that case.

A quantized cache (``quant_bits`` 8 / 4) is dequantized, token by token as it is gathered, to float32
(``(q - zero) * scale``, ``dlinfer.vendor.reference.kv_cache.dequantize``); only the gathered blocks are.
"""

import torch

from dlinfer.vendor.reference.kv_cache import dequantize


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """q ``[Lq, Hq, D]``, k ``[Lk, Hk, D]``, v ``[Lk, Hk, Dv]`` -> ``[Lq, Hq, Dv]`` float32.

    Causal aligns the ends: query i sees keys j <= i + Lk - Lq.
    """
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    probs = None
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        pos_q = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        pos_k = torch.arange(lk, device=q.device)[None, :]
        scores = scores.masked_fill(pos_k > pos_q, float("-inf"))
        if lk < lq:  # the first lq - lk queries see no key: zeros, decided by position, never by value
            probs = torch.where(pos_q >= 0, torch.softmax(scores, dim=-1), 0.0)
    if probs is None:
        probs = torch.softmax(scores, dim=-1)  # NaN/Inf in a visible score stays NaN: NaN in, NaN out
    return torch.einsum("hqk,khd->qhd", probs, v)


def _gather(cache: torch.Tensor, block_row: torch.Tensor, length: int, scales=None, zeros=None,
            quant_bits: int = 0) -> torch.Tensor:
    block_size = cache.shape[1]
    blocks = block_row[: (length + block_size - 1) // block_size].long()
    tokens = cache[blocks]
    if quant_bits:
        tokens = dequantize(tokens, scales[blocks], zeros[blocks], quant_bits)
    return tokens.reshape(-1, *tokens.shape[2:])[:length]


def _kv(kv_scales, kv_zeros, quant_bits):
    """``(k_scales, k_zeros), (v_scales, v_zeros)`` (Nones for a float cache)."""
    if not quant_bits:
        return (None, None), (None, None)
    return (kv_scales[0], kv_zeros[0]), (kv_scales[1], kv_zeros[1])


def prefill_attention(query, key, value, cu_seqlens_q, cu_seqlens_kv, max_q_seq_len, softmax_scale, causal,
                      attn_output) -> None:
    q_starts, kv_starts = cu_seqlens_q.tolist(), cu_seqlens_kv.tolist()
    for b in range(len(q_starts) - 1):
        q_start, q_end = q_starts[b], q_starts[b + 1]
        kv_start, kv_end = kv_starts[b], kv_starts[b + 1]
        if q_end > q_start:
            out = _attend(query[q_start:q_end], key[kv_start:kv_end], value[kv_start:kv_end], softmax_scale, causal)
            attn_output[q_start:q_end] = out.to(attn_output.dtype)


def paged_prefill_attention(query, key_cache, value_cache, block_table, cu_seqlens_q, kv_seqlens, max_q_seq_len,
                            max_kv_seq_len, softmax_scale, causal, attn_output, kv_scales=(), kv_zeros=(),
                            quant_bits=0) -> None:
    starts = cu_seqlens_q.tolist()
    k_sz, v_sz = _kv(kv_scales, kv_zeros, quant_bits)
    for b, kv_len in enumerate(kv_seqlens.tolist()):
        start, end = starts[b], starts[b + 1]
        if end > start:
            k = _gather(key_cache, block_table[b], kv_len, *k_sz, quant_bits)
            v = _gather(value_cache, block_table[b], kv_len, *v_sz, quant_bits)
            out = _attend(query[start:end], k, v, softmax_scale, causal)
            attn_output[start:end] = out.to(attn_output.dtype)


def paged_decode_attention(query, key_cache, value_cache, block_table, kv_seqlens, max_kv_seq_len, softmax_scale,
                           attn_output, kv_scales=(), kv_zeros=(), quant_bits=0) -> None:
    """All sequences at once: gather every sequence's block-table row, mask positions past its length.

    No host sync (lengths stay on the device), so it also runs under CUDA-graph capture.
    """
    block_size = key_cache.shape[1]
    # Only the blocks the length bound can reach (a block table is often as wide as the model's max length).
    max_blocks = max(1, min(block_table.shape[1], (max_kv_seq_len + block_size - 1) // block_size))
    block_table = block_table[:, :max_blocks]
    lengths = kv_seqlens.long()
    used = torch.arange(max_blocks, device=query.device)[None, :] * block_size < lengths[:, None]
    blocks = torch.where(used, block_table.long(), 0)  # entries past a sequence's last block may be garbage
    k, v = key_cache[blocks], value_cache[blocks]  # [B, max_blocks, block_size, Hk, D]
    if quant_bits:
        (ks, kz), (vs, vz) = _kv(kv_scales, kv_zeros, quant_bits)
        k = dequantize(k, ks[blocks], kz[blocks], quant_bits)
        v = dequantize(v, vs[blocks], vz[blocks], quant_bits)
    k = k.flatten(1, 2).float()  # [B, max_blocks * block_size, Hk, D]
    v = v.flatten(1, 2).float()
    group = query.shape[1] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    visible = torch.arange(k.shape[1], device=query.device)[None, :] < lengths[:, None]
    v = v.masked_fill(~visible[:, :, None, None], 0.0)  # slots past a length may hold anything, NaN included
    scores = torch.einsum("bhd,bkhd->bhk", query.float(), k) * softmax_scale
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    # A zero-length sequence gives a zero row (by its length, never by value: NaN in, NaN out).
    probs = torch.where((lengths > 0)[:, None, None], torch.softmax(scores, dim=-1), 0.0)
    attn_output.copy_(torch.einsum("bhk,bkhd->bhd", probs, v).to(attn_output.dtype))
