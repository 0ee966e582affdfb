"""The one place ops hand a call to a vendor."""

from __future__ import annotations

import torch

from dlinfer.vendor.registry import Call, select


def call_info(op: str, ref: torch.Tensor, *, head_size: int = 0, head_size_v: int = 0, block_size: int = 0,
              features: frozenset[str] = frozenset()) -> Call:
    return Call(op, ref.device.type, ref.dtype, head_size, head_size_v, block_size, features)


def implementation(call: Call):
    """The implementation serving ``call`` (the vendor is chosen from metadata only, then cached)."""
    return select(call)[1]
