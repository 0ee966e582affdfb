"""End to end: vLLM (CPU build) with and without dlinfer, on tiny random-weight models, in float32.

Nine engine runs cover every case (each in its own process, shared by the tests below):

=====================  ===========================================================================================
case                   what runs
=====================  ===========================================================================================
dense_stock            Llama (GQA), block 64, plugin installed but off (``DLINFER_VLLM=0``): vLLM's own ops
dense_dlinfer          the same with dlinfer, in-process
dense_dlinfer_b16      dlinfer at block size 16 (vLLM's CPU attention only has multiples of 32), with
                       ``DLINFER_VLLM_DISABLE=silu_and_mul,rotary`` (those two stay vLLM's)
moe_stock              Qwen3-MoE, plugin filtered out by ``VLLM_PLUGINS=""``
moe_dlinfer            the same with dlinfer
dense_mp               dlinfer in vLLM's default multi-process mode, plugin found through its entry point
dense_tp2, moe_tp2     dlinfer at tensor_parallel_size=2 (two worker processes, each rank's shard of the heads
                       and of the experts' intermediate size; vLLM all-reduces the partial sums), first round only
sliding_refused        a Llama whose first layer uses a sliding window: dlinfer refuses it, vLLM stops
=====================  ===========================================================================================

Every in-process case schedules the same work: a long prompt chunked by ``max_num_batched_tokens=64``
(chunked prefill, mixed prefill+decode batches), prompts of 5 to 300 tokens, 32 greedy tokens each with
``ignore_eos``, then a second round whose prompt shares 256 tokens with the long one (a prefix-cache hit).
"""

from __future__ import annotations

import os
import random

import pytest

MAX_TOKENS = 32
LOGPROB_TOL = 1e-4
TIE_GAP = 1e-4


def _rounds() -> list[list[list[int]]]:
    rng = random.Random(1234)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(16, 500) for _ in range(n)]

    long = tokens(300)
    first = [tokens(5), tokens(23), tokens(77), long]
    second = [long[:256] + tokens(20), tokens(40)]
    return [first, second]


def _llm(**overrides) -> dict:
    kwargs = dict(dtype="float32", enforce_eager=True, block_size=64, kv_cache_memory_bytes=64 << 20,
                  max_model_len=1024, max_num_batched_tokens=64, max_num_seqs=8, enable_prefix_caching=True,
                  seed=0)
    kwargs.update(overrides)
    return kwargs


IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# vLLM's CPU workers bind their threads one NUMA node per rank unless told which cores: one core per rank here
_CORES = sorted(os.sched_getaffinity(0))
TP2 = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_CPU_OMP_THREADS_BIND": "|".join(map(str, _CORES[:2]))}
CASES = {
    "dense_stock": dict(model="dense", env=dict(IN_PROCESS, DLINFER_VLLM="0"),
                        case=dict(llm=_llm(), rounds=_rounds(), max_tokens=MAX_TOKENS)),
    "dense_dlinfer": dict(model="dense", env=IN_PROCESS,
                          case=dict(llm=_llm(), rounds=_rounds(), max_tokens=MAX_TOKENS)),
    "dense_dlinfer_b16": dict(model="dense", env=dict(IN_PROCESS, DLINFER_VLLM_DISABLE="silu_and_mul,rotary"),
                              case=dict(llm=_llm(block_size=16), rounds=_rounds(), max_tokens=MAX_TOKENS)),
    "moe_stock": dict(model="moe", env=dict(IN_PROCESS, VLLM_PLUGINS=""),
                      case=dict(llm=_llm(), rounds=_rounds(), max_tokens=MAX_TOKENS)),
    "moe_dlinfer": dict(model="moe", env=IN_PROCESS,
                        case=dict(llm=_llm(), rounds=_rounds(), max_tokens=MAX_TOKENS)),
    # vLLM's default: engine core and worker in their own processes. collective_rpc(callable) needs this flag.
    "sliding_refused": dict(model="sliding", env=IN_PROCESS, expect_failure=True,
                            case=dict(llm=_llm(), rounds=[], max_tokens=MAX_TOKENS)),
    "dense_mp": dict(model="dense", env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
                     case=dict(llm=_llm(), rounds=_rounds()[:1], max_tokens=MAX_TOKENS)),
    "dense_tp2": dict(model="dense", env=TP2, case=dict(llm=_llm(tensor_parallel_size=2,
                                                                 distributed_executor_backend="mp"),
                                                        rounds=_rounds()[:1], max_tokens=MAX_TOKENS)),
    "moe_tp2": dict(model="moe", env=TP2, case=dict(llm=_llm(tensor_parallel_size=2, distributed_executor_backend="mp"),
                                                    rounds=_rounds()[:1], max_tokens=MAX_TOKENS)),
}

DENSE_OPS = ("rms_norm", "add_rms_norm", "silu_and_mul", "apply_rotary_pos_emb", "fill_kv_cache",
             "prefill_attention", "paged_prefill_attention", "paged_decode_attention")
