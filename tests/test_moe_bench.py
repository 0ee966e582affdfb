"""benchmarks/moe_bench.py on the CPU: the parallel compile of a case's candidates (the GPU timing needs a GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import moe_bench  # noqa: E402
from dlinfer.vendor.triton import moe as tmoe  # noqa: E402

SHAPE = dict(experts=4, topk=2, hidden=32, inter=16, tokens=5, skewed=True)


def test_warm_worker_runs_every_config_and_survives_a_bad_one(tmp_path, monkeypatch):
    calls = []

    def fake(x, w_up, w_down, tw, ti, renormalize, config):
        calls.append(config["BLOCK_M"])
        assert x.shape == (5, 32) and w_up.shape == (4, 32, 32) and w_down.shape == (4, 32, 16)
        assert ti.shape == (5, 2) and int(ti.max()) < 4
        if config["BLOCK_M"] == 32:
            raise RuntimeError("out of resources")
        return x

    monkeypatch.setattr(tmoe, "fused_moe", fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(dict(SHAPE, device="cpu", configs=[{"BLOCK_M": 16}, {"BLOCK_M": 32},
                                                                  {"BLOCK_M": 64}])))
    assert moe_bench.main(["--warm-worker", str(spec)]) == 0
    assert calls == [16, 32, 64]


def test_warm_candidates_splits_the_configs_over_processes(monkeypatch):
    started = []

    class Proc:
        def __init__(self, argv, **kw):
            assert argv[1].endswith("moe_bench.py") and argv[2] == "--warm-worker"
            started.append(json.loads(Path(argv[3]).read_text()))

        def wait(self, timeout=None):
            return 0

    import subprocess

    monkeypatch.setattr(subprocess, "Popen", Proc)
    configs = [{"BLOCK_M": m} for m in (16, 32, 64, 128, 256)]
    weights = 3 * 4 * 16 * 32 * 2 + (64 << 20)
    n, _ = moe_bench.warm_candidates(configs, SHAPE, workers=3, timeout_s=60, free_bytes=100 * weights)
    assert n == 3 and [[c["BLOCK_M"] for c in s["configs"]] for s in started] == [[16, 128], [32, 256], [64]]
    assert all(s["experts"] == 4 and s["skewed"] for s in started)
    # memory for fewer than two weight copies within 40 % of the free memory, or one config: not worth processes
    started.clear()
    assert moe_bench.warm_candidates(configs, SHAPE, workers=3, timeout_s=60, free_bytes=4 * weights) == (0, 0.0)
    assert moe_bench.warm_candidates(configs[:1], SHAPE, workers=3, timeout_s=60, free_bytes=100 * weights) == (0, 0.0)
    assert started == []


@pytest.mark.parametrize("skewed", [False, True])
def test_routing_on_the_generators_device(skewed):
    w, ids = moe_bench.routing(64, 8, 2, skewed, torch.Generator().manual_seed(0))
    assert w.shape == ids.shape == (64, 2) and ids.device.type == "cpu"
    if skewed:  # expert 0 in nearly every token's top-k
        assert (ids == 0).any(dim=1).float().mean() > 0.9
