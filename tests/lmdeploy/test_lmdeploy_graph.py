"""CUDA-graph buffers of the dlinfer LMDeploy backend, checked on the CPU without capturing.

A CUDA graph replays the tensors (addresses) and Python values seen at capture. ``EmulatedGraph`` reproduces
exactly that on the CPU: it "captures" by running LMDeploy's graph-runner buffer logic once and keeping the padded
model inputs, and "replays" by refilling the static buffers from the new step and running the model on the
capture-time inputs again. dlinfer's runner must then match transformers at every replay; LMDeploy's stock runner,
which has no buffers for dlinfer's metadata, must not (that proves the check can fail).
"""

from __future__ import annotations

import pytest

pytest.importorskip("lmdeploy", reason="LMDeploy is not installed (scripts/setup_lmdeploy.sh installs it)")
pytest.importorskip("triton", reason="LMDeploy's CUDA graph runner imports its Triton kernels (pip install triton)")

import torch  # noqa: E402

from lmdeploy_harness import PagedModel, hf_logits, hf_logits_kv_quant  # noqa: E402

pytestmark = pytest.mark.lmdeploy

TOL = 1e-4


class EmulatedGraph:
    """Capture-once / replay semantics of ``CUDASingleGraphRunner`` on the CPU (no torch.cuda.graph)."""

    def __init__(self, runner_cls, pm: PagedModel, max_batches: int):
        self.runner = runner_cls(pm.model, max_batches=max_batches, max_tokens=max_batches,
                                 num_blocks=pm.num_blocks, is_decoding=True, decode_query_len=1, pool=None,
                                 model_config=pm.model_config, device=torch.device("cpu"))
        self.runner._use_graph = False
        self.captured = None
        self.replays = 0

    def __call__(self, **kwargs):
        r = self.runner
        if self.captured is None:
            r.meta.input_buffers = r.model.make_buffers_cudagraph(r.meta, **kwargs)
            self.captured = r._bind_inputs(**kwargs)
        else:
            r._bind_inputs(**kwargs)  # refill the static buffers from this step
            self.replays += 1
        output = r._model_forward(**self.captured)  # the capture-time tensors and Python values
        return r.model.get_outputs_cudagraph(r.model.make_output_buffers(output), **kwargs)


