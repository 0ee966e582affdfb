"""Per-step attention metadata for LMDeploy's dlinfer attention, built on the device without host syncs.

LMDeploy's dlinfer attention (``lmdeploy/pytorch/backends/dlinfer/attention.py``) hands these fields to
``dlinfer.ops``: ``kv_start_indices`` (one cache slot per new token), ``cu_seqlens_q_cpu`` / ``kv_seqlens_cpu``
(here device tensors: the ops accept them and a CUDA graph can replay them), ``attention_mask`` (non-empty means
causal), ``is_prefill_no_cache`` and the host upper bounds ``max_q_seqlen`` / ``max_kv_seq_len``.

Every value here comes from a device computation or from host integers LMDeploy already has
(``ModelInputs.max_q_seqlen``, ``max_kv_seqlen``, ``sum_kv_seqlen``, the token count): no ``.item()``, no
``.cpu()``, no ``.tolist()``.
"""

from __future__ import annotations

import torch

from dlinfer.framework import batch

#: ``attention_mask`` for causal LLM attention: dlinfer's attention ops read only whether the sequence is empty
#: (``[]`` means non-causal, as LMDeploy's vision encoders pass it).
CAUSAL_MASK: tuple = (None,)


def slot_indices(q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor, block_offsets: torch.Tensor, block_size: int,
                 num_tokens: int, is_decoding: bool) -> torch.Tensor:
    """The cache slot of every new token: ``block_offsets[b, pos // block_size] * block_size + pos % block_size``.

    Token ``i`` of sequence ``b`` sits at position ``kv_seqlens[b] - q_seqlens[b] + i``. ``num_tokens`` (the
    host-known total of ``q_seqlens``) sizes the output, so no host sync is needed. Returns ``[num_tokens]`` int64.
    """
    if is_decoding:
        positions = kv_seqlens.to(torch.int64) - 1
        blocks = block_offsets.gather(1, torch.div(positions, block_size, rounding_mode="floor")[:, None])[:, 0]
        return blocks.to(torch.int64) * block_size + positions.remainder(block_size)
    device = q_seqlens.device
    batch = q_seqlens.numel()
    q_lens = q_seqlens.to(torch.int64)
    seq_of_token = torch.repeat_interleave(torch.arange(batch, device=device), q_lens, output_size=num_tokens)
    starts = torch.cumsum(q_lens, 0) - q_lens
    offset_in_seq = torch.arange(num_tokens, device=device) - starts[seq_of_token]
    positions = (kv_seqlens.to(torch.int64) - q_lens)[seq_of_token] + offset_in_seq
    blocks = block_offsets[seq_of_token, torch.div(positions, block_size, rounding_mode="floor")]
    return blocks.to(torch.int64) * block_size + positions.remainder(block_size)


def build_attention_metadata(meta_cls, step_context, *, block_size: int):
    """A ``DlinferAttentionMetadata`` for one LMDeploy step, without host syncs.

    ``meta_cls`` is LMDeploy's ``DlinferAttentionMetadata`` (passed in so this module does not import LMDeploy).
    """
    num_tokens = step_context.input_ids.numel()
    is_decoding = bool(step_context.is_decoding)
    # kv >= q for every sequence, so equal totals mean no sequence has history: plain varlen attention.
    sum_kv = step_context.sum_kv_seqlen
    is_prefill_no_cache = (not is_decoding) and sum_kv is not None and int(sum_kv) == num_tokens
    # The vendor layout, once for the step; every layer's op call reads it (no per-layer conversion).
    layout = batch.from_lengths(step_context.q_seqlens, step_context.kv_seqlens, no_history=is_prefill_no_cache)
    q_seqlens, kv_seqlens, cu_seqlens_q = layout.q_seqlens, layout.kv_seqlens, layout.cu_seqlens_q
    block_offsets = step_context.block_offsets
    if block_offsets.dtype != torch.int32:
        block_offsets = block_offsets.to(torch.int32)
    if is_decoding and num_tokens != q_seqlens.numel():
        from dlinfer.errors import NotSupportedError

        raise NotSupportedError(f"multi-token decoding ({num_tokens} tokens for {q_seqlens.numel()} sequences, as in "
                                "speculative decoding) is not supported by dlinfer's LMDeploy backend")
    kv_start_indices = slot_indices(q_seqlens, kv_seqlens, block_offsets, block_size, num_tokens, is_decoding)

    max_q = step_context.max_q_seqlen
    max_kv = step_context.max_kv_seqlen
    if max_q is None:
        max_q = 1 if is_decoding else num_tokens
    if max_kv is None:
        max_kv = block_offsets.shape[1] * block_size

    return meta_cls(
        is_decoding,
        block_offsets,
        q_start_loc=cu_seqlens_q[:-1],
        q_seqlens=q_seqlens,
        kv_seqlens=kv_seqlens,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_q_cpu=cu_seqlens_q,
        kv_seqlens_cpu=kv_seqlens,
        kv_start_indices=kv_start_indices,
        block_size=block_size,
        attention_mask=CAUSAL_MASK,
        is_prefill_no_cache=is_prefill_no_cache,
        max_q_seqlen=int(max_q),
        max_kv_seq_len=int(max_kv),
        kv_flatten_size=int(sum_kv) if sum_kv is not None else num_tokens,
        quant_policy=int(step_context.kv_quant_policy or 0),
        quant_meta=None,
    )
