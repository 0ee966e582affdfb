"""Host-side helpers of the launch code: the arithmetic of ``triton.cdiv`` / ``triton.next_power_of_2`` without
their per-call cost, and a per-shape memo for launch parameters.

Since Triton 3.5 ``triton.cdiv`` and ``triton.next_power_of_2`` are ``ConstexprFunction`` objects (callable from
kernels too): a host call unwraps its arguments and reads Triton's knobs, ~2-3 µs on a fast CPU, paid several
times per launch. The plain functions underneath (``.fn``) compute the same values.
"""

from __future__ import annotations

import functools

import triton

#: ``triton.cdiv`` and ``triton.next_power_of_2`` as plain Python functions (the same results).
cdiv = getattr(triton.cdiv, "fn", triton.cdiv)
next_power_of_2 = getattr(triton.next_power_of_2, "fn", triton.next_power_of_2)

#: A memo for pure launch-parameter functions of a few ints (their result per shape is computed once).
memo = functools.lru_cache(maxsize=1024)

__all__ = ["cdiv", "memo", "next_power_of_2"]
