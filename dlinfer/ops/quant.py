"""Quantized linear-family ops: AWQ W4A16 (``weight_quant_matmul``) and SmoothQuant-style W8A8 (``dynamic_quant``,
``linear_w8a8``, ``linear_w8a8_static``, ``rms_norm_w8a8``, ``add_rms_norm_w8a8``, ``fused_moe_w8a8``), with
LMDeploy 0.18's signatures.

Quantized dtype: ``torch.int8`` (symmetric, range -127..127 for dynamic scales). fp8 ``quant_dtype`` is refused with a
``ValueError`` naming ``quant_dtype``.
"""

from __future__ import annotations

from typing import Any

import torch

from dlinfer.ops import _checks, table
from dlinfer.ops._dispatch import dtype_selector, eager, implementation, run
from dlinfer.ops.linear import _process_group
from dlinfer.ops.moe import _check_metadata, check_experts
from dlinfer.ops.norm import _plain as _plain_norm, _plain_residual

_AWQ_GROUP_SIZES = (32, 64, 128)
_FLOATS = _checks.FLOAT_DTYPES
_I8, _F32 = torch.int8, torch.float32
_Tensor = torch.Tensor
_select_dynamic_quant = dtype_selector("dynamic_quant")
_select_linear_w8a8 = dtype_selector("linear_w8a8")
_select_rms_norm_w8a8 = dtype_selector("rms_norm_w8a8")
_select_add_rms_norm_w8a8 = dtype_selector("add_rms_norm_w8a8")


def _weight_quant_matmul_impl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                              offset: torch.Tensor | None, bias: torch.Tensor | None,
                              group_size: int) -> torch.Tensor:
    return implementation("weight_quant_matmul", x)(x, qweight, scale, offset, bias, group_size)


