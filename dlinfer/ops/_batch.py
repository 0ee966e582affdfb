"""The batch layout of the vendor contract, and the once-per-step conversion into it.

Vendors see one form of a query partition: ``cu_seqlens_q``, int32 ``[B + 1]`` start offsets on the query's
device (``cu_seqlens_q[0] == 0``; sequence ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``), the form of
FlashInfer's ``indptr`` and vLLM's ``query_start_loc``. Per-sequence KV lengths are int32 ``[B]`` on the same
device. An engine adapter builds these once per step (``dlinfer.framework.batch``) and every layer only reads them.

LMDeploy's public signatures pass lengths (``q_seqlens``) or cumulative ends (``cu_seqlens_q[1:]``), possibly on
the host. The wrappers convert with :func:`starts_from_lengths` / :func:`starts_from_ends` / :func:`lengths_on`,
which remember their last result per source tensor: LMDeploy hands every layer of a step the same metadata
tensors, so the conversion (a cumsum launch, a host-to-device copy) runs once per step, not once per layer. A
result is reused only for the very same tensor object at the same version counter (an in-place write, such as
a CUDA-graph runner refilling its static buffers, bumps it), and never while tracing or capturing a CUDA graph
(there the conversion is recorded in the graph, so a replay converts the buffers' new values).
"""

from __future__ import annotations

import threading

import torch

_is_compiling = torch.compiler.is_compiling

_cache: dict[tuple[int, str, torch.device], tuple[torch.Tensor, int, torch.Tensor]] = {}
_lock = threading.Lock()
_MAX_ENTRIES = 32


def _cached(kind: str, src: torch.Tensor, device: torch.device, convert) -> torch.Tensor:
    if type(src) is not torch.Tensor or _is_compiling() or src.is_meta or _capturing(src, device):
        return convert(src, device)
    key = (id(src), kind, device)
    hit = _cache.get(key)
    if hit is not None and hit[0] is src and hit[1] == src._version:
        return hit[2]
    out = convert(src, device)
    with _lock:
        if len(_cache) >= _MAX_ENTRIES:
            _cache.clear()
        _cache[key] = (src, src._version, out)  # holding ``src`` keeps its id from being reused
    return out


def _capturing(src: torch.Tensor, device: torch.device) -> bool:
    """Under CUDA-graph capture the conversion must be recorded in the graph: never served from the cache."""
    return (src.is_cuda or device.type == "cuda") and torch.cuda.is_current_stream_capturing()


def _from_lengths(lengths: torch.Tensor, device: torch.device) -> torch.Tensor:
    lengths = lengths.to(device, non_blocking=True)
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _from_ends(ends: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.nn.functional.pad(ends.to(device, torch.int32, non_blocking=True), (1, 0))


def _int32_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, torch.int32, non_blocking=True)


def starts_from_lengths(lengths: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[B]`` lengths (host or device) -> int32 ``[B + 1]`` start offsets on ``device``."""
    return _cached("lengths", lengths, device, _from_lengths)


def starts_from_ends(ends: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[B]`` cumulative ends (host or device) -> int32 ``[B + 1]`` start offsets on ``device``."""
    return _cached("ends", ends, device, _from_ends)


def lengths_on(lengths: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[B]`` lengths or indices (host or device) -> int32 on ``device`` (no copy when already so)."""
    if lengths.device == device and lengths.dtype == torch.int32:
        return lengths
    return _cached("int32", lengths, device, _int32_on)


def clear() -> None:
    """Forget every remembered conversion (tests)."""
    with _lock:
        _cache.clear()
