"""A stand-in for LMDeploy's tensor-parallel worker: reports, from the spawned process, which backend it gets."""

from __future__ import annotations

import json

from lmdeploy.pytorch.engine.executor.mp_executor import ExecutorProc


class ProbeProc(ExecutorProc):
    def _main_loop(self, out_path: str):
        import dlinfer.framework.lmdeploy_ext as ext
        from lmdeploy.pytorch.backends import get_backend

        with open(out_path, "w") as f:
            json.dump({"applied": ext.is_applied(), "backend": get_backend().__name__}, f)


def tensor_parallel_rank(rank: int, world: int, port: int, model_path: str, steps, out_path: str) -> None:
    """One rank of a CPU tensor-parallel run (gloo): LMDeploy's patched model sharded over ``world`` ranks through
    dlinfer's backend; rank 0 saves the logits of every step and the MoE metadata's tp_size it saw. ``steps`` may
    also name the KV-cache ``quant_policy``."""
    import os

    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import dlinfer.framework.lmdeploy_ext as ext

        ext.apply()
        from lmdeploy.pytorch.config import DistConfig
        from lmdeploy.pytorch.distributed import DistContext, get_dist_manager
        from lmdeploy_harness import PagedModel

        context = DistContext.build(rank, DistConfig(tp=world), ccl_backend="gloo")
        with get_dist_manager().context(context):
            pm = PagedModel(model_path, block_size=16, dist_config=DistConfig(tp=world),
                            quant_policy=steps.get("quant_policy", 0))
            seqs = [pm.new_sequence(tokens) for tokens in steps["tokens"]]
            logits, tp_sizes = [], []
            for q_lens in steps["q_lens"]:
                logits.append(pm.step(seqs, q_lens))
                tp_sizes.append(pm.last_context.moe_metadata.tp_size)
        if rank == 0:
            torch.save({"logits": logits, "tp_sizes": tp_sizes}, out_path)
    finally:
        dist.destroy_process_group()
