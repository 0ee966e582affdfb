"""Host-side helpers of the launch code: the arithmetic of ``triton.cdiv`` / ``triton.next_power_of_2`` without
their per-call cost, a per-shape memo for launch parameters, and the facts of the GPU that launch configs depend
on (read once per device): SM count, compute capability, shared memory per block and per SM, threads per SM.

Since Triton 3.5 ``triton.cdiv`` and ``triton.next_power_of_2`` are ``ConstexprFunction`` objects (callable from
kernels too): a host call unwraps its arguments and reads Triton's knobs, ~2-3 µs on a fast CPU, paid several
times per launch. The plain functions underneath (``.fn``) compute the same values.

Shared memory decides whether a config can launch at all: a kernel whose tiles need more than the card's
per-block limit fails with "out of resources: shared memory". The limits differ within one major capability
(sm_80: 163 KB per block, sm_86 / sm_89: 99 KB; sm_90 / sm_100: 227 KB), so config choices read
``card(i).smem_per_block``, never the capability alone. :data:`CARDS` and :func:`simulate` model cards on a
machine without them (tests, sizing tools).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import triton

#: ``triton.cdiv`` and ``triton.next_power_of_2`` as plain Python functions (the same results).
cdiv = getattr(triton.cdiv, "fn", triton.cdiv)
next_power_of_2 = getattr(triton.next_power_of_2, "fn", triton.next_power_of_2)

#: A memo for pure launch-parameter functions of a few ints (their result per shape is computed once).
memo = functools.lru_cache(maxsize=1024)


@dataclasses.dataclass(frozen=True)
class Card:
    """What launch configs depend on, of one GPU."""

    name: str  # torch.cuda.get_device_name (tables and tuning caches are keyed by it)
    capability: int  # major compute capability (0 on ROCm)
    sm_count: int
    smem_per_block: int  # bytes of shared memory one block may use (the opt-in maximum)
    smem_per_sm: int  # bytes of shared memory per SM (bounds the blocks resident at once)
    threads_per_sm: int
    minor: int = 0


#: Opt-in shared memory per block by (major, minor) capability, bytes (NVIDIA's CUDA programming guide, compute
#: capabilities table), for a torch without ``shared_memory_per_block_optin``.
SMEM_PER_BLOCK = {(7, 0): 98304, (7, 2): 98304, (7, 5): 65536, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912,
                  (8, 9): 101376, (9, 0): 232448, (10, 0): 232448, (10, 3): 232448, (12, 0): 101376}

#: Models of the cards dlinfer's configs must launch on (the facts their drivers report), for :func:`simulate`.
CARDS = {
    "A100": Card("NVIDIA A100-SXM4-80GB", 8, 108, 166912, 167936, 2048, minor=0),
    "L40S": Card("NVIDIA L40S", 8, 142, 101376, 102400, 1536, minor=9),
    "RTX 4090": Card("NVIDIA GeForce RTX 4090", 8, 128, 101376, 102400, 1536, minor=9),
    "H100": Card("NVIDIA H100 80GB HBM3", 9, 132, 232448, 233472, 2048),
    "H200": Card("NVIDIA H200", 9, 132, 232448, 233472, 2048),
    "B200": Card("NVIDIA B200", 10, 148, 232448, 233472, 2048),
}

_simulated: Card | None = None


@contextlib.contextmanager
def simulate(card: Card):
    """Within the block every device query here answers ``card``'s facts, for any device index (a CPU stand-in:
    callers that memoize configs per device index must clear their memos around it)."""
    global _simulated
    previous, _simulated = _simulated, card
    try:
        yield card
    finally:
        _simulated = previous


def _index(device_index: int | None) -> int:
    return torch.cuda.current_device() if device_index is None else device_index


def card(device_index: int | None) -> Card:
    """The facts of CUDA device ``device_index`` (``None``: the current device)."""
    if _simulated is not None:
        return _simulated
    return _card(_index(device_index))


def sm_count(device_index: int | None) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (``None``: the current device)."""
    return card(device_index).sm_count


def capability(device_index: int | None) -> int:
    """Major compute capability of CUDA device ``device_index`` (``None``: the current device); 0 on ROCm.
    9 = Hopper: programmatic dependent launch, TMA. Not a proxy for shared memory: see
    ``card(i).smem_per_block``."""
    return card(device_index).capability


def resident_programs(block_bytes: int, num_warps: int, sm_count: int, smem_per_sm: int, threads_per_sm: int) -> int:
    """Programs a card runs at once: SMs x programs per SM, bounded by shared memory (``block_bytes`` per program,
    with whatever reserve the caller counts) and by threads; at least one per SM."""
    return max(1, min(smem_per_sm // block_bytes, threads_per_sm // (32 * num_warps))) * sm_count


def has_pdl(device_type: str, device_index: int | None) -> bool:
    """Programmatic dependent launch (a kernel launched while the previous one finishes): NVIDIA sm_90 and newer."""
    return device_type == "cuda" and capability(device_index) >= 9


@functools.lru_cache(maxsize=None)
def _card(index: int) -> Card:
    props = torch.cuda.get_device_properties(index)
    hip = torch.version.hip is not None
    major, minor = (0, 0) if hip else (props.major, props.minor)
    per_sm = getattr(props, "shared_memory_per_multiprocessor", 0)
    per_block = getattr(props, "shared_memory_per_block_optin", 0) or SMEM_PER_BLOCK.get(
        (major, minor), getattr(props, "shared_memory_per_block", 0) or 49152)
    return Card(name=torch.cuda.get_device_name(index), capability=major, minor=minor,
                sm_count=props.multi_processor_count, smem_per_block=per_block,
                smem_per_sm=per_sm or per_block + 1024,
                threads_per_sm=getattr(props, "max_threads_per_multi_processor", 0) or 2048)


__all__ = ["CARDS", "Card", "SMEM_PER_BLOCK", "capability", "card", "cdiv", "has_pdl", "memo", "next_power_of_2",
           "simulate", "sm_count"]
