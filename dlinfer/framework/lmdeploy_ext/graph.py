"""CUDA graphs for LMDeploy's dlinfer backend: static buffers for every field dlinfer's attention reads.

LMDeploy's ``CudaGraphMixin`` keeps static copies of ``input_ids``, ``position_ids``, ``block_offsets``,
``q_seqlens``, ``kv_seqlens``, ``q_start_loc`` and ``cu_seqlens_q`` and points the attention metadata at them
before capture and before every replay. LMDeploy's dlinfer attention also reads ``kv_start_indices`` (the cache
slot of each new token), ``cu_seqlens_q_cpu`` / ``kv_seqlens_cpu`` and the host bound ``max_kv_seq_len``; left
alone, a replay would write the KV cache at the capture step's slots and attend over the capture step's lengths.

:func:`make_dlinfer_buffers` / :func:`fill_dlinfer_buffers` add and refresh those fields (pure tensor code, tested
on CPU); :class:`DlinferCudaGraphRunner` wires them into LMDeploy's runner. Padding of a graph batch:

* padding tokens get slot ``-1`` (``fill_kv_cache`` skips them, so they never touch a live cache block);
* padding rows get ``kv_seqlens == 0`` (the attention ops return zeros for them and read no cache);
* ``max_kv_seq_len`` is the block table's capacity, an upper bound valid for every replay.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

logger = logging.getLogger("dlinfer")

KV_START_INDICES = "dlinfer_kv_start_indices"


def make_dlinfer_buffers(input_buffers: dict, max_tokens: int, device: torch.device | str) -> dict:
    """Add dlinfer's static buffers to LMDeploy's graph ``input_buffers`` (in place; also returned)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    input_buffers[KV_START_INDICES] = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
    return input_buffers


def fill_dlinfer_buffers(input_buffers: dict, attn_metadata, *, num_tokens: int, batch_size: int,
                         block_size: int) -> None:
    """Copy this step's dlinfer-only metadata into the static buffers and point ``attn_metadata`` at them.

    Runs after LMDeploy's ``fill_buffers_cudagraph`` (which has already pointed ``attn_metadata.kv_seqlens``,
    ``cu_seqlens_q`` and ``block_offsets`` at their static buffers). ``num_tokens`` and ``batch_size`` are the
    real (unpadded) sizes, known on the host.
    """
    if KV_START_INDICES not in input_buffers:
        raise KeyError(f"input_buffers has no {KV_START_INDICES!r}; call make_dlinfer_buffers first")
    slots = input_buffers[KV_START_INDICES]
    if num_tokens > slots.numel():
        raise ValueError(f"{num_tokens} tokens exceed the graph's {slots.numel()} token slots")
    slots[num_tokens:].fill_(-1)
    slots[:num_tokens].copy_(attn_metadata.kv_start_indices)
    kv_seqlens = input_buffers["kv_seqlens"]
    kv_seqlens[batch_size:].zero_()

    attn_metadata.kv_start_indices = slots
    attn_metadata.kv_seqlens = kv_seqlens
    attn_metadata.kv_seqlens_cpu = kv_seqlens
    attn_metadata.cu_seqlens_q_cpu = input_buffers["cu_seqlens_q"]
    attn_metadata.q_start_loc = input_buffers["q_start_loc"]
    attn_metadata.max_kv_seq_len = input_buffers["block_offsets"].shape[1] * block_size


def _load_lmdeploy_runner_classes():
    """LMDeploy 0.18's runner classes; their methods this module overrides or calls must exist."""
    from lmdeploy.pytorch.backends.cuda.graph_runner import CUDAGraphRunner
    from lmdeploy.pytorch.backends.cuda.graph_runner.full_graph import CUDASingleGraphRunner

    needed = {CUDAGraphRunner: ("_capture_full_graph", "_get_decode_model_forward", "_get_max_tokens"),
              CUDASingleGraphRunner: ("_bind_inputs", "capture", "forward")}
    missing = [f"{cls.__name__}.{name}" for cls, names in needed.items() for name in names
               if not callable(getattr(cls, name, None))]
    if missing:
        import lmdeploy

        raise ImportError(f"dlinfer's CUDA graph runner for LMDeploy was written against LMDeploy 0.18; the installed "
                          f"LMDeploy {lmdeploy.__version__} lacks {', '.join(missing)}")
    return CUDAGraphRunner, CUDASingleGraphRunner


_CUDAGraphRunner, _CUDASingleGraphRunner = _load_lmdeploy_runner_classes()


class DlinferSingleGraphRunner(_CUDASingleGraphRunner):
    """One captured decode graph whose static inputs include dlinfer's metadata fields."""

    def _bind_inputs(self, **kwargs):
        # Real sizes first: LMDeploy's fill points attn_metadata's tensors at the padded static buffers.
        num_tokens = kwargs["input_ids"].shape[-1]
        batch_size = kwargs["attn_metadata"].q_seqlens.shape[0]
        block_size = kwargs["past_key_values"][0][0].shape[1]
        padded_kwargs = super()._bind_inputs(**kwargs)
        buffers = self.meta.input_buffers
        if KV_START_INDICES not in buffers:
            make_dlinfer_buffers(buffers, buffers["input_ids"].shape[-1], buffers["input_ids"].device)
        fill_dlinfer_buffers(buffers, padded_kwargs["attn_metadata"], num_tokens=num_tokens, batch_size=batch_size,
                             block_size=block_size)
        return padded_kwargs


class DlinferCudaGraphRunner(_CUDAGraphRunner):
    """LMDeploy's CUDA graph runner for the dlinfer backend: full-graph decode, eager prefill."""

    def __init__(self, model, model_config, cache_config, backend_config, device):
        if getattr(backend_config, "piecewise_cudagraph_max_tokens", None) is not None:
            logger.warning("dlinfer: piecewise CUDA graphs for prefill are not supported; prefill runs eagerly "
                           "(decode still uses CUDA graphs)")
            backend_config = dataclasses.replace(backend_config, piecewise_cudagraph_max_tokens=None)
        super().__init__(model, model_config, cache_config, backend_config, device)

    def _capture_full_graph(self, graph_key: tuple, kwargs: dict):
        runner = DlinferSingleGraphRunner(
            self.model,
            model_forward=self._get_decode_model_forward(),
            max_batches=graph_key[0],
            max_tokens=self._get_max_tokens(graph_key, kwargs["input_ids"], kwargs["attn_metadata"].q_seqlens),
            num_blocks=self.num_blocks,
            is_decoding=graph_key[1],
            decode_query_len=graph_key[3],
            pool=self._full_graph_pool_handle,
            model_config=self.model_config,
            device=self.device,
        )
        output = runner.capture(**kwargs)
        self._full_graph_runners[graph_key] = runner
        return output
