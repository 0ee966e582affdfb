"""RMS normalization ops."""

from __future__ import annotations

import torch

from dlinfer.ops import _checks, table
from dlinfer.ops._dispatch import dtype_selector, eager, run

_select_rms_norm = dtype_selector("rms_norm")
_select_add_rms_norm = dtype_selector("add_rms_norm")
_FLOATS = _checks.FLOAT_DTYPES
_Tensor = torch.Tensor
_INF = float("inf")


def _rms_norm_impl(hidden_states: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    return _select_rms_norm(hidden_states.device, hidden_states.dtype)(hidden_states, weight, epsilon)


_rms_norm = table.define("rms_norm", _rms_norm_impl)


def _add_rms_norm_impl(
    hidden_states: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _select_add_rms_norm(hidden_states.device, hidden_states.dtype)(hidden_states, residual, weight, epsilon)


_add_rms_norm = table.define("add_rms_norm", _add_rms_norm_impl)


def _plain(hidden_states, weight, epsilon) -> torch.device | None:
    """The common call, checked in one pass (eager mode only): ``hidden_states``' device when it holds (then
    :func:`_check` passes), else None."""
    if not (eager(hidden_states) and isinstance(weight, _Tensor) and type(epsilon) is float
            and 0.0 <= epsilon < _INF and hidden_states.dtype in _FLOATS and weight.dtype in _FLOATS
            and weight.dim() == 1 and hidden_states.dim() > 0 and weight.shape[0] == hidden_states.shape[-1]):
        return None
    device = hidden_states.device
    return device if weight.device == device else None


def _plain_residual(hidden_states, residual, device) -> bool:
    """``residual`` as :func:`_check` wants it, for a common call whose ``hidden_states`` are on ``device``."""
    return (isinstance(residual, _Tensor) and residual.dtype is hidden_states.dtype
            and residual.shape == hidden_states.shape and residual.device == device)


def _check(hidden_states, weight, epsilon, residual=None) -> float:
    _checks.tensor("hidden_states", hidden_states, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    if hidden_states.dim() == 0:
        raise ValueError("hidden_states must have at least 1 dimension, got a scalar")
    _checks.dim_is("weight", weight, 0, hidden_states.shape[-1], "hidden_states.shape[-1]")
    if residual is not None:
        _checks.tensor("residual", residual, dtypes=_checks.FLOAT_DTYPES)
        if residual.shape != hidden_states.shape:
            raise ValueError(
                f"residual must have hidden_states' shape {tuple(hidden_states.shape)}, got {tuple(residual.shape)}"
            )
        _checks.same_dtype(hidden_states=hidden_states, residual=residual)
    _checks.same_device(hidden_states=hidden_states, weight=weight, residual=residual)
    epsilon = _checks.number("epsilon", epsilon)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    return epsilon


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """Root-mean-square normalization over the last dimension.

    ``out = hidden * rsqrt(mean(hidden.float()**2, -1) + epsilon) * weight``, computed in float32, returned in
    ``hidden_states``' dtype.

    Args:
        hidden_states: ``[..., H]`` float32/float16/bfloat16.
        weight: ``[H]``, any of those dtypes (it need not match ``hidden_states``: a float32 weight with float16
            input is accepted, applied in float32, and the output is float16).
        epsilon: added to the mean square.
    """
    device = _plain(hidden_states, weight, epsilon)
    if device is not None:
        return _select_rms_norm(device, hidden_states.dtype)(hidden_states, weight, epsilon)
    epsilon = _check(hidden_states, weight, epsilon)
    return run(_rms_norm, _rms_norm_impl, hidden_states, weight, epsilon)


def add_rms_norm(
    hidden_states: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMS norm, in one pass: returns ``(rms_norm(hidden + residual), hidden + residual)``.

    The sum is rounded to the input dtype before it is normalized (as a separate add would do), so the
    second output is exactly the new residual stream.

    Args:
        hidden_states: ``[..., H]``.
        residual: same shape and dtype as ``hidden_states`` (required: a ``TypeError`` names it otherwise).
        weight: ``[H]``, any float dtype (applied in float32, as in ``rms_norm``).
        epsilon: added to the mean square.
    """
    device = _plain(hidden_states, weight, epsilon)
    if device is not None and _plain_residual(hidden_states, residual, device):
        return _select_add_rms_norm(device, hidden_states.dtype)(hidden_states, residual, weight, epsilon)
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__} (use rms_norm without one)")
    epsilon = _check(hidden_states, weight, epsilon, residual)
    return run(_add_rms_norm, _add_rms_norm_impl, hidden_states, residual, weight, epsilon)
