"""Mixture-of-experts: router gating and the fused expert computation."""

from __future__ import annotations

from typing import Any

import torch

from dlinfer.errors import NotSupportedError
from dlinfer.ops import _checks, table
from dlinfer.ops._dispatch import dtype_selector, eager, run

_select_gating = dtype_selector("moe_gating_topk_softmax")
_select_fused_moe = dtype_selector("fused_moe")
_FLOATS = _checks.FLOAT_DTYPES
_INDEX = _checks.INDEX_DTYPES
_Tensor = torch.Tensor


def _moe_gating_topk_softmax_impl(router_logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _select_gating(router_logits.device, router_logits.dtype)(router_logits, topk)


_moe_gating_topk_softmax = table.define("moe_gating_topk_softmax", _moe_gating_topk_softmax_impl)


def _fused_moe_impl(
    hidden_states: torch.Tensor,
    gate_up_weights: torch.Tensor,
    down_weights: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    renormalize: bool,
) -> torch.Tensor:
    if _checks.values_checked(topk_ids):
        _checks.in_range(
            "topk_ids", topk_ids, 0, gate_up_weights.shape[0], f"expert ids of {gate_up_weights.shape[0]} experts"
        )
    impl = _select_fused_moe(hidden_states.device, hidden_states.dtype)
    return impl(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, renormalize)


_fused_moe = table.define("fused_moe", _fused_moe_impl)


def _check_metadata(moe_metadata: Any) -> None:
    if moe_metadata is None:
        return
    if getattr(moe_metadata, "ep_size", 1) not in (None, 1):
        raise NotSupportedError(
            f"moe_metadata.ep_size={moe_metadata.ep_size}: expert parallelism is not "
            "supported by dlinfer's in-tree vendors; use tensor parallelism (ep_size=1)"
        )


def _plain_metadata(moe_metadata: Any, gating: bool = False) -> bool:
    """No metadata, or metadata that :func:`_check_metadata` (and, for gating, the grouped-routing check)
    accepts."""
    if moe_metadata is None:
        return True
    if getattr(moe_metadata, "ep_size", 1) not in (None, 1):
        return False
    groups = getattr(moe_metadata, "router_n_groups", -1) if gating else None
    return groups is None or groups <= 1


def moe_gating_topk_softmax(
    router_logits: torch.Tensor, topk: int, moe_metadata: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router gating: softmax over experts (in float32), then the ``topk`` largest per token.

    Args:
        router_logits: ``[T, E]`` float32/float16/bfloat16.
        topk: experts per token, ``1 <= topk <= E``.
        moe_metadata: LMDeploy's :class:`~dlinfer.utils.type_annotation.MoeMetadata` or ``None``;
            grouped routing (``router_n_groups > 1``) is refused.

    Returns:
        ``(weights, ids)``: ``[T, topk]`` float32 softmax probabilities (not renormalized) in descending
        order, and ``[T, topk]`` int64 expert ids. Ties go to the lower expert id.
    """
    if (_plain_metadata(moe_metadata, gating=True) and eager(router_logits) and router_logits.dtype in _FLOATS
            and router_logits.dim() == 2 and type(topk) is int and 1 <= topk <= router_logits.shape[1]):
        return _moe_gating_topk_softmax_impl(router_logits, topk)  # the common call, checked in one expression
    _checks.tensor("router_logits", router_logits, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    topk = _checks.integer("topk", topk, minimum=1)
    if topk > router_logits.shape[1]:
        raise ValueError(f"topk ({topk}) must be <= the number of experts ({router_logits.shape[1]})")
    _check_metadata(moe_metadata)
    groups = getattr(moe_metadata, "router_n_groups", -1) if moe_metadata is not None else -1
    if groups is not None and groups > 1:
        raise NotSupportedError(f"moe_metadata.router_n_groups={groups}: grouped top-k routing is not supported")
    return run(_moe_gating_topk_softmax, _moe_gating_topk_softmax_impl, router_logits, topk)


def check_experts(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, topk, renormalize,
                  weight_dtypes) -> int:
    """The expert-layout checks of ``fused_moe`` and ``fused_moe_w8a8`` (weights of ``weight_dtypes``); returns
    ``topk`` as an int."""
    _checks.tensor("hidden_states", hidden_states, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("gate_up_weights", gate_up_weights, ndim=3, dtypes=weight_dtypes)
    _checks.tensor("down_weights", down_weights, ndim=3, dtypes=weight_dtypes)
    _checks.tensor("topk_weights", topk_weights, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("topk_ids", topk_ids, ndim=2, dtypes=_checks.INDEX_DTYPES)
    topk = _checks.integer("topk", topk, minimum=1)
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    tokens, hidden = hidden_states.shape
    experts, two_inter, _ = gate_up_weights.shape
    _checks.dim_is("gate_up_weights", gate_up_weights, 2, hidden, "the hidden size")
    if two_inter % 2:
        raise ValueError(f"gate_up_weights.shape[1] must be even (gate and up rows), got {two_inter}")
    if tuple(down_weights.shape) != (experts, hidden, two_inter // 2):
        raise ValueError(
            f"down_weights must have shape [{experts}, {hidden}, {two_inter // 2}] "
            f"([E, H, I]), got {tuple(down_weights.shape)}"
        )
    if tuple(topk_ids.shape) != (tokens, topk):
        raise ValueError(f"topk_ids must have shape [{tokens}, {topk}] ([T, topk]), got {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != (tokens, topk):
        raise ValueError(f"topk_weights must have shape [{tokens}, {topk}], got {tuple(topk_weights.shape)}")
    if topk > experts:
        raise ValueError(f"topk ({topk}) must be <= the number of experts ({experts})")
    return topk


def _plain_experts(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, topk, renormalize) -> bool:
    """The common call of ``fused_moe`` in eager mode, checked in one expression: when it holds,
    :func:`check_experts` and the device check pass."""
    if not (eager(hidden_states) and isinstance(gate_up_weights, _Tensor) and isinstance(down_weights, _Tensor)
            and isinstance(topk_weights, _Tensor) and isinstance(topk_ids, _Tensor) and type(topk) is int
            and type(renormalize) is bool and hidden_states.dim() == 2 and gate_up_weights.dim() == 3
            and down_weights.dim() == 3 and topk_weights.dim() == 2 and topk_ids.dim() == 2):
        return False
    dtype, device = hidden_states.dtype, hidden_states.device
    tokens, hidden = hidden_states.shape
    experts, two_inter, gate_up_hidden = gate_up_weights.shape
    pair = (tokens, topk)
    return (dtype in _FLOATS and gate_up_weights.dtype is dtype and down_weights.dtype is dtype
            and topk_weights.dtype in _FLOATS and topk_ids.dtype in _INDEX and gate_up_hidden == hidden
            and not two_inter % 2 and down_weights.shape == (experts, hidden, two_inter // 2)
            and topk_ids.shape == pair and topk_weights.shape == pair and 1 <= topk <= experts
            and gate_up_weights.device == device and down_weights.device == device
            and topk_weights.device == device and topk_ids.device == device)


def fused_moe(
    hidden_states: torch.Tensor,
    gate_up_weights: torch.Tensor,
    down_weights: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    topk: int,
    renormalize: bool,
    moe_metadata: Any = None,
    chunked_moe_layout: Any = None,
) -> torch.Tensor:
    """SwiGLU experts: ``out[t] = sum_k w[t,k] * down[e] @ silu_and_mul(gate_up[e] @ x[t])``, ``e = ids[t,k]``.

    Args:
        hidden_states: ``[T, H]`` float32/float16/bfloat16.
        gate_up_weights: ``[E, 2 * I, H]`` (gate rows first, then up rows), the dtype of ``hidden_states``. Any
            strides: K-fastest (contiguous, as LMDeploy loads them) or N-fastest (``w.transpose(1, 2).contiguous()
            .transpose(1, 2)``, as LMDeploy's CUDA backend lays them out) are read in place by the ``triton``
            vendor; a vendor may copy other layouts.
        down_weights: ``[E, H, I]``, strides as ``gate_up_weights``.
        topk_weights: ``[T, topk]`` routing weights (any float dtype; used in float32).
        topk_ids: ``[T, topk]`` int32/int64 expert ids in ``[0, E)``.
        topk: ``topk_ids.shape[1]``.
        renormalize: divide each token's weights by their sum first.
        moe_metadata: LMDeploy's ``MoeMetadata`` or ``None``; expert parallelism (``ep_size > 1``) is refused.
            Under tensor parallelism each rank holds a slice of ``I`` and the caller all-reduces the output.
        chunked_moe_layout: Ascend-only weight layout; must be ``None``.

    Returns:
        ``[T, H]`` in ``hidden_states``' dtype.
    """
    if (chunked_moe_layout is None and _plain_metadata(moe_metadata) and _plain_experts(
            hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, topk, renormalize)):
        return _fused_moe_impl(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, renormalize)
    topk = check_experts(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, topk, renormalize,
                         (hidden_states.dtype,))
    _checks.same_device(
        hidden_states=hidden_states,
        gate_up_weights=gate_up_weights,
        down_weights=down_weights,
        topk_weights=topk_weights,
        topk_ids=topk_ids,
    )
    _check_metadata(moe_metadata)
    if chunked_moe_layout is not None:
        raise NotSupportedError("chunked_moe_layout is an Ascend-only weight layout; pass None")
    return run(
        _fused_moe, _fused_moe_impl, hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, renormalize
    )
