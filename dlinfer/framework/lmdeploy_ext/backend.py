"""``DlinferCudaOpsBackend``: LMDeploy's dlinfer backend, on NVIDIA GPUs.

LMDeploy 0.18 ships ``DlinferOpsBackend`` (every layer through ``dlinfer.ops``) but selects it only for Ascend,
MetaX and Cambricon devices. This subclass serves device type ``cuda``: it builds the per-step metadata on the
device (``metadata.build_attention_metadata``), gives tensor-parallel MoE its ``MoeMetadata``, builds a CUDA
graph runner whose static buffers cover dlinfer's own metadata fields (``graph.DlinferCudaGraphRunner``) and an
attention layer that hands a quantized KV cache's scales to dlinfer and runs the rotary embedding deferred to it
fused with the KV-cache write (:class:`DlinferCudaAttentionImpl`, :class:`DlinferCudaApplyRotaryEmbImpl`).
Quantized weights need nothing here: LMDeploy's dlinfer layers for AWQ and SmoothQuant call ``dlinfer.ops``.

Importing this module imports LMDeploy.
"""

from __future__ import annotations

import itertools
import logging
import threading

import torch
from lmdeploy.pytorch.backends.apply_rotary_emb import ApplyRotaryEmbBuildSpec
from lmdeploy.pytorch.backends.attention import PagedAttentionBuildSpec
from lmdeploy.pytorch.backends.dlinfer.apply_rotary_emb import DlinferApplyRotaryEmbImpl
from lmdeploy.pytorch.backends.dlinfer.attention import DlinferAttentionImpl
from lmdeploy.pytorch.backends.dlinfer.moe import DlinferFusedMoEImpl
from lmdeploy.pytorch.backends.dlinfer.op_backend import DlinferOpsBackend
from lmdeploy.pytorch.backends.moe import FusedMoEBuildSpec

import dlinfer.ops as dl
from dlinfer import settings
from dlinfer.errors import NotSupportedError

from dlinfer.framework.lmdeploy_ext.metadata import build_attention_metadata
from dlinfer.utils.layout import n_fastest
from dlinfer.utils.type_annotation import MoECommType, MoeMetadata
from dlinfer.vendor import preferred_weight_layout

logger = logging.getLogger("dlinfer")


def _tensor_parallel_info() -> tuple[int, int, object]:
    """(tp_size, tp_rank, tp_group) of LMDeploy's attention TP group; (1, 0, None) outside a distributed run."""
    try:
        from lmdeploy.pytorch.distributed import get_dist_manager

        ctx = get_dist_manager().current_context()
        config = getattr(ctx, "dist_config", None)
        group = getattr(ctx, "attn_tp_group", None)
        if config is None:
            return 1, 0, None
        return int(config.tp), int(getattr(group, "rank", 0) or 0), getattr(group, "gpu_group", None)
    except Exception:  # noqa: BLE001 - no distributed context (single process, CPU tests)
        return 1, 0, None


class _Deferred(threading.local):
    """The rotary embedding an attention layer's :class:`DlinferCudaApplyRotaryEmbImpl` deferred to it:
    ``(query, key, cos, sin)``, or None (one per thread: the thread running the model)."""

    rotary: tuple | None = None


_deferred = _Deferred()

