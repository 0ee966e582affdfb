"""A vLLM v1 attention backend on dlinfer's paged-attention ops.

vLLM keeps one KV-cache tensor per layer, logically ``[num_blocks, num_kv_heads, block_size, D + Dv]`` with a
token's key and value packed in the last dimension; the backend picks the physical order (the methods differ
between vLLM releases: ``compat.PackedKVCacheLayout``). ``kv.transpose(1, 2)[..., :D]`` is then a zero-copy
``[num_blocks, block_size, Hk, D]`` view, the layout of ``dlinfer.ops`` (last-dim stride 1, other strides
arbitrary), so the cache is read and written in place in any layout. The preferred layout is LBNHC (token-major blocks, as in LMDeploy).

Per batch (vLLM orders decodes first, ``reorder_batch_threshold = 1``):

* new keys/values go into the cache with ``fill_kv_cache`` (vLLM's ``slot_mapping``; ``-1`` = padding);
* decode requests (one query token) run ``paged_decode_attention``;
* prefill requests run ``prefill_attention`` on the new tokens when none of them has history in the cache,
  else ``paged_prefill_attention`` (chunked prefill, prefix-cache hits), which reads everything from the cache.

Unsupported features are refused, never approximated: :meth:`DlinferAttentionBackend.validate_configuration`
gives vLLM the reasons where vLLM's platform validates backends (CUDA-like), and the layer implementation
raises ``NotImplementedError`` naming the feature everywhere else (vLLM's CPU platform does not validate).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

import dlinfer.ops as dl
from dlinfer.ops import attention
from dlinfer.errors import NotSupportedError
from dlinfer.framework import batch
from dlinfer.framework.vllm_ext import compat, log_summary_once
from dlinfer.framework.vllm_ext.counters import hit
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec

__all__ = ["DlinferAttentionBackend", "DlinferAttentionImpl", "DlinferAttentionMetadata",
           "DlinferAttentionMetadataBuilder", "layer_refusals"]

_HOW_TO_OPT_OUT = "set DLINFER_VLLM_DISABLE=attention to run vLLM's own attention backend"


class DlinferAttentionBackend(compat.PackedKVCacheLayout, AttentionBackend):
    """Decoder self-attention through ``dlinfer.ops``; registered as ``DLINFER`` (``CUSTOM`` on vLLM 0.26) and,
    on CPU, as ``CPU_ATTN``. The KV-cache layout methods come from :class:`compat.PackedKVCacheLayout`."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return compat.ATTENTION_BACKEND_NAME  # vLLM looks the layer's backend up by this name

    @staticmethod
    def get_impl_cls() -> type[DlinferAttentionImpl]:
        return DlinferAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[DlinferAttentionMetadataBuilder]:
        return DlinferAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any: a vendor that cannot serve a head size falls back to dlinfer's reference vendor

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse,
                             use_mm_prefix, device_capability) -> str | None:
        if head_size % 2:
            return f"odd head size {head_size}"
        return None


def layer_refusals(*, head_size: int, dtype: torch.dtype | None, kv_cache_dtype: str | None,
                   alibi_slopes=None, sliding_window: int | None = None, logits_soft_cap: float | None = None,
                   attn_type: str = AttentionType.DECODER, sinks=None, extra: dict | None = None) -> list[str]:
    """Why :class:`DlinferAttentionImpl` cannot serve a layer, in words (empty when it can)."""
    backend = DlinferAttentionBackend
    reasons = []
    if alibi_slopes is not None:
        reasons.append("ALiBi position biases")
    if sliding_window is not None and sliding_window > 0:
        reasons.append(f"sliding-window attention (window {sliding_window})")
    if logits_soft_cap:
        reasons.append(f"attention logit soft-capping ({logits_soft_cap})")
    if sinks is not None:
        reasons.append("attention sinks")
    if not backend.supports_attn_type(attn_type):
        reasons.append(f"{attn_type} attention (dlinfer serves decoder self-attention)")
    if not backend.supports_kv_cache_dtype(kv_cache_dtype):
        reasons.append(f"quantized KV cache (kv_cache_dtype={kv_cache_dtype})")
    if dtype is not None and not backend.supports_dtype(dtype):
        reasons.append(f"dtype {dtype}")
    if head_size % 2:
        reasons.append(f"odd head size {head_size}")
    for key, value in (extra or {}).items():
        if value not in (None, False, 0):
            reasons.append(f"{key}={value!r}")
    return reasons