MOE_OPS = DENSE_OPS[:2] + DENSE_OPS[3:] + ("moe_gating_topk_softmax", "fused_moe")


@pytest.fixture(scope="session")
def runs(engine_runs):
    return engine_runs(CASES)


def compare(stock: dict, dlinfer: dict) -> list[str]:
    """Greedy tokens and top-2 logprobs of every prompt of every round; returns the ties it found.

    A divergence at a step where stock's top-2 logprob gap is below ``TIE_GAP`` is a tie (the comparison of
    that prompt stops there); any other divergence, or a top logprob off by more than ``LOGPROB_TOL`` before
    it, fails.
    """
    ties = []
    assert len(stock["rounds"]) == len(dlinfer["rounds"])
    for r, (s_round, d_round) in enumerate(zip(stock["rounds"], dlinfer["rounds"])):
        assert len(s_round) == len(d_round)
        for p, (s, d) in enumerate(zip(s_round, d_round)):
            assert len(s["tokens"]) == len(d["tokens"]) == MAX_TOKENS, (r, p)
            for step, (ss, ds) in enumerate(zip(s["steps"], d["steps"])):
                if ss["token"] != ds["token"]:
                    gap = ss["top"][0][1] - ss["top"][1][1]
                    if gap < TIE_GAP:
                        ties.append(f"round {r} prompt {p}: tie at step {step} (stock top-2 gap {gap:.2e}), "
                                    f"stock {ss['token']} vs dlinfer {ds['token']}")
                        break
                    pytest.fail(f"round {r} prompt {p}: token {step} differs: stock {s['tokens']} vs dlinfer "
                                f"{d['tokens']} (stock top-2 gap {gap:.3e}, no tie)")
                for (s_id, s_lp), (d_id, d_lp) in zip(ss["top"], ds["top"]):
                    if s_id == d_id:
                        assert abs(s_lp - d_lp) <= LOGPROB_TOL, (
                            f"round {r} prompt {p} step {step}: logprob of token {s_id} stock {s_lp} vs "
                            f"dlinfer {d_lp}")
    return ties


def _report_ties(ties: list[str], record_property) -> None:
    record_property("ties", len(ties))
    for tie in ties:
        print("TIE:", tie)


def _only_process(result: dict) -> dict:
    assert len(result["processes"]) == 1, result["processes"]
    return result["processes"][0]


@pytest.mark.slow
def test_dense_matches_stock(runs, record_property):
    _report_ties(compare(runs("dense_stock"), runs("dense_dlinfer")), record_property)


@pytest.mark.slow
def test_dense_block16_matches_stock(runs, record_property):
    _report_ties(compare(runs("dense_stock"), runs("dense_dlinfer_b16")), record_property)


@pytest.mark.slow
def test_moe_matches_stock(runs, record_property):
    _report_ties(compare(runs("moe_stock"), runs("moe_dlinfer")), record_property)


@pytest.mark.slow
@pytest.mark.parametrize("case, ops", [("dense_dlinfer", DENSE_OPS), ("moe_dlinfer", MOE_OPS)])
def test_every_replaced_op_ran_in_the_model_process(runs, case, ops):
    result = runs(case)
    worker = _only_process(result)
    assert worker["pid"] == result["main_pid"]  # in-process mode: the model ran here
    missing = [op for op in ops if worker["counts"].get(op, 0) == 0]
    assert not missing, f"dlinfer ops that never ran: {missing}; counts {worker['counts']}"
    assert set(worker["vendors"]) >= set(ops), worker["vendors"]
    classes = result["classes"][0]
    expected = ["DlinferRMSNorm", "DlinferSiluAndMul", "DlinferRotaryEmbedding", "DlinferAttentionImpl"]
    if case.startswith("moe"):
        expected = [c for c in expected if c != "DlinferSiluAndMul"] + ["DlinferUnquantizedFusedMoEMethod"]
        assert "UnquantizedFusedMoEMethod" not in classes
    assert all(c in classes for c in expected), classes
    assert "CPUAttentionBackendImpl" not in classes and "RMSNorm" not in classes, classes
    assert "took over on cpu" in result["log"], "the plugin did not log what it took over"


@pytest.mark.slow
def test_chunked_prefill_mixed_batches_and_prefix_cache_were_exercised(runs):
    for case in ("dense_stock", "dense_dlinfer", "dense_dlinfer_b16", "moe_dlinfer"):
        result = runs(case)
        assert result["rounds"][1][0]["num_cached_tokens"] >= 192, (case, result["rounds"][1][0])
    for case in ("dense_dlinfer", "dense_dlinfer_b16", "moe_dlinfer"):
        counts = _only_process(runs(case))["counts"]
        # the 300-token prompt is prefilled in 64-token chunks: later chunks read their history from the cache,
        # in the same steps as the decodes of the shorter prompts
        assert counts["paged_prefill_attention"] > 0 and counts["prefill_attention"] > 0, (case, counts)
        assert counts.get("mixed_prefill_decode_batch", 0) > 0, (case, counts)