_FUSE_OFF_HINT = "DLINFER_LMDEPLOY_FUSE_ROTARY=0 applies the rotary embedding where the model asks for it"


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements (a view of the other, reshaped), so rotating one in place
    rotates what the other reads."""
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype


class DlinferCudaApplyRotaryEmbImpl(DlinferApplyRotaryEmbImpl):
    """LMDeploy's dlinfer rotary embedding, deferred to the attention layer that follows it.

    In every model LMDeploy builds on this backend, an attention layer rotates its query and key in place and hands
    them straight to its attention, whose first step writes the keys and values into the KV cache. This layer
    returns ``query`` and ``key`` as they are and leaves ``(query, key, cos, sin)`` for that attention
    (:class:`DlinferCudaAttentionImpl`), which rotates them and fills the cache in one op
    (``dlinfer.ops.apply_rotary_pos_emb_fill_kv_cache``): one op call, launch and pass over the keys fewer per
    layer. Nothing is left unrotated silently: a deferred rotation that no attention took by the next one is an
    error, and an attention that receives other tensors than the deferred ones rotates them first where they are
    views of each other, else stops with an error. Calls that are not in place, or in complex (interleaved) mode,
    run as LMDeploy's layer does. Built only with ``DLINFER_LMDEPLOY_FUSE_ROTARY`` on (the default)."""

    def forward(self, query, key, cos, sin, inplace: bool = True, complex_mode: bool = False,
                return_native_layout: bool = True):
        if not inplace or complex_mode:
            return super().forward(query, key, cos, sin, inplace, complex_mode, return_native_layout)
        if _deferred.rotary is not None:
            _deferred.rotary = None
            raise RuntimeError("dlinfer: a rotary embedding deferred to an attention layer was never applied (no "
                               "dlinfer attention received its query and key before the next rotary embedding); "
                               + _FUSE_OFF_HINT)
        _deferred.rotary = (query, key, cos, sin)
        return query, key


def clear_deferred_rotary() -> None:
    """Forget a deferred rotation (a new step starts: whatever an interrupted forward left is not applied)."""
    _deferred.rotary = None


class DlinferCudaAttentionImpl(DlinferAttentionImpl):
    """LMDeploy's dlinfer attention, with the KV cache quantized the way stock LMDeploy quantizes it on CUDA, and
    the rotary embedding deferred to it applied fused with the KV-cache write.

    With ``quant_policy`` 8 or 4, LMDeploy's cache engine gives each layer a uint8 cache and, beside it, one
    ``[num_blocks, block_size, Hk, 2]`` tensor of per-token scales and zeros per cache, which the model passes to
    the attention as ``k_scales_zeros``/``v_scales_zeros``. LMDeploy's dlinfer attention reads the scales from its
    metadata's ``quant_meta`` (iterators filled for Ascend's per-tensor scales) and ignores those arguments; this
    layer points ``quant_meta`` at them (views, made once per layer and cache) before running it, so
    ``fill_kv_cache`` gets ``[scales, zeros]`` per cache and the paged attention ops ``kv_scales = (k, v)``,
    ``kv_zeros = (k, v)`` (``dlinfer.ops.kv_quant``).

    A rotary embedding deferred to it (:class:`DlinferCudaApplyRotaryEmbImpl`) on the very query and key it
    receives, over an unquantized cache, runs as ``apply_rotary_pos_emb_fill_kv_cache`` and LMDeploy's layer then
    skips its own ``fill_kv_cache``; otherwise the rotation runs first, in place, as its own op.
    """

    _kv_filled = False  # this call's keys and values are already in the cache (the fused op wrote them)

    def adopt(self) -> None:
        """After the class swap: route LMDeploy's ``fill_kv_cache`` (an attribute its ``__init__`` set) through
        :meth:`_fill_kv_cache`."""
        self._lmdeploy_fill_kv_cache = self.fill_kv_cache
        self.fill_kv_cache = self._fill_kv_cache

    def _fill_kv_cache(self, key, value, k_cache, v_cache, *args, **kwargs):
        if self._kv_filled:
            return k_cache, v_cache
        return self._lmdeploy_fill_kv_cache(key, value, k_cache, v_cache, *args, **kwargs)

    def forward(self, query, key, value, k_cache, v_cache, attn_metadata, k_scales_zeros=None, v_scales_zeros=None,
                *args, **kwargs):
        if attn_metadata.quant_policy:
            attn_metadata.quant_meta = self._quant_meta(attn_metadata.quant_policy, k_scales_zeros, v_scales_zeros)
        deferred, _deferred.rotary = _deferred.rotary, None
        if deferred is not None:
            self._kv_filled = self._rotate(deferred, query, key, value, k_cache, v_cache, attn_metadata,
                                           bool(args) or kwargs.get("nsa_indices") is not None)
        try:
            return super().forward(query, key, value, k_cache, v_cache, attn_metadata, k_scales_zeros,
                                   v_scales_zeros, *args, **kwargs)
        finally:
            self._kv_filled = False

    @staticmethod
    def _rotate(deferred, query, key, value, k_cache, v_cache, attn_metadata, unusual: bool) -> bool:
        """Apply the ``deferred`` rotation; True when it also wrote the keys and values into the cache."""
        q0, k0, cos, sin = deferred
        if q0 is query and k0 is key and not attn_metadata.quant_policy and not unusual:
            dl.apply_rotary_pos_emb_fill_kv_cache(query, key, value, k_cache, v_cache, cos, sin,
                                                  attn_metadata.kv_start_indices)
            return True
        if not (_aliases(q0, query) and _aliases(k0, key)):
            raise RuntimeError("dlinfer: this attention layer received other query/key tensors than the rotary "
                               "embedding deferred to it was given (not views of them): it cannot apply it; "
                               + _FUSE_OFF_HINT)
        dl.apply_rotary_pos_emb(q0, k0, cos, sin)
        return False

    def _quant_meta(self, quant_policy, k_scales_zeros, v_scales_zeros) -> dict:
        if int(quant_policy) not in (4, 8) or k_scales_zeros is None or v_scales_zeros is None:
            raise NotSupportedError(f"dlinfer's LMDeploy attention serves quant_policy 4 and 8 with per-token scales "
                                    f"beside the cache; got quant_policy={int(quant_policy)}")
        key = (k_scales_zeros, v_scales_zeros)
        cached = getattr(self, "_dlinfer_quant_meta", None)
        if cached is None or cached[0][0] is not key[0] or cached[0][1] is not key[1]:
            ks, kz = k_scales_zeros[..., 0], k_scales_zeros[..., 1]
            vs, vz = v_scales_zeros[..., 0], v_scales_zeros[..., 1]
            values = {"k_scales": ks, "k_zeros": kz, "v_scales": vs, "v_zeros": vz, "kv_scales": (ks, vs),
                      "kv_zeros": (kz, vz)}
            # itertools.repeat: LMDeploy calls next() on each, once per forward of this layer
            cached = (key, {name: itertools.repeat(v) for name, v in values.items()})
            self._dlinfer_quant_meta = cached
        return cached[1]


