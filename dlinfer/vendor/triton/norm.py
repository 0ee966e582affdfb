"""RMS norm and residual-add + RMS norm, one pass over each row, fp32 math.

A program normalizes ``ROWS`` rows held as one ``[ROWS, BLOCK]`` tile (``BLOCK`` = next power of two of the
hidden size): one row per program for LLM hidden sizes, several for small ones (per-head q/k norms).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlinfer.vendor.triton.host import cdiv, memo, next_power_of_2


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_rows, hidden, eps,
                     stride_x, stride_res, stride_out, stride_sum,
                     HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < hidden)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows64 * stride_res + cols[None, :], mask=mask, other=0.0)
        # The sum is rounded to the input dtype (it is the new residual stream), then normalized.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows64 * stride_sum + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=1) / hidden
    inv = tl.rsqrt(mean_sq + eps)
    w = tl.load(w_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    out = xf * inv[:, None] * w[None, :]
    tl.store(out_ptr + rows64 * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# Launch parameters, in one place: a program covers about NORM_TILE elements (at least one row), with one
# warp per NORM_ELEMS_PER_WARP elements (16 fp32 values per thread at 512), capped at NORM_MAX_WARPS.
NORM_TILE = 4096
NORM_MAX_ROWS = 64
NORM_ELEMS_PER_WARP = 512
NORM_MAX_WARPS = 16


@memo
def _launch_config(hidden: int) -> tuple[int, int, int]:
    block = next_power_of_2(hidden)
    rows = max(1, min(NORM_MAX_ROWS, NORM_TILE // block))
    warps = max(1, min(NORM_MAX_WARPS, rows * block // NORM_ELEMS_PER_WARP))
    return block, rows, warps


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, H]`` with stride 1 along ``H``: itself when it already is (no new view)."""
    if t.dim() == 2 and t.stride()[-1] == 1:
        return t
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])  # a view when the leading dims collapse, else a copy


def _launch(hidden_states, residual, weight, epsilon):
    hidden = hidden_states.shape[-1]
    x = _as_rows(hidden_states)
    # A 2-D input with stride 1 along H gets a row-major output of its own shape from empty_like (the cheapest
    # allocation); other inputs a contiguous one, seen as rows.
    if x is hidden_states:
        out2 = out = torch.empty_like(x)
    else:
        out = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        out2 = out.view(-1, hidden)
    added = sum2 = None
    if residual is not None:
        added = torch.empty_like(out)
        sum2 = added if added.dim() == 2 else added.view(-1, hidden)
    if out.numel() == 0:
        return out, added
    res = _as_rows(residual) if residual is not None else x
    sum2 = out2 if sum2 is None else sum2
    weight = weight if weight.stride()[0] == 1 else weight.contiguous()
    n_rows = x.shape[0]
    block, rows, warps = _launch_config(hidden)
    _rms_norm_kernel[(cdiv(n_rows, rows),)](
        x, res, weight, out2, sum2, n_rows, hidden, float(epsilon),
        x.stride()[0], res.stride()[0], out2.stride()[0], sum2.stride()[0],
        HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK=block, num_warps=warps)
    return out, added


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    return _launch(hidden_states, None, weight, epsilon)[0]


def add_rms_norm(hidden_states: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(hidden_states, residual, weight, epsilon)


OPS = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm}
