"""Dense linear layer."""

from __future__ import annotations

from typing import Any

import torch

from dlinfer.ops import _checks, table
from dlinfer.ops._dispatch import dtype_selector, eager, run

_select = dtype_selector("linear")
_FLOATS = _checks.FLOAT_DTYPES
_Tensor = torch.Tensor


def _linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _select(x.device, x.dtype)(x, weight, bias)


_linear = table.define("linear", _linear_impl)


def _process_group(group: Any):
    """LMDeploy passes ``group=''`` for the default group; a ``ProcessGroup`` is used as is."""
    if group is None or (isinstance(group, str) and group == ""):
        return None
    if isinstance(group, str):
        raise ValueError(f"group must be '' (the default process group) or a ProcessGroup, got {group!r}")
    return group


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, all_reduce: bool = False, group: Any = ""
) -> torch.Tensor:
    """``x @ weight.T + bias``, optionally all-reduced across a tensor-parallel group.

    Args:
        x: ``[..., K]`` float32/float16/bfloat16.
        weight: ``[N, K]``, same dtype.
        bias: optional ``[N]``.
        all_reduce: sum the result over ``group`` (row-parallel layers) with ``torch.distributed``.
        group: ``''`` for the default process group, or a ``torch.distributed.ProcessGroup``.
    """
    if not all_reduce and eager(x) and isinstance(weight, _Tensor):  # the common call, checked in one expression
        device, dtype = x.device, x.dtype
        if (dtype in _FLOATS and weight.dtype is dtype and weight.dim() == 2 and x.dim() > 0
                and weight.shape[1] == x.shape[-1] and weight.device == device
                and (bias is None or (isinstance(bias, _Tensor) and bias.dtype is dtype and bias.dim() == 1
                                      and bias.shape[0] == weight.shape[0] and bias.device == device))):
            return _select(device, dtype)(x, weight, bias)
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, ndim=2, dtypes=(x.dtype,))
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    _checks.dim_is("weight", weight, 1, x.shape[-1], "x.shape[-1]")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=(x.dtype,))
        _checks.dim_is("bias", bias, 0, weight.shape[0], "weight.shape[0]")
    _checks.same_device(x=x, weight=weight, bias=bias)
    out = run(_linear, _linear_impl, x, weight, bias)
    if all_reduce:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(out, group=_process_group(group))
        else:
            raise ValueError("all_reduce=True needs an initialized torch.distributed process group")
    return out