def _tokens(seed, n):
    return torch.randint(4, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


FULL_THEN_SHRINK = [[0, 1, 2]] * 4 + [[0, 1]] * 2


PREFILL = [14, 15, 10]


def _decode_through_graph(runner_cls, path, refs, seqs_tokens, max_batches=4, schedule=FULL_THEN_SHRINK,
                          quant_policy=0):
    """Eager prefill, then decode steps through one emulated graph; returns the max logit error."""
    pm = PagedModel(path, block_size=16, num_blocks=48, quant_policy=quant_policy)
    seqs = [pm.new_sequence(t) for t in seqs_tokens]
    pm.step(seqs, PREFILL)
    graph = EmulatedGraph(runner_cls, pm, max_batches=max_batches)
    worst = 0.0
    # default: 4 steps of 3 rows (a and b cross into their second block), then c finishes: 2 steps of 2 rows
    for live in schedule:
        batch = [seqs[i] for i in live]
        out = pm.step(batch, [1] * len(batch), runner=graph)
        for row, i in enumerate(live):
            worst = max(worst, (out[row] - refs[i][batch[row].cached - 1]).abs().max().item())
        buffers = graph.runner.meta.input_buffers
        if runner_cls.__name__ == "DlinferSingleGraphRunner":
            from dlinfer.framework.lmdeploy_ext.graph import KV_START_INDICES

            assert buffers["kv_seqlens"][len(live):].eq(0).all(), "padding rows must have kv_seqlens 0"
            assert buffers[KV_START_INDICES][len(live):].eq(-1).all(), "padding tokens must have slot -1"
    owned = {b for s in seqs for b in s.blocks}
    unused = [b for b in range(pm.num_blocks) if b not in owned]
    return worst, graph.replays, pm, unused


_CASES: dict = {}


def _case(tiny_model, arch):
    if arch not in _CASES:
        path = tiny_model(arch)
        tokens = [_tokens(11, 20), _tokens(12, 21), _tokens(13, 16)]
        _CASES[arch] = (path, tokens, hf_logits(path, tokens))
    return _CASES[arch]


@pytest.fixture
def llama_case(tiny_model):
    return _case(tiny_model, "llama")


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_dlinfer_graph_runner_replays_match_transformers(arch, tiny_model, patched):
    from dlinfer.framework.lmdeploy_ext.graph import DlinferSingleGraphRunner

    path, tokens, refs = _case(tiny_model, arch)
    worst, replays, pm, unused = _decode_through_graph(DlinferSingleGraphRunner, path, refs, tokens)
    assert replays == 5
    assert worst <= TOL, f"graph replays differ from transformers by {worst:.3g}"
    for caches in pm.kv_caches:
        assert all(cache[unused].eq(0).all() for cache in caches), "padding wrote into the KV cache"


def test_dlinfer_graph_runner_replays_a_quantized_cache(llama_case, patched):
    """quant_policy=8: decode replays fill and read the uint8 cache and its scales (static tensors of the cache
    engine, nothing per step) and match transformers over the same quantized cache (``hf_logits_kv_quant``)."""
    from dlinfer.framework.lmdeploy_ext.graph import DlinferSingleGraphRunner

    path, tokens, _ = llama_case
    decodes = [sum(i in live for live in FULL_THEN_SHRINK) for i in range(len(tokens))]
    refs = [hf_logits_kv_quant(path, t, [n] + [1] * d, 8) for t, n, d in zip(tokens, PREFILL, decodes)]
    worst, replays, pm, unused = _decode_through_graph(DlinferSingleGraphRunner, path, refs, tokens, quant_policy=8)
    assert replays == 5 and [c.dtype for c in pm.kv_caches[0]][:2] == [torch.uint8, torch.uint8]
    assert worst <= 1e-4, f"graph replays over a quantized cache differ from transformers by {worst:.3g}"
    for caches in pm.kv_caches:
        assert all(cache[unused].eq(0).all() for cache in caches), "padding wrote into the cache or its scales"


def test_stock_graph_runner_replays_stale_dlinfer_metadata(llama_case, patched):
    """Without dlinfer's buffers a replay reuses capture-time slots and lengths: the emulation must catch it.

    With padding (3 rows in a graph of 4) the stock runner even hands fill_kv_cache 3 slots for 4 tokens; without
    padding (3 rows in a graph of 3) the shapes fit and the stale slots and lengths give wrong logits.
    """
    from lmdeploy.pytorch.backends.cuda.graph_runner.full_graph import CUDASingleGraphRunner

    path, tokens, refs = llama_case
    with pytest.raises(ValueError, match="kv_start_indices"):
        _decode_through_graph(CUDASingleGraphRunner, path, refs, tokens)
    worst, replays, _, _ = _decode_through_graph(CUDASingleGraphRunner, path, refs, tokens, max_batches=3,
                                                 schedule=[[0, 1, 2]] * 4)
    assert replays == 3
    assert worst > 1e-2, "stock runner unexpectedly matched: the emulated replay would not catch stale buffers"


def test_fill_dlinfer_buffers_pads_and_rebinds():
    from types import SimpleNamespace

    from dlinfer.framework.lmdeploy_ext.graph import KV_START_INDICES, fill_dlinfer_buffers, make_dlinfer_buffers

    buffers = {"kv_seqlens": torch.full((4,), 7, dtype=torch.int32),
               "cu_seqlens_q": torch.arange(5, dtype=torch.int32),
               "q_start_loc": torch.arange(4, dtype=torch.int32),
               "block_offsets": torch.zeros(4, 10, dtype=torch.int32)}
    make_dlinfer_buffers(buffers, 4, "cpu")
    meta = SimpleNamespace(kv_start_indices=torch.tensor([5, 9]), kv_seqlens=None, kv_seqlens_cpu=None,
                           cu_seqlens_q_cpu=None, q_start_loc=None, max_kv_seq_len=3)
    fill_dlinfer_buffers(buffers, meta, num_tokens=2, batch_size=2, block_size=16)
    assert buffers[KV_START_INDICES].tolist() == [5, 9, -1, -1]
    assert buffers["kv_seqlens"].tolist() == [7, 7, 0, 0]
    assert meta.kv_start_indices is buffers[KV_START_INDICES]
    assert meta.kv_seqlens_cpu is buffers["kv_seqlens"] and meta.kv_seqlens is buffers["kv_seqlens"]
    assert meta.cu_seqlens_q_cpu is buffers["cu_seqlens_q"] and meta.q_start_loc is buffers["q_start_loc"]
    assert meta.max_kv_seq_len == 160, "max_kv_seq_len must bound every replay: the block table's capacity"
    meta.kv_start_indices = torch.arange(5)
    with pytest.raises(ValueError, match="exceed"):
        fill_dlinfer_buffers(buffers, meta, num_tokens=5, batch_size=4, block_size=16)
    with pytest.raises(KeyError):
        fill_dlinfer_buffers({}, meta, num_tokens=1, batch_size=1, block_size=16)
    with pytest.raises(ValueError, match="max_tokens"):
        make_dlinfer_buffers({}, 0, "cpu")


def test_backend_graph_runner_dispatches_decode_to_dlinfer_graphs(llama_case, patched, monkeypatch, caplog):
    """DlinferCudaOpsBackend.build_graph_runner wired into LMDeploy's runner: prefill eager, decode through a
    DlinferSingleGraphRunner keyed by the padded batch (LMDeploy's fake-capture mode: no CUDA needed)."""
    import lmdeploy.pytorch.backends.cuda.graph_runner.full_graph as full_graph
    from lmdeploy.pytorch.config import BackendConfig

    from dlinfer.framework.lmdeploy_ext.backend import DlinferCudaOpsBackend
    from dlinfer.framework.lmdeploy_ext.graph import DlinferSingleGraphRunner

    monkeypatch.setattr(full_graph, "fake_capture", True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    path, tokens, refs = llama_case
    pm = PagedModel(path, block_size=16, num_blocks=48)
    with caplog.at_level("WARNING", logger="dlinfer"):
        runner = DlinferCudaOpsBackend.build_graph_runner(
            pm.model, pm.model_config, pm.cache_config,
            BackendConfig(eager_mode=False, piecewise_cudagraph_max_tokens=512), torch.device("cpu"))
    assert "piecewise CUDA graphs" in caplog.text and runner._piecewise_graph_manager is None
    seqs = [pm.new_sequence(t) for t in tokens]
    out = pm.step(seqs, [14, 15, 10], runner=runner)
    assert (out[:14] - refs[0][:14]).abs().max().item() <= TOL
    assert not runner._full_graph_runners, "prefill must not use a decode graph"
    for _ in range(3):
        out = pm.step(seqs, [1, 1, 1], runner=runner)
        for row, seq in enumerate(seqs):
            assert (out[row] - refs[row][seq.cached - 1]).abs().max().item() <= TOL
    graphs = runner._full_graph_runners
    assert list(graphs) == [(4, True, False, 1)], "3 live rows use the padded graph of 4"
    assert all(type(g) is DlinferSingleGraphRunner for g in graphs.values())
