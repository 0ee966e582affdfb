"""The vendor contract's batch layout ([B + 1] int32 start offsets) and the once-per-step conversion into it."""

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
