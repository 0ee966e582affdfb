"""benchmarks/moe_bench.py on the CPU: the parallel compile of a case's candidates and the memory roofline's byte
count (the GPU timing needs a GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import moe_bench  # noqa: E402
from dlinfer.utils.layout import is_n_fastest  # noqa: E402
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
    spec, done = tmp_path / "spec.json", tmp_path / "done.txt"
    spec.write_text(json.dumps(dict(SHAPE, device="cpu", configs=[{"BLOCK_M": 16}, {"BLOCK_M": 32},
                                                                  {"BLOCK_M": 64}], indices=[1, 4, 7],
                                    done=str(done))))
    assert moe_bench.main(["--warm-worker", str(spec)]) == 0
    assert calls == [16, 32, 64]  # the failed one was tried too, and is logged as failed with its seconds
    log = moe_bench.read_warm_log(done.read_text())
    assert sorted(log) == [1, 4, 7] and [log[i][1] for i in (1, 4, 7)] == [True, False, True]
    assert all(secs >= 0 for secs, _ in log.values())


def test_warm_worker_compiles_on_n_fastest_weights_when_the_candidates_run_on_them(tmp_path, monkeypatch):
    layouts = []

    def fake(x, w_up, w_down, tw, ti, renormalize, config):
        assert w_up.shape == (4, 32, 32) and w_down.shape == (4, 32, 16)  # [E, N, K] either way
        layouts.append((is_n_fastest(w_up), is_n_fastest(w_down)))
        return x

    monkeypatch.setattr(tmoe, "fused_moe", fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    for n_fastest in (True, False):
        spec, done = tmp_path / f"spec{n_fastest}.json", tmp_path / f"done{n_fastest}.txt"
        spec.write_text(json.dumps(dict(SHAPE, device="cpu", configs=[{"BLOCK_M": 16}], indices=[0],
                                        done=str(done), n_fastest=n_fastest)))
        assert moe_bench.main(["--warm-worker", str(spec)]) == 0
    assert layouts == [(True, True), (False, False)]


class FakeProc:
    """A worker process: records its spec, marks its configs tried unless told to hang (then wait() times out)."""

    started: list = []
    hang: set = set()
    fail: set = set()  # config indices that fail in their worker

    def __init__(self, argv, stdout=None, stderr=None, start_new_session=False):
        assert argv[1].endswith("moe_bench.py") and argv[2] == "--warm-worker" and start_new_session
        self.spec = json.loads(Path(argv[3]).read_text())
        self.pid = 10_000 + len(FakeProc.started)
        self.alive = self.pid in FakeProc.hang
        FakeProc.started.append(self)
        if not self.alive:
            with open(self.spec["done"], "a") as f:
                f.writelines(f"{i} {1.5 * i:.2f} {'failed' if i in FakeProc.fail else 'ok'}\n"
                             for i in self.spec["indices"])

    def wait(self, timeout=None):
        import subprocess

        if self.alive and timeout is not None:
            raise subprocess.TimeoutExpired("worker", timeout)
        return 0

    def poll(self):
        return None if self.alive else 0


@pytest.fixture
def fake_workers(monkeypatch):
    import os
    import subprocess

    FakeProc.started, FakeProc.hang, FakeProc.fail, killed = [], set(), set(), []

    def killpg(pid, sig):
        killed.append(pid)
        next(p for p in FakeProc.started if p.pid == pid).alive = False

    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    monkeypatch.setattr(os, "killpg", killpg)
    return killed


WEIGHTS = 3 * 4 * 16 * 32 * 2 + (600 << 20)


def test_warm_candidates_splits_the_configs_over_processes(fake_workers):
    configs = [{"BLOCK_M": m} for m in (16, 32, 64, 128, 256)]
    n, _, tried = moe_bench.warm_candidates(configs, SHAPE, workers=3, timeout_s=60, free_bytes=100 * WEIGHTS)
    assert n == 3 and tried == {i: (1.5 * i, True) for i in range(5)} and fake_workers == []
    assert [[c["BLOCK_M"] for c in p.spec["configs"]] for p in FakeProc.started] == [[16, 128], [32, 256], [64]]
    assert [p.spec["indices"] for p in FakeProc.started] == [[0, 3], [1, 4], [2]]
    assert all(p.spec["experts"] == 4 and p.spec["skewed"] for p in FakeProc.started)
    # memory for fewer than two weight copies within 40 % of the free memory, or one config: not worth processes
    FakeProc.started.clear()
    assert moe_bench.warm_candidates(configs, SHAPE, workers=3, timeout_s=60, free_bytes=4 * WEIGHTS) == (0, 0.0, {})
    assert moe_bench.warm_candidates(configs[:1], SHAPE, 3, 60, free_bytes=100 * WEIGHTS) == (0, 0.0, {})
    assert FakeProc.started == []


def test_a_worker_past_the_timeout_is_killed_with_its_group(fake_workers):
    FakeProc.hang = {10_001}  # the second worker never finishes
    configs = [{"BLOCK_M": m} for m in (16, 32, 64, 128)]
    n, secs, tried = moe_bench.warm_candidates(configs, SHAPE, workers=2, timeout_s=0.1, free_bytes=100 * WEIGHTS)
    assert n == 2 and set(tried) == {0, 2} and fake_workers == [10_001] and secs < 30


def test_a_config_that_failed_in_its_worker_is_reported_as_failed(fake_workers):
    FakeProc.fail = {1}
    n, _, tried = moe_bench.warm_candidates([{"BLOCK_M": m} for m in (16, 32, 64)], SHAPE, workers=3, timeout_s=60,
                                            free_bytes=100 * WEIGHTS)
    assert tried == {0: (0.0, True), 1: (1.5, False), 2: (3.0, True)}


@pytest.mark.parametrize("skewed", [False, True])
def test_routing_on_the_generators_device(skewed):
    w, ids = moe_bench.routing(64, 8, 2, skewed, torch.Generator().manual_seed(0))
    assert w.shape == ids.shape == (64, 2) and ids.device.type == "cpu"
    if skewed:  # expert 0 in nearly every token's top-k
        assert (ids == 0).any(dim=1).float().mean() > 0.9


def test_a_case_draws_the_same_inputs_whatever_ran_before():
    gen = torch.Generator()
    first = moe_bench.case_inputs(gen, 16, 2, 32, 40, True, torch.float32)
    moe_bench.case_inputs(gen, 16, 2, 32, 64, False, torch.float32)  # another case in between
    torch.randn(100, generator=gen)
    again = moe_bench.case_inputs(gen, 16, 2, 32, 40, True, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = moe_bench.case_inputs(gen, 16, 2, 32, 40, False, torch.float32)  # the uniform twin: other draws
    assert not torch.equal(first[0], other[0])


def test_candidate_sets_carry_the_hot_tiles(monkeypatch):
    src, hot = {"BLOCK_M": 16}, {"BLOCK_M": 128}
    merge = moe_bench.flag_candidates(src, hot, moe_bench.MERGE_FLAGS)
    assert [name for name, _ in merge] == ["MERGE_GRID", "TMA_B+MERGE_GRID"]
    assert merge[1][1] == {"BLOCK_M": 16, "hot": hot, "TMA_B": 1, "MERGE_GRID": 1}
    monkeypatch.delenv("DLINFER_MOE_WS", raising=False)  # warp specialization is opt-in: no WS candidates
    assert moe_bench.hopper_candidates(src, hot) == moe_bench.flag_candidates(src, hot, moe_bench.HOPPER_FLAGS)
    monkeypatch.setenv("DLINFER_MOE_WS", "1")
    hopper = moe_bench.hopper_candidates(src, hot)
    assert len(hopper) == len(moe_bench.HOPPER_FLAGS) + len(moe_bench.HOPPER_WS)
    assert hopper[:len(moe_bench.HOPPER_FLAGS)] == moe_bench.flag_candidates(src, hot, moe_bench.HOPPER_FLAGS)
    assert all(cfg["hot"] is hot for _, cfg in hopper)
    names = [name for name, _ in hopper]
    assert all("+".join(f) in names for f in moe_bench.TMA_FLAGS)  # the tma set is a subset of the hopper set
    stream = moe_bench.flag_candidates(src, hot, moe_bench.STREAM_FLAGS)
    assert [cfg.get("HOT_STREAM") for _, cfg in stream] == [1, 0] and all(cfg["hot"] is hot for _, cfg in stream)
    rules = moe_bench.rule_candidates(hot)  # each distinct rule config of every table, once, with the hot tiles
    ruled = [cfg for t in moe_bench.tuning.TABLES.values() for _, _, _, cfg in t.get("rules", ())]
    assert len(rules) == len({json.dumps(c, sort_keys=True) for c in ruled}) >= 2
    assert all(cfg["hot"] is hot for _, cfg in rules) and len({name for name, _ in rules}) == len(rules)
    assert [dict(cfg, hot=None) for _, cfg in rules] == [dict(c, hot=None) for c in
                                                         {json.dumps(c, sort_keys=True): c for c in ruled}.values()]


def test_decode_and_peer_tiles_are_valid_and_fit_a_hopper_card():
    """The memory-bound candidate sets: valid configs (the tuning cache's own check), distinct, each fitting an sm_90
    card's shared memory per block as written (a tile the fitter would shrink is not the tile it claims to time)."""
    from dlinfer.vendor.triton import host

    card = host.CARDS["H100"]
    for tiles in (moe_bench.DECODE, moe_bench.PEER_TILES):
        assert all(moe_bench.tuning._valid(c) for c in tiles)
        assert len({json.dumps(c, sort_keys=True) for c in tiles}) == len(tiles)
        assert all(moe_bench.tuning.fit(c, torch.bfloat16, card) is c for c in tiles)
    peer = moe_bench.PEER_TILES[0]  # the peer's compact tile's footprint: gate and up rows together are 256 wide
    assert (peer["BLOCK_M"], 2 * peer["up"]["BLOCK_N"], peer["up"]["BLOCK_K"], peer["up"]["num_warps"],
            peer["up"]["num_stages"]) == (64, 256, 32, 4, 4)
    for g, silu in (("up", True), ("down", False)):  # two programs resident per SM, as the peer's
        assert 2 * moe_bench.tuning.shared_memory(64, peer[g], silu, torch.bfloat16, 9) <= card.smem_per_sm


def test_split_candidates_keep_the_config_in_force_for_the_heaviest_experts():
    """The split set: the card's tiers of half the row block in force, with its Hopper fields, for the experts under
    the hot threshold; the config in force (without its own hot class) for those above it."""
    tiers = moe_bench.tuning.H100_TIERS
    in_force = dict(moe_bench.tuning.H100_RULES[0][3], hot={"BLOCK_M": 128}, hot_rows=99)
    split = moe_bench.split_candidates(in_force, tiers, torch.bfloat16, torch.device("cpu"))
    narrow, keys = [], set()  # the 64-row tiers, one per tile shape (two tiers of the same tiles: the first)
    for _, c in tiers:
        key = (c["BLOCK_M"], c["up"]["BLOCK_N"], c["down"]["BLOCK_N"])
        if c["BLOCK_M"] == 64 and key not in keys:
            keys.add(key)
            narrow.append(c)
    assert len(split) == len(narrow) * len(moe_bench.SPLIT_HOT_ROWS) and len(narrow) >= 1
    for (name, cfg), (base, rows) in zip(split, [(c, r) for c in narrow for r in moe_bench.SPLIT_HOT_ROWS]):
        assert cfg["BLOCK_M"] == 64 and cfg["up"] == base["up"] and cfg["down"] == base["down"]
        assert cfg["TMA_A"] == cfg["TMA_B"] == 1 and cfg["hot_rows"] == rows and f">= {rows} rows" in name
        assert cfg["hot"] == moe_bench.tuning.H100_RULES[0][3]  # the config in force, its hot class dropped
        assert moe_bench.tuning.hot_class(cfg, cfg["hot"], 4096) == (cfg["hot"], rows)
    assert moe_bench.split_candidates(narrow[0], tiers, torch.bfloat16, torch.device("cpu")) != []  # 32-row tiers
    assert moe_bench.split_candidates(tiers[0][1], tiers, torch.bfloat16, torch.device("cpu")) == []  # none of 8


def test_moe_bytes_counts_the_touched_experts_once():
    ids = torch.tensor([[0, 3], [3, 5], [5, 0], [0, 3]])  # 4 tokens, top-2: experts 0, 3, 5 of 8 touched
    got = moe_bench.moe_bytes(ids, hidden=32, inter=16, elem_size=2)
    weights = 3 * (2 * 16 * 32 + 32 * 16) * 2  # gate_up [32, 32] + down [32, 16] per touched expert, bf16
    acts = (4 * 32 + 4 * 32 + 2 * 4 * 2 * 16) * 2  # input, output, intermediate written and read
    assert got == dict(experts_touched=3, weight_bytes=weights, min_bytes=weights + acts)
    assert (weights, acts) == (9216, 1024)
    one = moe_bench.moe_bytes(torch.tensor([[7]]), hidden=32, inter=16, elem_size=4)  # one token, fp32
    assert one == dict(experts_touched=1, weight_bytes=1536 * 4, min_bytes=(1536 + 64 + 32) * 4)


def test_roofline_shares_of_the_bound():
    # 3 MB at 3000 GB/s: 1 us; 1e8 flop at 1000 TFLOP/s: 0.1 us -> memory-bound
    r = moe_bench.roofline(min_bytes=3_000_000, flops=1e8, dlinfer_us=2.0, peer_us=4.0, copy_gbps=3000.0,
                           matmul_tflops=1000.0)
    bound = r.pop("bound")
    assert bound == "memory"
    assert r == pytest.approx(dict(dlinfer_gbps=1500.0, peer_gbps=750.0, copy_gbps=3000.0, matmul_tflops=1000.0,
                                   bound_us=1.0, dlinfer_of_bound=0.5, peer_of_bound=0.25))
    # 4e9 flop at 1000 TFLOP/s: 4 us -> compute-bound
    r = moe_bench.roofline(min_bytes=3_000_000, flops=4e9, dlinfer_us=8.0, peer_us=4.0, copy_gbps=3000.0,
                           matmul_tflops=1000.0)
    assert r["bound"] == "compute" and r["bound_us"] == pytest.approx(4.0)
    assert (r["dlinfer_of_bound"], r["peer_of_bound"]) == pytest.approx((0.5, 1.0))


def test_peer_weights_take_the_layout_stock_lmdeploy_serves_them_in():
    """The benchmark's engine-layout peer gets what LMDeploy 0.18's CUDA MoE layer makes of the same weights."""
    from lmdeploy.pytorch.backends.cuda.moe.default import TritonFusedMoEImpl

    from benchmarks import peers

    gate_up, down = torch.randn(4, 6, 8), torch.randn(4, 8, 3)
    ours = peers.lmdeploy_moe_weights(gate_up, down)
    theirs = TritonFusedMoEImpl(top_k=2, num_experts=4).update_weights(gate_up, down)
    for mine, stock, original in zip(ours, theirs, (gate_up, down)):
        assert mine.shape == stock.shape == original.shape and mine.stride() == stock.stride()
        assert mine.stride(1) == 1 and torch.equal(mine, original)


def test_key_rows_is_the_token_buckets_mean_rows_per_expert():
    assert moe_bench.key_rows("bfloat16:E8:k2:H4096:I14336:T512") == 128
    assert moe_bench.key_rows("float16:E128:k8:H2048:I768:T64") == 4


def test_tile_set_candidates_name_each_config_of_the_sets_asked_for_but_the_one_in_force():
    in_force = moe_bench.PEER_TILES[1]
    hot = {"BLOCK_M": 128}
    got = moe_bench.tile_set_candidates(["peer", "ndecode"], in_force, hot)
    names = [n for n, _ in got]
    assert names == ([f"peer{i}" for i in range(len(moe_bench.PEER_TILES)) if i != 1]
                     + [f"ndec{i}" for i in range(len(moe_bench.N_DECODE)) if moe_bench.N_DECODE[i] != in_force])
    assert all(c["hot"] is hot for _, c in got)
    assert all({k: v for k, v in c.items() if k != "hot"} != in_force for _, c in got)
    assert moe_bench.tile_set_candidates(["hot", "split"], in_force, hot) == []
