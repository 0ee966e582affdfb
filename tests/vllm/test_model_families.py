"""End to end on more model families: vLLM (CPU build) with and without dlinfer, tiny random weights, float32.

``test_end_to_end.py`` covers Llama (dense GQA) and Qwen3-MoE; this module runs the same workload (chunked
prefill with mixed prefill+decode batches, then a prefix-cache round; see that module's docstring) on three
more families, each once with the plugin off (``DLINFER_VLLM=0``) and once with dlinfer in-process:

=========  ==========================================================================================
family     what it adds
=========  ==========================================================================================
qwen2      q/k/v projection biases (vLLM's fused QKV linear with bias; the layer ops are Llama's)
qwen3      a per-head RMSNorm on the queries and the keys before rotary (two more RMSNorm per layer,
           over ``[tokens, heads, head_dim]`` views)
mixtral    MoE with Mixtral's router (softmax top-2, renormalized), no shared expert, no dense MLP
=========  ==========================================================================================

Per family: greedy tokens and top-2 logprobs agree with stock vLLM by ``test_end_to_end.compare`` (a
divergence only where stock's top-2 gap is under the tie gap), and, in the process that ran the model, every op
the plugin replaces for the family ran through dlinfer on the ``reference`` vendor, every such layer is
dlinfer's class (none kept vLLM's implementation), and no stock class of a replaced op is left.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import EngineRuns  # tests/vllm/conftest.py: this folder's engine-case runner
from test_end_to_end import (DENSE_OPS, IN_PROCESS, MAX_TOKENS, MOE_OPS, _llm, _only_process, _report_ties,
                             _rounds, compare)

LAYERS = 2  # the tiny models' num_hidden_layers

# family -> (dlinfer ops that must run, dlinfer classes that must compute, RMSNorm layers in the model)
FAMILIES = {
    "qwen2": (DENSE_OPS, ("DlinferRMSNorm", "DlinferSiluAndMul", "DlinferRotaryEmbedding", "DlinferAttentionImpl"),
              2 * LAYERS + 1),
    # input/post-attention norms, the final norm, and q_norm/k_norm in every layer
    "qwen3": (DENSE_OPS, ("DlinferRMSNorm", "DlinferSiluAndMul", "DlinferRotaryEmbedding", "DlinferAttentionImpl"),
              4 * LAYERS + 1),
    "mixtral": (MOE_OPS, ("DlinferRMSNorm", "DlinferRotaryEmbedding", "DlinferAttentionImpl",
                          "DlinferUnquantizedFusedMoEMethod"), 2 * LAYERS + 1),
}
STOCK_CLASSES = ("RMSNorm", "SiluAndMul", "RotaryEmbedding", "CPUAttentionBackendImpl", "UnquantizedFusedMoEMethod")

CASES = {}
for _family in FAMILIES:
    _case = dict(llm=_llm(), rounds=_rounds(), max_tokens=MAX_TOKENS)
    CASES[f"{_family}_stock"] = dict(model=_family, env=dict(IN_PROCESS, DLINFER_VLLM="0"), case=_case)
    CASES[f"{_family}_dlinfer"] = dict(model=_family, env=IN_PROCESS, case=_case)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, str]:
    from dlinfer.testing.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("tiny_family_models")
    models = {family: build_tiny_model(root / family, family, num_hidden_layers=LAYERS) for family in FAMILIES}
    for family, path in models.items():
        assert json.loads((Path(path) / "config.json").read_text())["model_type"] == family
    return models


@pytest.fixture(scope="session")
def family_runs(tmp_path_factory, family_models):
    return EngineRuns(tmp_path_factory.mktemp("vllm_family_runs"), family_models, CASES)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_stock(family_runs, family, record_property):
    _report_ties(compare(family_runs(f"{family}_stock"), family_runs(f"{family}_dlinfer")), record_property)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_replaced_op_of_the_family_ran_on_dlinfer(family_runs, family):
    ops, expected_classes, norms = FAMILIES[family]
    result = family_runs(f"{family}_dlinfer")
    worker = _only_process(result)
    assert worker["pid"] == result["main_pid"]  # in-process mode: the model ran here
    missing = [op for op in ops if worker["counts"].get(op, 0) == 0]
    assert not missing, f"{family}: dlinfer ops that never ran: {missing}; counts {worker['counts']}"
    not_reference = {op: worker["vendors"].get(op) for op in ops if worker["vendors"].get(op) != ["reference"]}
    assert not not_reference, f"{family}: ops not served (only) by the reference vendor: {not_reference}"
    classes = result["classes"][0]
    assert all(c in classes for c in expected_classes), classes
    assert classes["DlinferRMSNorm"] == norms, classes
    assert not [c for c in STOCK_CLASSES if c in classes], classes
    assert "took over on cpu" in result["log"], "the plugin did not log what it took over"
    # a replaced layer whose configuration dlinfer refuses keeps vLLM's forward and says so once
    refusals = [line for line in result["log"].splitlines() if "keeps vLLM's implementation" in line]
    assert not refusals, f"{family}: layers left to vLLM: {refusals}"
    # the workload: chunked prefill in mixed batches, then a prefix-cache hit
    assert worker["counts"]["paged_prefill_attention"] > 0 and worker["counts"]["prefill_attention"] > 0
    assert worker["counts"].get("mixed_prefill_decode_batch", 0) > 0, worker["counts"]
    assert result["rounds"][1][0]["num_cached_tokens"] >= 192, result["rounds"][1][0]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_stock_run_of_the_family_used_no_dlinfer(family_runs, family):
    result = family_runs(f"{family}_stock")
    worker = _only_process(result)
    assert worker["registered"] == {} and worker["counts"] == {}, worker
    assert not [c for c in result["classes"][0] if c.startswith("Dlinfer")], result["classes"][0]
