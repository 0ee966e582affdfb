"""Host-side helpers of the launch code: the arithmetic of ``triton.cdiv`` / ``triton.next_power_of_2`` without
their per-call cost, a per-shape memo for launch parameters, and the GPU's SM count and compute capability (read
once per device).

Since Triton 3.5 ``triton.cdiv`` and ``triton.next_power_of_2`` are ``ConstexprFunction`` objects (callable from
kernels too): a host call unwraps its arguments and reads Triton's knobs, ~2-3 µs on a fast CPU, paid several
times per launch. The plain functions underneath (``.fn``) compute the same values.
"""

from __future__ import annotations

import functools

import torch
import triton

#: ``triton.cdiv`` and ``triton.next_power_of_2`` as plain Python functions (the same results).
cdiv = getattr(triton.cdiv, "fn", triton.cdiv)
next_power_of_2 = getattr(triton.next_power_of_2, "fn", triton.next_power_of_2)

#: A memo for pure launch-parameter functions of a few ints (their result per shape is computed once).
memo = functools.lru_cache(maxsize=1024)


def _index(device_index: int | None) -> int:
    return torch.cuda.current_device() if device_index is None else device_index


def sm_count(device_index: int | None) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (``None``: the current device)."""
    return _sm_count(_index(device_index))


def capability(device_index: int | None) -> int:
    """Major compute capability of CUDA device ``device_index`` (``None``: the current device); 0 on ROCm.
    9 = Hopper: programmatic dependent launch, TMA."""
    return _capability(_index(device_index))


def has_pdl(device_type: str, device_index: int | None) -> bool:
    """Programmatic dependent launch (a kernel launched while the previous one finishes): NVIDIA sm_90 and newer."""
    return device_type == "cuda" and capability(device_index) >= 9


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    return 0 if torch.version.hip is not None else torch.cuda.get_device_capability(index)[0]


__all__ = ["capability", "cdiv", "has_pdl", "memo", "next_power_of_2", "sm_count"]
