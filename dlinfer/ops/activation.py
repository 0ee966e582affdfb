"""Activation ops."""

from __future__ import annotations

import torch

from dlinfer.ops import _checks, table
from dlinfer.ops._dispatch import dtype_selector, eager, run

_select = dtype_selector("silu_and_mul")
_FLOATS = _checks.FLOAT_DTYPES


def _silu_and_mul_impl(x: torch.Tensor) -> torch.Tensor:
    return _select(x.device, x.dtype)(x)


_silu_and_mul = table.define("silu_and_mul", _silu_and_mul_impl)


def silu_and_mul(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Gated SiLU: ``silu(x[..., :d]) * x[..., d:]`` where ``2 * d = x.shape[dim]``.

    Args:
        x: ``[..., 2 * d]`` float32/float16/bfloat16 (the gate half first, then the up half), any strides.
        dim: the dimension split in two (default last).

    Returns:
        A new tensor of ``x``'s shape with ``dim`` halved, in ``x``'s dtype.
    """
    if eager(x) and x.dtype in _FLOATS and type(dim) is int and dim == -1 and x.dim() > 0 and not x.shape[-1] % 2:
        return _silu_and_mul_impl(x)  # the common call, its checks in one expression
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    dim = _checks.integer("dim", dim)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim()}), got {dim}")
    dim %= x.dim()
    if x.shape[dim] % 2:
        raise ValueError(f"x.shape[{dim}] must be even (gate and up halves), got shape {tuple(x.shape)}")
    if dim != x.dim() - 1:
        return run(_silu_and_mul, _silu_and_mul_impl, x.movedim(dim, -1)).movedim(-1, dim)
    return run(_silu_and_mul, _silu_and_mul_impl, x)