def moe_layout_n_fastest(weights: torch.Tensor) -> bool:
    """Whether LMDeploy's expert weights like ``weights`` are laid out N-fastest at load:
    ``DLINFER_LMDEPLOY_MOE_N_FASTEST`` (``1``/``0``), or with ``auto`` (the default) the layout the vendor serving
    ``fused_moe`` on their device and dtype says its kernels serve faster (``dlinfer.vendor.preferred_weight_layout``).
    Logged once per answer."""
    choice = settings.tristate("DLINFER_LMDEPLOY_MOE_N_FASTEST")
    source = "DLINFER_LMDEPLOY_MOE_N_FASTEST"
    if choice is None:
        layout = preferred_weight_layout("fused_moe", weights.device, weights.dtype)
        choice, source = layout == "n_fastest", f"the {weights.device.type} vendor's preference"
    key = (choice, source)
    if key not in _layout_logged:
        _layout_logged.add(key)
        logger.info("dlinfer: LMDeploy's expert weights laid out %s (%s)", "N-fastest" if choice else "K-fastest",
                    source)
    return choice


_layout_logged: set = set()


class DlinferCudaFusedMoEImpl(DlinferFusedMoEImpl):
    """LMDeploy's dlinfer fused MoE whose expert weights may be laid out N-fastest at load
    (:func:`moe_layout_n_fastest`).

    LMDeploy stores the experts as ``[E, N, K]`` with K contiguous (K-fastest). Its CUDA backend re-lays them out
    once, keeping the shape, so that N is contiguous (``w.transpose(1, 2).contiguous().transpose(1, 2)``); this
    does the same where the layout is asked for. ``dlinfer.ops.fused_moe`` reads either layout in place through the
    weight's strides, so only the layout the GEMMs stream through changes, not the values or the op's contract.
    """

    def update_weights(self, gate_up_weights: torch.Tensor, down_weights: torch.Tensor):
        gate_up_weights, down_weights = super().update_weights(gate_up_weights, down_weights)
        if moe_layout_n_fastest(gate_up_weights):
            return n_fastest(gate_up_weights), n_fastest(down_weights)
        return gate_up_weights, down_weights


