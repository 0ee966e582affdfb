"""torch's CUDA arithmetic where it differs from its CPU arithmetic, for CPU tests of device-independence.

``tensor / number`` (a Python scalar divisor) on a CUDA tensor is not a division: ATen's CUDA ``div_true`` kernel
computes ``a * (1 / b)``, the reciprocal rounded to the operation's math type (float32 for float32 and 16-bit
tensors), a multiplication that can differ from the correctly rounded quotient in the last bit. On the CPU
float32 ``/`` divides. :func:`cuda_scalar_division` makes CPU tensors divide the CUDA way, so a CPU test sees
the results a GPU run would (only for float32 tensors, the case that matters to exact-write ops; a tensor
divisor is a real division on both devices).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


def _reciprocal_times(a: torch.Tensor, b) -> torch.Tensor:
    inv = float(np.float32(1.0) / np.float32(b))  # float32 reciprocal, as CUDA computes it once per launch
    return a * inv  # float32 * (a float32 value): one rounding, as the CUDA kernel's multiply


@contextlib.contextmanager
def cuda_scalar_division():
    """Within the block, ``float32_tensor / python_number`` multiplies by the float32 reciprocal (CUDA's way)."""
    original = torch.Tensor.__truediv__

    def truediv(self, other):
        if (isinstance(other, (int, float)) and not isinstance(other, bool) and self.dtype == torch.float32
                and other != 0):
            return _reciprocal_times(self, other)
        return original(self, other)

    torch.Tensor.__truediv__ = truediv
    try:
        yield
    finally:
        torch.Tensor.__truediv__ = original
