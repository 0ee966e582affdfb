"""vLLM's unquantized fused-MoE method on ``dlinfer.ops.moe_gating_topk_softmax`` + ``dlinfer.ops.fused_moe``.

The method is monolithic (router logits in, expert output out): gating (softmax, top-k) and the SwiGLU
experts both run through dlinfer. vLLM's loaded weights are already dlinfer's layout (``w13 [E, 2I, H]``,
gate rows first; ``w2 [E, H, I]``), so ``process_weights_after_loading`` does not repack them for vLLM's CPU
kernels: it keeps them K-fastest, or lays them out N-fastest (same shape and values, N the unit-stride dimension)
where the vendor serving ``fused_moe`` on their device and dtype says its kernels are faster on that layout
(``dlinfer.vendor.preferred_weight_layout``).

Served: softmax routing with or without top-k renormalization (Mixtral, Qwen2/3-MoE, ...), SiLU gated
experts, no bias, tensor parallel (the runner all-reduces the partial sums). Anything else (sigmoid or
grouped routing, a correction bias, expert parallelism, other activations, LoRA...) keeps vLLM's method, and
the reason is logged once.
"""

from __future__ import annotations

import logging

import torch

import dlinfer.ops as dl
from dlinfer.framework.vllm_ext import compat, log_summary_once
from dlinfer.framework.vllm_ext.counters import hit
from dlinfer.utils.layout import n_fastest
from dlinfer.vendor import preferred_weight_layout
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, RoutingMethodType
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

logger = logging.getLogger("vllm.dlinfer")

__all__ = ["DlinferUnquantizedFusedMoEMethod", "UnquantizedFusedMoEMethod", "config_refusal"]

# Softmax -> top-k (Default), softmax -> top-k -> renormalize (RenormalizeNaive) and top-k -> softmax
# (Renormalize, the same numbers as RenormalizeNaive).
_SERVED_ROUTING = (RoutingMethodType.Default, RoutingMethodType.RenormalizeNaive, RoutingMethodType.Renormalize)
_logged: set[str] = set()


def config_refusal(moe: FusedMoEConfig) -> str | None:
    """Why dlinfer cannot serve a MoE layer of this configuration, or ``None``."""
    if moe.routing_method not in _SERVED_ROUTING:
        return f"routing method {moe.routing_method.name} (dlinfer serves softmax top-k, optionally renormalized)"
    if moe.activation != MoEActivation.SILU:
        return f"activation {moe.activation.value} (dlinfer's fused_moe is SwiGLU: silu(gate) * up)"
    if moe.has_bias:
        return "expert biases"
    if moe.is_lora_enabled:
        return "LoRA on experts"
    if compat.moe_has_hash_routing(moe):
        return "hash routing"
    par = moe.moe_parallel_config
    if par.use_ep or par.ep_size > 1:
        return "expert parallelism"
    if par.dp_size > 1 or par.pcp_size > 1 or par.is_sequence_parallel:
        return "data/context/sequence parallel MoE dispatch"
    if moe.num_local_experts != moe.num_experts:
        return "experts split across ranks"
    for name in ("swiglu_limit", "swiglu_alpha", "swiglu_beta"):
        if getattr(moe, name, None) is not None:
            return f"{name} (clamped/scaled SwiGLU)"
    return None


def layer_refusal(layer) -> str | None:
    """Layer attributes the config does not carry."""
    if getattr(layer, "use_grouped_topk", False) or (getattr(layer, "num_expert_group", None) or 0) > 1:
        return "grouped top-k routing"
    if getattr(layer, "custom_routing_function", None) is not None:
        return "a custom routing function"
    if getattr(layer, "scoring_func", "softmax") != "softmax":
        return f"scoring function {layer.scoring_func}"
    if getattr(layer, "e_score_correction_bias", None) is not None:
        return "a routing correction bias"
    if float(getattr(layer, "routed_scaling_factor", 1.0) or 1.0) != 1.0:
        return f"routed_scaling_factor {layer.routed_scaling_factor}"
    if getattr(layer, "apply_router_weight_on_input", False):
        return "router weights applied on the input"
    if getattr(layer, "expert_map", None) is not None:
        return "an expert map (expert parallelism)"
    return None


def expert_layout(weight: torch.Tensor) -> str:
    """``"n_fastest"`` or ``"k_fastest"``: the expert-weight layout the vendor serving ``fused_moe`` for weights
    like ``weight`` prefers (K-fastest where no vendor serves them: the first call reports that). Logged once."""
    layout = preferred_weight_layout("fused_moe", weight.device, weight.dtype)
    message = f"expert weights laid out {'N' if layout == 'n_fastest' else 'K'}-fastest on {weight.device.type} " \
              f"{str(weight.dtype).removeprefix('torch.')} (the fused_moe vendor's preference)"
    if message not in _logged:
        _logged.add(message)
        logger.info("dlinfer: %s", message)
    return layout


class DlinferUnquantizedFusedMoEMethod(UnquantizedFusedMoEMethod):
    """Gating + SwiGLU experts through dlinfer (see the module docstring for what is served)."""

    _dlinfer_refusal: str | None = None  # why this layer keeps vLLM's method (None: dlinfer serves it)

    def __init__(self, moe: FusedMoEConfig):
        super().__init__(moe)
        log_summary_once()
        self._dlinfer_refusal = config_refusal(moe)
        self._log_refusal()

    def _log_refusal(self) -> None:
        reason = self._dlinfer_refusal
        if reason is not None and reason not in _logged:
            _logged.add(reason)
            logger.info("dlinfer: fused MoE keeps vLLM's implementation: %s", reason)

    @property
    def is_monolithic(self) -> bool:
        if self._dlinfer_refusal is None:
            return True
        return super().is_monolithic

    def process_weights_after_loading(self, layer) -> None:
        if self._dlinfer_refusal is None:
            self._dlinfer_refusal = layer_refusal(layer)
            self._log_refusal()
        if self._dlinfer_refusal is not None:
            super().process_weights_after_loading(layer)
            return
        # dlinfer's [E, N, K] shapes as loaded; the memory layout the serving vendor streams fastest.
        layout = expert_layout(layer.w13_weight.data)
        for name in ("w13_weight", "w2_weight"):
            param = getattr(layer, name)
            param.data = n_fastest(param.data) if layout == "n_fastest" else param.data.contiguous()

    def apply_monolithic(self, layer, x: torch.Tensor, router_logits: torch.Tensor,
                         input_ids: torch.Tensor | None = None):
        if self._dlinfer_refusal is not None:
            return super().apply_monolithic(layer, x, router_logits, input_ids)
        top_k = layer.top_k
        hit("moe_gating_topk_softmax")
        topk_weights, topk_ids = dl.moe_gating_topk_softmax(router_logits, top_k)
        hit("fused_moe")
        return dl.fused_moe(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, top_k,
                            bool(layer.renormalize))