@dataclasses.dataclass
class DlinferAttentionMetadata:
    """One batch, split into its decode requests (first) and its prefill requests."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor
    max_seq_len: int
    # decode part: requests [0, num_decodes), tokens [0, num_decode_tokens), one token each
    num_decodes: int
    num_decode_tokens: int
    decode_block_table: torch.Tensor
    decode_seq_lens: torch.Tensor
    # prefill part: requests [num_decodes, num_reqs), tokens [num_decode_tokens, num_actual_tokens)
    num_prefills: int
    prefill_block_table: torch.Tensor
    prefill: batch.BatchLayout  # the prefill part in the vendor layout ([P + 1] offsets from num_decode_tokens)
    prefill_max_query_len: int
    prefill_without_history: bool  # no prefill request has tokens in the cache before this step


class DlinferAttentionMetadataBuilder(AttentionMetadataBuilder[DlinferAttentionMetadata]):
    """Per-step metadata. CUDA graphs: vLLM captures whole-model (FULL) graphs of pure-decode batches and runs
    every other batch piecewise, attention eagerly between the compiled pieces. A captured decode step is
    replayable because ``paged_decode`` reads lengths and block tables on the device from vLLM's persistent
    buffers, and its launch grid depends only on the batch size and the host ``max_seq_len``, which the capture
    sets to the model's maximum length (a short sequence is spread over the splits sized for the longest; a padded
    request of length 0 yields a zero row)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self._max_model_len = int(vllm_config.model_config.max_model_len)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> DlinferAttentionMetadata:
        meta = self.build(0, common_attn_metadata)
        # The graph keeps the host max_seq_len of its capture: make it the bound of every later replay.
        meta.max_seq_len = max(meta.max_seq_len, self._max_model_len)
        return meta

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DlinferAttentionMetadata:
        cm = common_attn_metadata
        if isinstance(cm.causal, torch.Tensor) or not cm.causal:
            raise NotSupportedError("dlinfer attention backend: non-causal attention in a decoder batch is not "
                                    f"supported; {_HOW_TO_OPT_OUT}")
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        if num_decodes and num_prefills:
            hit("mixed_prefill_decode_batch")  # not an op: counts steps that mixed both kinds (for tests)
        num_reqs = cm.num_reqs
        qsl = cm.query_start_loc[: num_reqs + 1]
        seq_lens = cm.seq_lens[:num_reqs]
        block_table = cm.block_table_tensor[:num_reqs]

        without_history = True
        prefill_max_query_len = 0
        if num_prefills:
            # Host copies: exact for prefill rows (vLLM documents seq_lens_cpu_upper_bound as precise there).
            qsl_cpu = cm.query_start_loc_cpu[num_decodes: num_reqs + 1]
            q_lens_cpu = qsl_cpu[1:] - qsl_cpu[:-1]
            seq_cpu = cm.seq_lens_cpu_upper_bound
            seq_cpu = seq_lens.cpu() if seq_cpu is None else seq_cpu[:num_reqs]
            without_history = bool(torch.equal(seq_cpu[num_decodes:].to(q_lens_cpu.dtype), q_lens_cpu))
            prefill_max_query_len = int(q_lens_cpu.max())
        # The vendor layout of the prefill part, once per step (every layer's op call reads it).
        prefill = batch.from_start_offsets(qsl[num_decodes:], seq_lens[num_decodes:], no_history=without_history)

        return DlinferAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            slot_mapping=cm.slot_mapping,
            max_seq_len=cm.max_seq_len,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            decode_block_table=block_table[:num_decodes],
            decode_seq_lens=seq_lens[:num_decodes],
            num_prefills=num_prefills,
            prefill_block_table=block_table[num_decodes:],
            prefill=prefill,
            prefill_max_query_len=prefill_max_query_len,
            prefill_without_history=without_history,
        )


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's packed ``[num_blocks, Hk, block_size, D + Dv]`` cache as dlinfer's two
    ``[num_blocks, block_size, Hk, D|Dv]`` views (no copy)."""
    if kv_cache.dim() != 4 or kv_cache.stride(-1) != 1 or kv_cache.shape[-1] <= head_size:
        raise ValueError("dlinfer attention backend: expected a packed KV cache [num_blocks, num_kv_heads, "
                         f"block_size, head_size + head_size_v] with last-dim stride 1 and head_size {head_size}, "
                         f"got shape {tuple(kv_cache.shape)} strides {kv_cache.stride()}")
    kv = kv_cache.transpose(1, 2)
    return kv[..., :head_size], kv[..., head_size:]


class DlinferAttentionImpl(AttentionImpl[DlinferAttentionMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None, **extra) -> None:
        log_summary_once()
        reasons = layer_refusals(head_size=head_size, dtype=torch.get_default_dtype(),
                                 kv_cache_dtype=kv_cache_dtype, alibi_slopes=alibi_slopes,
                                 sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                                 attn_type=attn_type, sinks=sinks, extra=extra)
        if reasons:
            raise NotSupportedError("dlinfer attention backend cannot serve this layer: " + "; ".join(reasons)
                                    + f" ({_HOW_TO_OPT_OUT})")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.alibi_slopes = None
        self.sliding_window = None
        self.logits_soft_cap = None
        self.sinks = None
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        tokens = min(key.shape[0], slot_mapping.shape[0])
        hit("fill_kv_cache")
        dl.fill_kv_cache(key[:tokens], value[:tokens], key_cache, value_cache, slot_mapping[:tokens])

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: DlinferAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotSupportedError("dlinfer attention backend: fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        meta = attn_metadata
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        block_size = key_cache.shape[1]
        head_size_v = value_cache.shape[-1]
        nd = meta.num_decode_tokens
        # The clean contract: 3-D views and the step's [B + 1] layout, no LMDeploy-shaped placeholders.
        q = query.view(query.shape[0], self.num_heads, self.head_size)
        out = output.view(output.shape[0], self.num_heads, head_size_v)
        if meta.num_decodes:
            hit("paged_decode_attention")
            attention.paged_decode(q[:nd], key_cache, value_cache, meta.decode_block_table, meta.decode_seq_lens,
                                   meta.max_seq_len, softmax_scale=self.scale, attn_output=out[:nd])
        if meta.num_prefills:
            end = meta.num_actual_tokens
            prefill = meta.prefill
            if meta.prefill_without_history and key is not None and value is not None:
                hit("prefill_attention")
                k = key.view(key.shape[0], self.num_kv_heads, self.head_size)
                v = value.view(value.shape[0], self.num_kv_heads, head_size_v)
                attention.varlen_attention(q[nd:end], k[nd:end], v[nd:end], prefill.cu_seqlens_q,
                                           prefill.cu_seqlens_q, meta.prefill_max_query_len,
                                           softmax_scale=self.scale, attn_output=out[nd:end])
            else:
                hit("paged_prefill_attention")
                attention.paged_prefill(q[nd:end], key_cache, value_cache, meta.prefill_block_table,
                                        prefill.cu_seqlens_q, prefill.kv_seqlens, meta.prefill_max_query_len,
                                        meta.max_seq_len, softmax_scale=self.scale, attn_output=out[nd:end])
        return output
