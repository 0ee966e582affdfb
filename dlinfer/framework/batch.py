"""The per-step batch layout both engine adapters build: the ``plan`` half of a plan/run split.

Once per step an adapter turns its engine's view of the batch (LMDeploy's lengths, vLLM's ``query_start_loc``) into
the vendor contract's layout — int32 ``[B + 1]`` query start offsets with ``[0] == 0`` and int32 ``[B]`` KV
lengths, on the device — with device ops only (no host sync, so it is CUDA-graph safe when the inputs are static
buffers). It records the conversions (``dlinfer.ops._batch.plan``), so the layers of the step only read them: an op
wrapper given these lengths, or a ``[1:]`` view of these offsets, launches nothing.
"""

from __future__ import annotations

import dataclasses

import torch

from dlinfer.ops import _batch


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """One step's query partition and KV lengths in the vendor contract's layout."""

    cu_seqlens_q: torch.Tensor  # int32 [B + 1], starts at 0
    q_seqlens: torch.Tensor  # int32 [B]
    kv_seqlens: torch.Tensor  # int32 [B]

    @property
    def q_ends(self) -> torch.Tensor:
        """``cu_seqlens_q[1:]``: LMDeploy's cumulative ends, a view the wrappers map back without a launch."""
        return self.cu_seqlens_q[1:]


def _int32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device == device:
        return t if t.dtype == torch.int32 else t.to(torch.int32)
    return t.to(device, torch.int32, non_blocking=True)


def from_lengths(q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor, device: torch.device | None = None, *,
                 no_history: bool = False) -> BatchLayout:
    """From per-sequence query and KV lengths (LMDeploy's ``q_seqlens`` / ``kv_seqlens``). ``no_history``: the
    KV lengths equal the query lengths (a prefill without cached tokens), so they share the offsets."""
    device = q_seqlens.device if device is None else device
    q = _int32(q_seqlens, device)
    kv = _int32(kv_seqlens, device)
    cu = torch.cumsum(torch.nn.functional.pad(q, (1, 0)), 0, dtype=torch.int32)  # not a view: see _batch
    return _planned(cu, q, kv, (q_seqlens, kv, kv_seqlens) if no_history else (q_seqlens,))


def from_start_offsets(query_start_loc: torch.Tensor, kv_seqlens: torch.Tensor, *, no_history: bool = False,
                       ) -> BatchLayout:
    """From ``[B + 1]`` start offsets that may not start at 0 (vLLM's ``query_start_loc`` of a sub-batch)."""
    starts = _int32(query_start_loc, query_start_loc.device)
    cu = starts - starts[:1]
    q = cu[1:] - cu[:-1]
    kv = _int32(kv_seqlens, query_start_loc.device)
    return _planned(cu, q, kv, (kv, kv_seqlens) if no_history else ())


def _planned(cu: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, sources: tuple[torch.Tensor, ...],
             ) -> BatchLayout:
    _batch.plan("starts", cu, cu)
    for src in (q, *sources):
        _batch.plan("lengths", src, cu)
    return BatchLayout(cu, q, kv)


__all__ = ["BatchLayout", "from_lengths", "from_start_offsets"]
