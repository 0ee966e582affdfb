"""The vendor contract's batch layout ([B + 1] int32 start offsets) and the once-per-step conversion into it."""

import pytest
import torch

import dlinfer.ops as ops
from dlinfer.ops import _batch
from dlinfer.vendor import registry


def _prefill(q_lens: torch.Tensor):
    g = torch.Generator().manual_seed(0)
    t = int(q_lens.sum())
    q, k, v = (torch.randn(t, 2, 8, generator=g) for _ in range(3))
    return q, k, v


def test_vendor_sees_int32_start_offsets():
    seen = {}

    def spy(query, key, value, cu_seqlens_q, cu_seqlens_kv, *rest):
        seen["q"], seen["kv"] = cu_seqlens_q.clone(), cu_seqlens_kv.clone()
        registry.get_vendor("reference").ops["prefill_attention"](query, key, value, cu_seqlens_q, cu_seqlens_kv,
                                                                  *rest)

    vendor = registry.Vendor(name="spy_layout", priority=-5, devices=frozenset({"cpu"}),
                             default_devices=frozenset(), ops={"prefill_attention": spy})
    registry.register_vendor(vendor)
    try:
        q_lens = torch.tensor([2, 0, 3])
        q, k, v = _prefill(q_lens)
        registry.set_override("spy_layout", "prefill_attention")
        ops.prefill_attention(q, k, v, None, None, q_lens, q_lens, 3, 2, 2, [None])
    finally:
        registry.set_override(None, "prefill_attention")
        registry.unregister_vendor("spy_layout")
    assert seen["q"].dtype == torch.int32 and seen["q"].tolist() == [0, 2, 2, 5]
    assert seen["kv"].tolist() == [0, 2, 2, 5]


def test_conversion_runs_once_per_step_not_per_layer(monkeypatch):
    calls = []
    real = _batch._from_lengths
    monkeypatch.setattr(_batch, "_from_lengths", lambda t, d: calls.append(1) or real(t, d))
    _batch.clear()
    q_lens = torch.tensor([3, 2])
    q, k, v = _prefill(q_lens)
    first = ops.prefill_attention(q, k, v, None, None, q_lens, q_lens, 3, 2, 2, [None]).clone()
    for _ in range(5):  # more layers of the same step: same metadata tensors
        assert torch.equal(ops.prefill_attention(q, k, v, None, None, q_lens, q_lens, 3, 2, 2, [None]), first)
    assert len(calls) == 1  # q_seqlens and kv_seqlens are one tensor here


def test_an_in_place_update_of_the_lengths_is_seen():
    """A CUDA-graph runner refills its static length buffers in place: the next step must not reuse the old
    conversion."""
    _batch.clear()
    q_lens = torch.tensor([3, 2])
    q, k, v = _prefill(q_lens)
    ops.prefill_attention(q, k, v, None, None, q_lens, q_lens, 3, 2, 2, [None])
    q_lens.copy_(torch.tensor([1, 4]))
    got = ops.prefill_attention(q, k, v, None, None, q_lens, q_lens, 4, 2, 2, [None])
    _batch.clear()
    want = ops.prefill_attention(q, k, v, None, None, torch.tensor([1, 4]), torch.tensor([1, 4]), 4, 2, 2, [None])
    assert torch.equal(got, want)


def test_inference_mode_tensors_are_converted_not_cached():
    """Inference tensors have no version counter (vLLM and LMDeploy run under torch.inference_mode)."""
    _batch.clear()
    with torch.inference_mode():
        q_lens = torch.tensor([3, 2])
        q, k, v = _prefill(q_lens)
        first = ops.prefill_attention(q, k, v, None, None, q_lens, q_lens, 3, 2, 2, [None])
        assert torch.equal(ops.prefill_attention(q, k, v, None, None, q_lens, q_lens, 3, 2, 2, [None]), first)


