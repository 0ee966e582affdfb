"""Memory layouts of expert weights ``[E, N, K]`` that ``fused_moe`` accepts in place (see ``dlinfer.ops.fused_moe``).

K-fastest is the contiguous layout LMDeploy loads; N-fastest keeps the shape and values with N the unit-stride
dimension (strides ``(N * K, 1, N)``), the layout LMDeploy's CUDA backend serves its experts in.
"""

from __future__ import annotations

import torch


def n_fastest(weight: torch.Tensor) -> torch.Tensor:
    """A copy of an ``[E, N, K]`` expert weight with the same shape and values, N the unit-stride dimension."""
    if weight.dim() != 3:
        raise ValueError(f"weight: expected an [experts, N, K] tensor, got shape {tuple(weight.shape)}")
    return weight.transpose(1, 2).contiguous().transpose(1, 2)


def is_n_fastest(weight: torch.Tensor) -> bool:
    """Whether an ``[E, N, K]`` expert weight is N-fastest (N the unit-stride dimension, K not)."""
    return weight.stride(2) != 1 and weight.stride(1) == 1
