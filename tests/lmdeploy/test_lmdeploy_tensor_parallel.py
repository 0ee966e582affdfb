"""Tensor parallelism through dlinfer's LMDeploy backend, on the CPU: tp = 2 and 4 over gloo match transformers.

Two spawned processes build LMDeploy's patched model sharded the way LMDeploy's ``mp`` workers do (its
``DistContext`` with gloo groups instead of NCCL), route it through dlinfer's backend and run prefill, chunked
prefill and decode; LMDeploy's all-reduces in the attention/MLP/MoE output projections join the shards. At tp = 4
the tiny models' two KV heads are fewer than the ranks: each rank holds a replicated KV head (one query head over
one KV head), so the backend's attention metadata and caches are per rank, not per model.
"""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("lmdeploy", reason="LMDeploy is not installed (scripts/setup_lmdeploy.sh installs it)")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from lmdeploy_harness import hf_logits  # noqa: E402

pytestmark = pytest.mark.lmdeploy

TOL = 1e-4
STEPS = {"tokens": [list(range(10, 34)), list(range(50, 62))], "q_lens": [[10, 5], [8, 3], [1, 1], [1, 1]]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_tensor_parallel_matches_transformers(arch, world, tiny_model, tmp_path):
    from lmdeploy_worker_probe import tensor_parallel_rank

    path = tiny_model(arch)
    out = tmp_path / "rank0.pt"
    mp.spawn(tensor_parallel_rank, args=(world, _free_port(), path, STEPS, str(out)), nprocs=world, join=True)
    result = torch.load(out)
    assert result["tp_sizes"] == [world] * len(STEPS["q_lens"]), "MoeMetadata must carry the tensor-parallel size"
    refs = hf_logits(path, STEPS["tokens"])
    done = [0, 0]
    for logits, q_lens in zip(result["logits"], STEPS["q_lens"]):
        row = 0
        for seq, q in enumerate(q_lens):
            want = refs[seq][done[seq]:done[seq] + q]
            err = (logits[row:row + q] - want).abs().max().item()
            assert err <= TOL, f"{arch} tp={world}, sequence {seq} at {done[seq]}: max error {err:.3g}"
            row += q
            done[seq] += q
