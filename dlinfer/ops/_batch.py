"""The batch layout of the vendor contract, and the once-per-step conversion into it.

Vendors see one form of a query partition: ``cu_seqlens_q``, int32 ``[B + 1]`` start offsets on the query's
device (``cu_seqlens_q[0] == 0``; sequence ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``), the form of
FlashInfer's ``indptr`` and vLLM's ``query_start_loc``. Per-sequence KV lengths are int32 ``[B]`` on the same
device. An engine adapter builds these once per step (``dlinfer.framework.batch``) and every layer only reads them.

LMDeploy's public signatures pass lengths (``q_seqlens``) or cumulative ends (``cu_seqlens_q[1:]``), possibly on
the host. The wrappers convert with :func:`starts_from_lengths` / :func:`starts_from_ends` / :func:`lengths_on`.
Every layer of a step gets the same metadata tensors, so a conversion runs once per step, not once per layer:

* the per-step metadata builder of an adapter (``dlinfer.framework.batch``) records (:func:`plan`) the conversions it
  already computed (the ``[B + 1]`` offsets next to the lengths it hands the engine); a wrapper given a planned
  tensor, or a ``[1:]`` view of planned offsets, reads the planned result and launches nothing;
* otherwise a result is remembered per source tensor object and version counter (an in-place write, such as a
  CUDA-graph runner refilling its static buffers, bumps it). Inference-mode tensors have no version counter:
  for them only planned conversions are reused.

Nothing is reused while tracing or capturing a CUDA graph (there the conversion is recorded in the graph, so a
replay converts the buffers' new values).
"""

from __future__ import annotations

import threading

import torch

_is_compiling = torch.compiler.is_compiling

_cache: dict[tuple[int, str, torch.device], tuple[torch.Tensor, int, torch.Tensor]] = {}
_lock = threading.Lock()
_MAX_ENTRIES = 32


_planned: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
_MAX_PLANNED = 64
_planned_ends: dict[tuple[torch.device, int], torch.Tensor] = {}


def plan(kind: str, src: torch.Tensor, converted: torch.Tensor) -> None:
    """Record that ``converted`` is ``src`` in the contract's layout (``kind``: ``"lengths"`` -> ``[B + 1]``
    offsets, int32, starting at 0). For metadata builders: they compute the layout once per step, and the wrappers
    of every layer read it. The planned tensors are held until more are planned, so their memory is not reused."""
    with _lock:
        if len(_planned) >= _MAX_PLANNED:
            _planned.clear()
            _planned_ends.clear()
        _planned[(id(src), kind)] = (src, converted)
        if kind == "starts" and src.dtype == torch.int32 and src.dim() == 1 and src.stride(0) == 1:
            # ``src[1:]`` (LMDeploy passes cumulative ends that way) is found by its address: inference-mode views
            # do not record their base.
            _planned_ends[(src.device, src.data_ptr() + src.element_size())] = src


def _planned_for(kind: str, src: torch.Tensor) -> torch.Tensor | None:
    hit = _planned.get((id(src), kind))
    return hit[1] if hit is not None and hit[0] is src else None


def _cached(kind: str, src: torch.Tensor, device: torch.device, convert) -> torch.Tensor:
    if type(src) is not torch.Tensor or _is_compiling() or src.is_meta or _capturing(src, device):
        return convert(src, device)
    planned = _planned_for(kind, src)
    if planned is not None and planned.device == device:
        return planned
    if src.is_inference():  # no version counter: an in-place update could not be told apart
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


# ``torch.cuda.is_current_stream_capturing`` without its Python frame (it is one call of this binding); asked on
# every conversion of CUDA tensors, so eagerly once per layer of a prefill.
_stream_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing


def _capturing(src: torch.Tensor, device: torch.device) -> bool:
    """Under CUDA-graph capture the conversion must be recorded in the graph: never served from the cache."""
    return (src.is_cuda or device.type == "cuda") and _stream_capturing()


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
    if _planned_ends and type(ends) is torch.Tensor and ends.dtype == torch.int32 and not _is_compiling():
        starts = _planned_ends.get((ends.device, ends.data_ptr()))  # ``ends`` is ``starts[1:]``: no launch
        if (starts is not None and starts.device == device and ends.dim() == 1 and ends.stride(0) == 1
                and ends.numel() == starts.numel() - 1):
            return starts
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
        _planned.clear()
        _planned_ends.clear()