class DlinferCudaOpsBackend(DlinferOpsBackend):
    """LMDeploy's dlinfer layer backend on CUDA devices (kernels chosen by dlinfer's vendor registry)."""

    @staticmethod
    def get_name() -> str:
        return "dlinfer_cuda"

    @classmethod
    def build_op(cls, spec, *, enable_deterministic: bool = False):
        """LMDeploy's dlinfer layers; the paged attention is :class:`DlinferCudaAttentionImpl` (quantized caches, the
        deferred rotary embedding), the rotary embedding :class:`DlinferCudaApplyRotaryEmbImpl` (deferred to that
        attention; unless ``DLINFER_LMDEPLOY_FUSE_ROTARY=0``), the bf16/fp16 fused MoE
        :class:`DlinferCudaFusedMoEImpl` (its weight layout chosen at load)."""
        impl = super().build_op(spec, enable_deterministic=enable_deterministic)
        if isinstance(spec, PagedAttentionBuildSpec) and type(impl) is DlinferAttentionImpl:
            impl.__class__ = DlinferCudaAttentionImpl  # same state, one more step in forward
            impl.adopt()
        elif (isinstance(spec, ApplyRotaryEmbBuildSpec) and type(impl) is DlinferApplyRotaryEmbImpl
              and settings.flag("DLINFER_LMDEPLOY_FUSE_ROTARY")):
            impl.__class__ = DlinferCudaApplyRotaryEmbImpl  # deferred to the attention (fused with the cache write)
        elif isinstance(spec, FusedMoEBuildSpec) and type(impl) is DlinferFusedMoEImpl:
            impl.__class__ = DlinferCudaFusedMoEImpl  # same state, the weight layout chosen at load
        return impl

    @classmethod
    def update_step_context(cls, step_context):
        """Attach ``DlinferAttentionMetadata`` and ``MoeMetadata`` to ``step_context`` (no host syncs)."""
        clear_deferred_rotary()
        block_size = step_context.kv_caches[0][0].shape[1]
        step_context.attn_metadata = build_attention_metadata(cls.get_attention_metadata_cls(), step_context,
                                                              block_size=block_size)
        tp_size, tp_rank, tp_group = _tensor_parallel_info()
        # A fresh record per step: LMDeploy's MoE impls write router_n_groups / expert ids into it.
        step_context.moe_metadata = MoeMetadata(
            max_tokens_across_dp=step_context.input_ids.numel(),
            tp_size=tp_size,
            tp_rank=tp_rank,
            tp_group=tp_group,
            moe_comm_type=MoECommType.ALLGATHER,
        )
        return step_context

    @staticmethod
    def build_graph_runner(model: torch.nn.Module, model_config, cache_config, backend_config,
                           device: torch.device):
        """LMDeploy's CUDA graph runner, with static buffers for dlinfer's metadata (see ``graph``)."""
        from dlinfer.framework.lmdeploy_ext.graph import DlinferCudaGraphRunner

        return DlinferCudaGraphRunner(model, model_config, cache_config, backend_config, device)

    @staticmethod
    def init():
        """Runs once per process before the model is built (``init_backend``)."""
        import dlinfer  # noqa: F401  (registers the dlinfer ops and vendors)

    @staticmethod
    def ccl_backend() -> str:
        return "nccl"

    @staticmethod
    def device_count():
        return torch.cuda.device_count()

    @staticmethod
    def support_ray():
        """False keeps tensor parallelism on LMDeploy's ``mp`` executor, whose workers dlinfer patches."""
        return False