def _dynamic_quant_impl(x: torch.Tensor, quant_dtype: torch.dtype,
                        quant_granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("dynamic_quant", x)(x, quant_dtype, quant_granularity)


def _linear_w8a8_impl(a: torch.Tensor, b: torch.Tensor, rms_scale: torch.Tensor, linear_scale: torch.Tensor,
                      out_dtype: torch.dtype, quant_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    return implementation("linear_w8a8", a)(a, b, rms_scale, linear_scale, out_dtype, quant_dtype, bias)


def _linear_w8a8_static_impl(x: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor,
                             input_offset: torch.Tensor, deq_scale: torch.Tensor, out_dtype: torch.dtype,
                             quant_dtype: torch.dtype, quant_bias: torch.Tensor | None) -> torch.Tensor:
    return implementation("linear_w8a8_static", x)(x, weight, input_scale, input_offset, deq_scale, out_dtype,
                                                   quant_dtype, quant_bias)


def _rms_norm_w8a8_impl(hidden_states: torch.Tensor, weight: torch.Tensor, epsilon: float,
                        quant_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("rms_norm_w8a8", hidden_states)(hidden_states, weight, epsilon, quant_dtype)


def _add_rms_norm_w8a8_impl(hidden_states: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            epsilon: float, quant_dtype: torch.dtype
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return implementation("add_rms_norm_w8a8", hidden_states)(hidden_states, residual, weight, epsilon, quant_dtype)


def _fused_moe_w8a8_impl(hidden_states: torch.Tensor, gate_up_weights: torch.Tensor, gate_up_scales: torch.Tensor,
                         down_weights: torch.Tensor, down_scales: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor, renormalize: bool) -> torch.Tensor:
    if _checks.values_checked(topk_ids):
        experts = gate_up_weights.shape[0]
        _checks.in_range("topk_ids", topk_ids, 0, experts, f"expert ids of {experts} experts")
    return implementation("fused_moe_w8a8", hidden_states)(hidden_states, gate_up_weights, gate_up_scales,
                                                           down_weights, down_scales, topk_weights, topk_ids,
                                                           renormalize)


_weight_quant_matmul = table.define("weight_quant_matmul", _weight_quant_matmul_impl)
_dynamic_quant = table.define("dynamic_quant", _dynamic_quant_impl)
_linear_w8a8 = table.define("linear_w8a8", _linear_w8a8_impl)
_linear_w8a8_static = table.define("linear_w8a8_static", _linear_w8a8_static_impl)
_rms_norm_w8a8 = table.define("rms_norm_w8a8", _rms_norm_w8a8_impl)
_add_rms_norm_w8a8 = table.define("add_rms_norm_w8a8", _add_rms_norm_w8a8_impl)
_fused_moe_w8a8 = table.define("fused_moe_w8a8", _fused_moe_w8a8_impl)


# ------------------------------------------------------------------------------------------------ checks
def _quant_dtype(quant_dtype) -> torch.dtype:
    if not isinstance(quant_dtype, torch.dtype):
        raise TypeError(f"quant_dtype must be a torch.dtype, got {type(quant_dtype).__name__}")
    if quant_dtype != torch.int8:
        raise ValueError(f"quant_dtype must be torch.int8, got {quant_dtype} (fp8 W8A8 is not supported)")
    return quant_dtype


def _out_dtype(out_dtype) -> torch.dtype:
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"out_dtype must be a torch.dtype, got {type(out_dtype).__name__}")
    if out_dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    return out_dtype


def _rows(x: torch.Tensor) -> int:
    n = 1
    for s in x.shape[:-1]:
        n *= s
    return n


def _vector_shape(t: torch.Tensor, n: int) -> bool:
    return t.numel() == n and (t.dim() == 1 or (t.dim() >= 2 and t.shape[-1] == 1))


def _vector(name: str, t: torch.Tensor, n: int, what: str, dtypes) -> None:
    """A per-row/per-channel vector of ``n`` values: ``[n]``, or any shape ending in 1 (``[n, 1]``, ``[..., 1]``)."""
    _checks.tensor(name, t, dtypes=dtypes)
    if not _vector_shape(t, n):
        raise ValueError(f"{name} must hold {n} values ({what}) as [{n}] or [..., 1], got shape {tuple(t.shape)}")


def _all_reduce(out: torch.Tensor, all_reduce: bool, group: Any) -> torch.Tensor:
    if all_reduce:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("all_reduce=True needs an initialized torch.distributed process group")
        dist.all_reduce(out, group=_process_group(group))
    return out


# ------------------------------------------------------------------------------------------------ public ops
def weight_quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                        offset: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                        all_reduce: bool = False, group_size: int = 0) -> torch.Tensor:
    """AWQ W4A16 linear: ``x @ W + bias`` with ``W[k, n] = (q[k, n] - zero[k // g, n]) * scale[k // g, n]``.

    The layouts are AWQ's GEMM checkpoint layouts, as LMDeploy loads them:

    Args:
        x: ``[M, K]`` float16/bfloat16/float32 activations (LMDeploy squeezes its batch dim first).
        qweight: ``[K, N / 8]`` int32; each word holds 8 unsigned 4-bit values of 8 consecutive output columns in
            AWQ's nibble order: bits ``4i..4i+3`` hold column ``(0, 2, 4, 6, 1, 3, 5, 7)[i]`` of the group.
        scale: ``[K / g, N]``, x's dtype: the per-group scales.
        offset: ``[K / g, N / 8]`` int32: the per-group 4-bit zero points, packed like ``qweight``; ``None``
            means zero point 8 everywhere (symmetric int4).
        bias: optional ``[N]``, x's dtype.
        all_reduce: sum the result over the default process group (row-parallel layers).
        group_size: ``g``, one of 32, 64, 128; ``0`` takes it from the shapes (``K / scale.shape[0]``).

    Returns ``[M, N]`` in x's dtype.
    """
    _checks.tensor("x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("qweight", qweight, ndim=2, dtypes=(torch.int32,))
    _checks.tensor("scale", scale, ndim=2, dtypes=(x.dtype,))
    k, n = qweight.shape[0], qweight.shape[1] * 8
    _checks.dim_is("qweight", qweight, 0, x.shape[1], "x.shape[1]")
    _checks.dim_is("scale", scale, 1, n, "qweight.shape[1] * 8")
    group_size = _checks.integer("group_size", group_size, minimum=0)
    if group_size == 0:
        if scale.shape[0] == 0 or k % scale.shape[0]:
            raise ValueError(f"group_size=0: cannot infer the group size, K={k} is not a multiple of "
                             f"scale.shape[0]={scale.shape[0]}")
        group_size = k // scale.shape[0]
    if group_size not in _AWQ_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {_AWQ_GROUP_SIZES} (or 0 to infer), got {group_size}")
    if k % group_size:
        raise ValueError(f"qweight.shape[0] (K={k}) must be a multiple of group_size={group_size}")
    _checks.dim_is("scale", scale, 0, k // group_size, "K / group_size")
    if offset is not None:
        _checks.tensor("offset", offset, ndim=2, dtypes=(torch.int32,))
        if tuple(offset.shape) != (k // group_size, n // 8):
            raise ValueError(f"offset must have shape {(k // group_size, n // 8)} ([K / group_size, N / 8]), got "
                             f"{tuple(offset.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=(x.dtype,))
        _checks.dim_is("bias", bias, 0, n, "N (qweight.shape[1] * 8)")
    _checks.same_device(x=x, qweight=qweight, scale=scale, offset=offset, bias=bias)
    out = run(_weight_quant_matmul, _weight_quant_matmul_impl, x, qweight, scale, offset, bias, group_size)
    return _all_reduce(out, all_reduce, "")


def dynamic_quant(x: torch.Tensor, quant_dtype: torch.dtype = torch.int8, quant_granularity: str = "PER_TOKEN"):
    """Symmetric per-token quantization: ``scale = max|x[t, :]| / 127``, ``q = round(x / scale)``.

    Args:
        x: ``[..., K]`` float16/bfloat16/float32.
        quant_dtype: ``torch.int8`` (fp8 is refused).
        quant_granularity: ``'PER_TOKEN'``.

    Returns ``(q, scale)``: int8 of x's shape and float32 ``[..., 1]`` (an all-zero row gets scale ``1/127``).
    """
    if (quant_dtype is _I8 and quant_granularity == "PER_TOKEN" and eager(x) and x.dtype in _FLOATS
            and x.dim() > 0):  # the common call, checked in one expression
        return _select_dynamic_quant(x.device, x.dtype)(x, quant_dtype, quant_granularity)
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    quant_dtype = _quant_dtype(quant_dtype)
    if quant_granularity != "PER_TOKEN":
        raise ValueError(f"quant_granularity must be 'PER_TOKEN', got {quant_granularity!r}")
    return run(_dynamic_quant, _dynamic_quant_impl, x, quant_dtype, quant_granularity)


def linear_w8a8(a: torch.Tensor, b: torch.Tensor, rms_scale: torch.Tensor, linear_scale: torch.Tensor,
                out_dtype: torch.dtype, quant_dtype: torch.dtype = torch.int8,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 linear with dynamic activation scales: ``(a @ b.T) * rms_scale * linear_scale.T + bias``.

    The int8 products accumulate in int32 (exact); both scales are applied to the accumulator in float32.

    Args:
        a: ``[..., K]`` int8 activations (from ``dynamic_quant`` or ``rms_norm_w8a8``).
        b: ``[N, K]`` int8 weight (LMDeploy's W8A8 layout).
        rms_scale: float32 per-token scales, ``[M]`` or ``a.shape[:-1] + (1,)`` (``M`` = rows of ``a``).
        linear_scale: float32 per-output-channel weight scales, ``[N]`` or ``[N, 1]``.
        out_dtype: float16/bfloat16/float32.
        quant_dtype: ``torch.int8``.
        bias: optional ``[N]`` in ``out_dtype``.

    Returns ``[..., N]`` in ``out_dtype``.
    """
    if _plain_linear_w8a8(a, b, rms_scale, linear_scale, out_dtype, quant_dtype, bias):
        return _select_linear_w8a8(a.device, _I8)(a, b, rms_scale, linear_scale, out_dtype, quant_dtype, bias)
    quant_dtype = _quant_dtype(quant_dtype)
    out_dtype = _out_dtype(out_dtype)
    _checks.tensor("a", a, dtypes=(quant_dtype,))
    if a.dim() == 0:
        raise ValueError("a must have at least 1 dimension, got a scalar")
    _checks.tensor("b", b, ndim=2, dtypes=(quant_dtype,))
    _checks.dim_is("b", b, 1, a.shape[-1], "a.shape[-1]")
    _vector("rms_scale", rms_scale, _rows(a), "one scale per token of a", (torch.float32,))
    _vector("linear_scale", linear_scale, b.shape[0], "one scale per output channel of b", (torch.float32,))
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=(out_dtype,))
        _checks.dim_is("bias", bias, 0, b.shape[0], "b.shape[0]")
    _checks.same_device(a=a, b=b, rms_scale=rms_scale, linear_scale=linear_scale, bias=bias)
    return run(_linear_w8a8, _linear_w8a8_impl, a, b, rms_scale, linear_scale, out_dtype, quant_dtype, bias)


def _plain_linear_w8a8(a, b, rms_scale, linear_scale, out_dtype, quant_dtype, bias) -> bool:
    """The common call of ``linear_w8a8`` in eager mode, checked in one pass: when it holds, its named checks
    pass."""
    if not (quant_dtype is _I8 and out_dtype in _FLOATS and eager(a) and isinstance(b, _Tensor)
            and isinstance(rms_scale, _Tensor) and isinstance(linear_scale, _Tensor) and a.dtype is _I8
            and b.dtype is _I8 and a.dim() > 0 and b.dim() == 2 and rms_scale.dtype is _F32
            and linear_scale.dtype is _F32):
        return False
    device, n = a.device, b.shape[0]
    return (b.shape[1] == a.shape[-1] and _vector_shape(rms_scale, _rows(a)) and _vector_shape(linear_scale, n)
            and b.device == device and rms_scale.device == device and linear_scale.device == device
            and (bias is None or (isinstance(bias, _Tensor) and bias.dtype is out_dtype and bias.dim() == 1
                                  and bias.shape[0] == n and bias.device == device)))


def linear_w8a8_static(x: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor,
                       deq_scale: torch.Tensor, out_dtype: torch.dtype, quant_dtype: torch.dtype = torch.int8,
                       quant_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Static (ModelSlim-style) W8A8 linear: one calibrated per-tensor activation scale and offset.

    ``xq = clamp(round(x / input_scale) + input_offset, -128, 127)``;
    ``out = (xq @ weight.T + quant_bias) * deq_scale`` (integer accumulation, the bias in accumulator units, so
    it also carries the offset's correction ``-input_offset * weight.sum(1)``).

    Args:
        x: ``[..., K]`` float16/bfloat16/float32.
        weight: ``[N, K]`` int8.
        input_scale: ``[1]`` float tensor (positive).
        input_offset: ``[1]`` int8 (or any integer/float dtype holding an integer).
        deq_scale: ``[N]`` float32 (``input_scale * weight_scale``).
        out_dtype: float16/bfloat16/float32.
        quant_dtype: ``torch.int8``.
        quant_bias: optional ``[N]`` int32.
    """
    quant_dtype = _quant_dtype(quant_dtype)
    out_dtype = _out_dtype(out_dtype)
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    _checks.tensor("weight", weight, ndim=2, dtypes=(quant_dtype,))
    _checks.dim_is("weight", weight, 1, x.shape[-1], "x.shape[-1]")
    for name, t in (("input_scale", input_scale), ("input_offset", input_offset)):
        _checks.tensor(name, t)
        if t.numel() != 1:
            raise ValueError(f"{name} must hold one value (per-tensor), got shape {tuple(t.shape)}")
    _checks.tensor("input_scale", input_scale, dtypes=_checks.FLOAT_DTYPES)
    _vector("deq_scale", deq_scale, weight.shape[0], "one scale per output channel", (torch.float32,))
    if quant_bias is not None:
        _checks.tensor("quant_bias", quant_bias, ndim=1, dtypes=(torch.int32,))
        _checks.dim_is("quant_bias", quant_bias, 0, weight.shape[0], "weight.shape[0]")
    _checks.same_device(x=x, weight=weight, input_scale=input_scale, input_offset=input_offset, deq_scale=deq_scale,
                        quant_bias=quant_bias)
    return run(_linear_w8a8_static, _linear_w8a8_static_impl, x, weight, input_scale, input_offset, deq_scale,
               out_dtype, quant_dtype, quant_bias)


def _norm_check(hidden_states, weight, epsilon, residual=None) -> float:
    from dlinfer.ops.norm import _check

    return _check(hidden_states, weight, epsilon, residual)


def rms_norm_w8a8(hidden_states: torch.Tensor, weight: torch.Tensor, epsilon: float = 1e-6,
                  quant_dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS norm then per-token int8 quantization of the normed rows (as ``rms_norm`` then ``dynamic_quant``, the
    normed row kept in float32 between them).

    Returns ``(q, scale)``: int8 of hidden_states' shape, float32 ``[..., 1]``.
    """
    device = _plain_norm(hidden_states, weight, epsilon) if quant_dtype is _I8 else None
    if device is not None:  # the common call (rms_norm's one-pass check)
        return _select_rms_norm_w8a8(device, hidden_states.dtype)(hidden_states, weight, epsilon, quant_dtype)
    quant_dtype = _quant_dtype(quant_dtype)
    epsilon = _norm_check(hidden_states, weight, epsilon)
    return run(_rms_norm_w8a8, _rms_norm_w8a8_impl, hidden_states, weight, epsilon, quant_dtype)


def add_rms_norm_w8a8(hidden_states: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      epsilon: float = 1e-6, quant_dtype: torch.dtype = torch.int8
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add, RMS norm, per-token int8 quantization: ``(q, scale, hidden_states + residual)``.

    The sum is rounded to the input dtype first (it is the new residual stream), then normed in float32.
    """
    device = _plain_norm(hidden_states, weight, epsilon) if quant_dtype is _I8 else None
    if device is not None and _plain_residual(hidden_states, residual, device):
        return _select_add_rms_norm_w8a8(device, hidden_states.dtype)(hidden_states, residual, weight, epsilon,
                                                                      quant_dtype)
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__} "
                        "(use rms_norm_w8a8 without one)")
    quant_dtype = _quant_dtype(quant_dtype)
    epsilon = _norm_check(hidden_states, weight, epsilon, residual)
    return run(_add_rms_norm_w8a8, _add_rms_norm_w8a8_impl, hidden_states, residual, weight, epsilon, quant_dtype)


def fused_moe_w8a8(hidden_states: torch.Tensor, gate_up_weights: torch.Tensor, gate_up_scales: torch.Tensor,
                   down_weights: torch.Tensor, down_scales: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, topk: int, renormalize: bool, moe_metadata: Any = None) -> torch.Tensor:
    """W8A8 SwiGLU experts (as ``fused_moe``, quantized): each token's hidden state is quantized per token to int8,
    ``gate_up = (xq @ gate_up[e].T) * x_scale * gate_up_scales[e]``, ``act = silu(gate) * up`` (rounded to the
    input dtype), quantized per token again, ``y = (aq @ down[e].T) * a_scale * down_scales[e]``, and
    ``out[t] = sum_k w[t, k] * y``.

    Args:
        hidden_states: ``[T, H]`` float16/bfloat16/float32.
        gate_up_weights: ``[E, 2 * I, H]`` int8 (gate rows, then up rows).
        gate_up_scales: ``[E, 2 * I, 1]`` (or ``[E, 2 * I]``) per-output-channel scales, float32 or bfloat16.
        down_weights: ``[E, H, I]`` int8.
        down_scales: ``[E, H, 1]`` (or ``[E, H]``).
        topk_weights: ``[T, topk]`` routing weights (used in float32).
        topk_ids: ``[T, topk]`` int32/int64 expert ids in ``[0, E)``.
        topk: ``topk_ids.shape[1]``.
        renormalize: divide each token's weights by their sum first.
        moe_metadata: LMDeploy's ``MoeMetadata`` or ``None``; expert parallelism is refused (as for ``fused_moe``).

    Returns ``[T, H]`` in hidden_states' dtype.
    """
    topk = check_experts(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, topk, renormalize,
                         (torch.int8,))
    experts, two_inter, hidden = gate_up_weights.shape
    for name, t, rows in (("gate_up_scales", gate_up_scales, two_inter), ("down_scales", down_scales, hidden)):
        _checks.tensor(name, t, dtypes=_checks.FLOAT_DTYPES)
        if t.numel() != experts * rows or t.dim() not in (2, 3) or t.shape[:2] != (experts, rows):
            raise ValueError(f"{name} must have shape [{experts}, {rows}, 1] or [{experts}, {rows}], got "
                             f"{tuple(t.shape)}")
    _checks.same_device(hidden_states=hidden_states, gate_up_weights=gate_up_weights, gate_up_scales=gate_up_scales,
                        down_weights=down_weights, down_scales=down_scales, topk_weights=topk_weights,
                        topk_ids=topk_ids)
    _check_metadata(moe_metadata)
    return run(_fused_moe_w8a8, _fused_moe_w8a8_impl, hidden_states, gate_up_weights, gate_up_scales, down_weights,
               down_scales, topk_weights, topk_ids, renormalize)