@pytest.mark.slow
def test_per_op_switch_leaves_listed_ops_to_vllm(runs):
    result = runs("dense_dlinfer_b16")
    worker = _only_process(result)
    assert "silu_and_mul" not in worker["counts"] and "apply_rotary_pos_emb" not in worker["counts"]
    assert set(worker["registered"]) == {"rms_norm", "fused_moe", "attention"}
    classes = result["classes"][0]
    assert "SiluAndMul" in classes and "RotaryEmbedding" in classes
    assert "DlinferRMSNorm" in classes and "DlinferAttentionImpl" in classes
    for op in ("rms_norm", "add_rms_norm", "fill_kv_cache", "paged_decode_attention", "paged_prefill_attention"):
        assert worker["counts"].get(op, 0) > 0, (op, worker["counts"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dense_stock", "moe_stock"])
def test_off_switch_restores_stock(runs, case):
    result = runs(case)
    worker = _only_process(result)
    assert worker["registered"] == {} and worker["counts"] == {}, worker
    classes = result["classes"][0]
    assert not [c for c in classes if c.startswith("Dlinfer")], classes
    assert "CPUAttentionBackendImpl" in classes and "RMSNorm" in classes
    if case == "moe_stock":
        assert "UnquantizedFusedMoEMethod" in classes


@pytest.mark.slow
def test_default_multiprocess_mode_runs_dlinfer_in_the_worker(runs, record_property):
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("dlinfer") == "dlinfer.framework.vllm_ext:register", (
        f"dlinfer's vllm.general_plugins entry point is not installed (pip install -e .): {eps}")
    result = runs("dense_mp")
    worker = _only_process(result)
    assert worker["pid"] != result["main_pid"], "the model should run in a worker process"
    assert result["main_counts"] == {}, "no dlinfer op should run in the API process"
    missing = [op for op in DENSE_OPS if worker["counts"].get(op, 0) == 0]
    assert not missing, f"dlinfer ops that never ran in the worker: {missing}; {worker['counts']}"
    stock = dict(runs("dense_stock"), rounds=runs("dense_stock")["rounds"][:1])
    _report_ties(compare(stock, result), record_property)


@pytest.mark.slow
@pytest.mark.parametrize("case, stock_case, ops", [("dense_tp2", "dense_stock", DENSE_OPS),
                                                   ("moe_tp2", "moe_stock", MOE_OPS)])
def test_tensor_parallel_matches_stock(runs, case, stock_case, ops, record_property):
    """Two ranks, each running every replaced op on its shard in its own worker (the KV heads and the experts'
    intermediate size split in two), give stock vLLM's single-rank tokens and logprobs."""
    if len(_CORES) < 2:
        pytest.skip("tensor_parallel_size=2 on the CPU needs two cores to bind the ranks' threads to")
    result = runs(case)
    workers = result["processes"]
    assert len(workers) == 2 and len({w["pid"] for w in workers} | {result["main_pid"]}) == 3, workers
    for rank, worker in enumerate(workers):
        missing = [op for op in ops if worker["counts"].get(op, 0) == 0]
        assert not missing, f"rank {rank}: dlinfer ops that never ran: {missing}; {worker['counts']}"
    assert workers[0]["counts"] == workers[1]["counts"], "both ranks run the same layers and steps"
    stock = dict(runs(stock_case), rounds=runs(stock_case)["rounds"][:1])
    _report_ties(compare(stock, result), record_property)


def test_comparison_rule_fails_on_divergence_and_reports_ties():
    def run(tokens, tops):
        steps = [{"token": t, "top": top} for t, top in zip(tokens, tops)]
        return {"rounds": [[{"tokens": tokens, "steps": steps}]]}

    tokens = list(range(MAX_TOKENS))
    clear = [[[t, -0.1], [t + 1, -3.0]] for t in tokens]
    assert compare(run(tokens, clear), run(tokens, clear)) == []
    other = tokens[:5] + [99] + tokens[6:]
    with pytest.raises(pytest.fail.Exception, match="token 5 differs"):
        compare(run(tokens, clear), run(other, clear))
    tied = [list(x) for x in clear]
    tied[5] = [[5, -0.69310], [99, -0.69315]]
    ties = compare(run(tokens, tied), run(other, clear))
    assert len(ties) == 1 and "step 5" in ties[0]
    off = [list(x) for x in clear]
    off[3] = [[3, -0.1003], [4, -3.0]]
    with pytest.raises(AssertionError, match="logprob of token 3"):
        compare(run(tokens, clear), run(tokens, off))


@pytest.mark.slow
def test_unsupported_feature_is_refused_with_its_name(runs):
    result = runs("sliding_refused")
    assert result["returncode"] != 0, "a sliding-window model must not run on dlinfer's attention"
    assert "dlinfer attention backend cannot serve this layer: sliding-window attention (window 32)" in result["log"]
    assert "DLINFER_VLLM_DISABLE=attention" in result["log"]
