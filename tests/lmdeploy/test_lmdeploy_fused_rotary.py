"""The rotary embedding deferred to the attention layer (``DLINFER_LMDEPLOY_FUSE_ROTARY``, on by default): the
deferral itself, and that nothing is ever left unrotated silently. The models' logits with it on are checked against
transformers in test_lmdeploy_models.py; the calls it makes in test_lmdeploy_call_abi.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("lmdeploy", reason="LMDeploy is not installed (scripts/setup_lmdeploy.sh installs it)")

import torch  # noqa: E402

import dlinfer.ops as dl  # noqa: E402

pytestmark = pytest.mark.lmdeploy

T, HQ, HK, D, BLOCKS, BS = 5, 4, 2, 16, 4, 4


@pytest.fixture
def backend():
    from dlinfer.framework.lmdeploy_ext import backend

    backend.clear_deferred_rotary()
    yield backend
    backend.clear_deferred_rotary()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, HQ + 2 * HK, D, generator=g)
    q, k, v = qkv.split([HQ, HK, HK], dim=1)  # strided views of one projection, as LMDeploy's split_qkv gives
    pos = torch.arange(T, dtype=torch.float32)[:, None] * torch.linspace(0.1, 1.0, D // 2)[None]
    cos, sin = torch.cat([pos.cos()] * 2, -1), torch.cat([pos.sin()] * 2, -1)
    caches = torch.zeros(BLOCKS, BS, HK, D), torch.zeros(BLOCKS, BS, HK, D)
    slots = torch.tensor([3, 9, 10, 4, -1])
    return q, k, v, cos, sin, caches, slots


def _expected(q, k, v, cos, sin, caches, slots):
    q, k = q.clone(), k.clone()
    kc, vc = caches[0].clone(), caches[1].clone()
    dl.apply_rotary_pos_emb(q, k, cos, sin)
    dl.fill_kv_cache(k, v, kc, vc, slots)
    return q, k, kc, vc


def test_rotary_is_deferred_and_an_unconsumed_one_is_an_error(backend):
    impl = backend.DlinferCudaApplyRotaryEmbImpl()
    q, k, _, cos, sin, _, _ = _inputs()
    before = q.clone()
    got_q, got_k = impl.forward(q, k, cos, sin, inplace=True)
    assert got_q is q and got_k is k and torch.equal(q, before)  # nothing rotated yet: deferred
    with pytest.raises(RuntimeError, match="never applied.*DLINFER_LMDEPLOY_FUSE_ROTARY=0"):
        impl.forward(q, k, cos, sin, inplace=True)
    # not in place: LMDeploy's layer as it is (new tensors, rotated), nothing deferred
    want_q = q.clone()
    dl.apply_rotary_pos_emb(want_q, k.clone(), cos, sin)
    out_q, _ = impl.forward(q, k, cos, sin, inplace=False)
    assert out_q is not q and torch.allclose(out_q, want_q) and backend._deferred.rotary is None


def test_attention_fuses_the_deferred_rotary_with_the_cache_write(backend):
    q, k, v, cos, sin, caches, slots = _inputs()
    want = _expected(q, k, v, cos, sin, caches, slots)
    meta = SimpleNamespace(quant_policy=0, kv_start_indices=slots)
    filled = backend.DlinferCudaAttentionImpl._rotate((q, k, cos, sin), q, k, v, *caches, meta, unusual=False)
    assert filled is True
    for got, exp in zip((q, k, *caches), want):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-6)


def test_attention_rotates_views_first_and_refuses_copies(backend):
    q, k, v, cos, sin, caches, slots = _inputs(1)
    want_q, want_k, _, _ = _expected(q, k, v, cos, sin, caches, slots)
    meta = SimpleNamespace(quant_policy=0, kv_start_indices=slots)
    # the attention got views of the deferred tensors (reshaped by a layer in between): rotated in place, the
    # cache left to LMDeploy's own fill_kv_cache
    filled = backend.DlinferCudaAttentionImpl._rotate((q, k, cos, sin), q.view(T, HQ * D), k.view(T, HK * D), v,
                                                      *caches, meta, unusual=False)
    assert filled is False and not caches[0].any()
    torch.testing.assert_close(q, want_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(k, want_k, rtol=0, atol=1e-6)
    # a quantized cache: rotated first, never fused
    q, k, v, cos, sin, caches, slots = _inputs(2)
    want_q, _, _, _ = _expected(q, k, v, cos, sin, caches, slots)
    meta8 = SimpleNamespace(quant_policy=8, kv_start_indices=slots)
    assert backend.DlinferCudaAttentionImpl._rotate((q, k, cos, sin), q, k, v, *caches, meta8, unusual=False) is False
    torch.testing.assert_close(q, want_q, rtol=0, atol=1e-6)
    # copies: rotating the deferred tensors would not reach what the attention reads
    q, k, v, cos, sin, caches, slots = _inputs(3)
    with pytest.raises(RuntimeError, match="other query/key tensors.*DLINFER_LMDEPLOY_FUSE_ROTARY=0"):
        backend.DlinferCudaAttentionImpl._rotate((q, k, cos, sin), q.clone(), k.clone(), v, *caches, meta,
                                                 unusual=False)


def test_fuse_rotary_off_builds_lmdeploys_layer(backend, patched, monkeypatch):
    from lmdeploy.pytorch.backends.apply_rotary_emb import ApplyRotaryEmbBuildSpec
    from lmdeploy.pytorch.backends.dlinfer.apply_rotary_emb import DlinferApplyRotaryEmbImpl

    assert type(backend.DlinferCudaOpsBackend.build_op(ApplyRotaryEmbBuildSpec())) is \
        backend.DlinferCudaApplyRotaryEmbImpl
    monkeypatch.setenv("DLINFER_LMDEPLOY_FUSE_ROTARY", "0")
    assert type(backend.DlinferCudaOpsBackend.build_op(ApplyRotaryEmbBuildSpec())) is DlinferApplyRotaryEmbImpl
