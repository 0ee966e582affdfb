"""``DlinferCudaOpsBackend``: LMDeploy's dlinfer backend, on NVIDIA GPUs.

LMDeploy 0.18 ships ``DlinferOpsBackend`` (every layer through ``dlinfer.ops``) but selects it only for Ascend,
MetaX and Cambricon devices. This subclass serves device type ``cuda``: it builds the per-step metadata on the
device (``metadata.build_attention_metadata``), gives tensor-parallel MoE its ``MoeMetadata`` and builds a CUDA
graph runner whose static buffers cover dlinfer's own metadata fields (``graph.DlinferCudaGraphRunner``).

Importing this module imports LMDeploy.
"""

from __future__ import annotations

import logging

import torch
from lmdeploy.pytorch.backends.dlinfer.op_backend import DlinferOpsBackend

from dlinfer.framework.lmdeploy_ext.metadata import build_attention_metadata
from dlinfer.utils.type_annotation import MoECommType, MoeMetadata

logger = logging.getLogger("dlinfer")


def _tensor_parallel_info() -> tuple[int, int, object]:
    """(tp_size, tp_rank, tp_group) of LMDeploy's attention TP group; (1, 0, None) outside a distributed run."""
    try:
        from lmdeploy.pytorch.distributed import get_dist_manager

        ctx = get_dist_manager().current_context()
        config = getattr(ctx, "dist_config", None)
        group = getattr(ctx, "attn_tp_group", None)
        if config is None:
            return 1, 0, None
        return int(config.tp), int(getattr(group, "rank", 0) or 0), getattr(group, "gpu_group", None)
    except Exception:  # noqa: BLE001 - no distributed context (single process, CPU tests)
        return 1, 0, None


class DlinferCudaOpsBackend(DlinferOpsBackend):
    """LMDeploy's dlinfer layer backend on CUDA devices (kernels chosen by dlinfer's vendor registry)."""

    @staticmethod
    def get_name() -> str:
        return "dlinfer_cuda"

    @classmethod
    def update_step_context(cls, step_context):
        """Attach ``DlinferAttentionMetadata`` and ``MoeMetadata`` to ``step_context`` (no host syncs)."""
        block_size = step_context.kv_caches[0][0].shape[1]
        step_context.attn_metadata = build_attention_metadata(cls.get_attention_metadata_cls(), step_context,
                                                              block_size=block_size)
        tp_size, tp_rank, tp_group = _tensor_parallel_info()
        # A fresh record per step: LMDeploy's MoE impls write router_n_groups / expert ids into it.
        step_context.moe_metadata = MoeMetadata(
            max_tokens_across_dp=step_context.input_ids.numel(),
            tp_size=tp_size,
            tp_rank=tp_rank,
            tp_group=tp_group,
            moe_comm_type=MoECommType.ALLGATHER,
        )
        return step_context

    @staticmethod
    def build_graph_runner(model: torch.nn.Module, model_config, cache_config, backend_config,
                           device: torch.device):
        """LMDeploy's CUDA graph runner, with static buffers for dlinfer's metadata (see ``graph``)."""
        from dlinfer.framework.lmdeploy_ext.graph import DlinferCudaGraphRunner

        return DlinferCudaGraphRunner(model, model_config, cache_config, backend_config, device)

    @staticmethod
    def init():
        """Runs once per process before the model is built (``init_backend``)."""
        import dlinfer  # noqa: F401  (registers the dlinfer ops and vendors)

    @staticmethod
    def ccl_backend() -> str:
        return "nccl"

    @staticmethod
    def device_count():
        return torch.cuda.device_count()

    @staticmethod
    def support_ray():
        """False keeps tensor parallelism on LMDeploy's ``mp`` executor, whose workers dlinfer patches."""
        return False