def test_a_planned_step_layout_is_read_by_every_layer_without_a_launch(monkeypatch):
    """The adapters' per-step builder plans the [B + 1] offsets; the LMDeploy-shaped wrappers then convert nothing,
    for the lengths and for LMDeploy's ``cu_seqlens_q[1:]`` view alike, in inference mode too."""
    from dlinfer.framework import batch

    conversions = []
    for name in ("_from_lengths", "_from_ends", "_int32_on"):
        real = getattr(_batch, name)
        monkeypatch.setattr(_batch, name, lambda t, d, real=real, name=name: conversions.append(name) or real(t, d))
    _batch.clear()
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        q_lens, kv_lens = torch.tensor([3, 1]), torch.tensor([5, 4])
        layout = batch.from_lengths(q_lens, kv_lens)
        assert layout.cu_seqlens_q.tolist() == [0, 3, 4] and layout.cu_seqlens_q.dtype == torch.int32
        q = torch.randn(4, 2, 8, generator=g)
        k_cache, v_cache = torch.randn(4, 4, 1, 8, generator=g), torch.randn(4, 4, 1, 8, generator=g)
        table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
        outs = [ops.paged_prefill_attention(q, None, None, k_cache, v_cache, table, 4, layout.cu_seqlens_q[1:],
                                            layout.kv_seqlens, 3, 5, 2, 1, [None]) for _layer in range(3)]
        # no-history prefill: prefill_attention gets the planned lengths for queries and keys
        nh = batch.from_lengths(q_lens, q_lens, no_history=True)
        ops.prefill_attention(q, q[:, :1], q[:, :1], None, None, nh.q_seqlens, nh.kv_seqlens, 3, 2, 1, [None])
    assert conversions == []
    assert all(torch.equal(o, outs[0]) for o in outs)
    _batch.clear()
    want = ops.paged_prefill_attention(q.clone(), None, None, k_cache, v_cache, table, 4, torch.tensor([3, 4]),
                                       torch.tensor([5, 4]), 3, 5, 2, 1, [None])
    torch.testing.assert_close(outs[0], want)


def test_the_clean_contract_equals_the_lmdeploy_wrappers():
    """Adapters that build the layout (vLLM's) call ``varlen_attention``/``paged_prefill``/``paged_decode``
    directly: same results as the LMDeploy-shaped wrappers, no placeholders."""
    from dlinfer.framework import batch
    from dlinfer.ops import attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(5, h, 8, generator=g) for h in (4, 2, 2))
    lens = torch.tensor([2, 3])
    layout = batch.from_lengths(lens, lens, no_history=True)
    clean = attention.varlen_attention(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_q, 3, causal=True)
    torch.testing.assert_close(clean, ops.prefill_attention(q, k, v, None, None, lens, lens, 3, 4, 2, [None]))

    k_cache, v_cache = torch.randn(4, 4, 2, 8, generator=g), torch.randn(4, 4, 2, 8, generator=g)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    kv = torch.tensor([6, 3], dtype=torch.int32)
    clean = attention.paged_prefill(q, k_cache, v_cache, table, layout.cu_seqlens_q, kv, 3, 6)
    torch.testing.assert_close(clean, ops.paged_prefill_attention(q, None, None, k_cache, v_cache, table, 4,
                                                                  torch.tensor([2, 5]), kv, 3, 6, 4, 2, [None]))
    clean = attention.paged_decode(q[:2], k_cache, v_cache, table, kv, 6)
    torch.testing.assert_close(clean, ops.paged_decode_attention(q[:2], k_cache, v_cache, table, 4, None, kv, 6, 4, 2))

    with pytest.raises(ValueError, match=r"cu_seqlens_q must have dtype in \(int32\)"):
        attention.varlen_attention(q, k, v, layout.cu_seqlens_q.long(), layout.cu_seqlens_q, 3)
    with pytest.raises(ValueError, match="query must have 3 dimensions"):
        attention.paged_decode(q[:2].flatten(1), k_cache, v_cache, table, kv, 6)
