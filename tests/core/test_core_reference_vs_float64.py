"""The reference vendor (through the public wrappers) against the independent dense float64 math of
``dlinfer.testing.oracle`` (the same oracle ``dlinfer check --vendor reference`` uses).

Paged attention is checked against plain attention over each sequence gathered token by token from the
cache; prefill against explicit per-head loops; MoE expert by expert.
"""

from __future__ import annotations

import math

import pytest
import torch

import dlinfer.ops as ops
from core_helpers import TOL, rel_err
from dlinfer.testing.oracle import attention_64, gather_tokens, moe_64, rms_norm_64, rotary_64, silu_and_mul_64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _reference_only(isolated_registry):
    isolated_registry.set_override("reference")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# --------------------------------------------------------------------------------------------- helpers
def paged_cache(g, lens, bs, hk, d, dv, dtype, packed):
    """Caches with each sequence in shuffled blocks; returns (k_cache, v_cache, table)."""
    need = [math.ceil(n / bs) for n in lens]
    nb = sum(need) + 2
    if packed:  # vLLM-style: K|V in one buffer, the caches are strided views
        buf = randn(g, nb, bs, hk, d + dv, dtype=dtype)
        kc, vc = buf[..., :d], buf[..., d:]
    else:
        kc, vc = randn(g, nb, bs, hk, d, dtype=dtype), randn(g, nb, bs, hk, dv, dtype=dtype)
    perm = torch.randperm(nb, generator=g).tolist()
    table = torch.zeros(len(lens), max(need + [1]) + 1, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        for j in range(n):
            table[b, j] = perm[i]
            i += 1
    return kc, vc, table


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 13), (1, 2 * 1), (3, 4, 2 * 129)])
def test_silu_and_mul(dtype, shape):
    x = randn(gen(1), *shape, dtype=dtype)
    assert rel_err(ops.silu_and_mul(x), silu_and_mul_64(x)) < TOL[dtype]


def test_silu_and_mul_other_dim():
    x = randn(gen(2), 6, 3, 5)
    out = ops.silu_and_mul(x, dim=0)
    assert out.shape == (3, 3, 5)
    assert rel_err(out, silu_and_mul_64(x.movedim(0, -1)).movedim(-1, 0)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 33), (1, 4096), (2, 3, 5)])
def test_rms_norm_and_add_rms_norm(dtype, shape):
    g = gen(3)
    x, r = randn(g, *shape, dtype=dtype), randn(g, *shape, dtype=dtype)
    w = (1 + randn(g, shape[-1], scale=0.2)).to(dtype)
    assert rel_err(ops.rms_norm(x, w, 1e-5), rms_norm_64(x, w, 1e-5)) < TOL[dtype]
    normed, added = ops.add_rms_norm(x, r, w, 1e-6)
    assert rel_err(added, x.double() + r.double()) < TOL[dtype]
    assert rel_err(normed, rms_norm_64(x.double() + r.double(), w, 1e-6)) < 2 * TOL[dtype]
    assert normed.dtype == added.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hk,d", [(5, 4, 2, 16), (1, 3, 1, 6), (9, 8, 8, 130)])
def test_rotary_on_strided_views(dtype, tokens, hq, hk, d):
    g = gen(4)
    buf = randn(g, tokens, (hq + 2 * hk) * d, dtype=dtype)
    v_before = buf[:, (hq + hk) * d:].clone()
    q = buf[:, :hq * d].view(tokens, hq, d)
    k = buf[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
    q0, k0 = q.clone(), k.clone()
    angles = randn(g, tokens, d // 2, scale=3.0)
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q_out, k_out = ops.apply_rotary_pos_emb(q, k, cos, sin)
    assert q_out is q and k_out is k
    assert rel_err(q, rotary_64(q0, cos, sin)) < TOL[dtype]
    assert rel_err(k, rotary_64(k0, cos, sin)) < TOL[dtype]
    assert torch.equal(buf[:, (hq + hk) * d:], v_before)  # the value part of the buffer is untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs,packed", [(16, False), (32, True), (64, True), (128, False)])
def test_fill_kv_cache(dtype, bs, packed):
    g = gen(5)
    tokens, hk, d, dv = 11, 2, 8, 6
    nb = 3
    if packed:
        buf = randn(g, nb, bs, hk, d + dv, dtype=dtype)
        kc, vc = buf[..., :d], buf[..., d:]
    else:
        kc, vc = randn(g, nb, bs, hk, d, dtype=dtype), randn(g, nb, bs, hk, dv, dtype=dtype)
    k, v = randn(g, tokens, hk, d, dtype=dtype), randn(g, tokens, hk, dv, dtype=dtype)
    slots = torch.randperm(nb * bs, generator=g)[:tokens]
    slots[[2, 7]] = -1
    expect_k, expect_v = kc.clone(), vc.clone()
    for t in range(tokens):
        s = int(slots[t])
        if s >= 0:
            expect_k[s // bs, s % bs] = k[t]
            expect_v[s // bs, s % bs] = v[t]
    out_k, out_v = ops.fill_kv_cache(k, v, kc, vc, slots)
    assert out_k is kc and out_v is vc
    assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d,dv,causal", [(4, 4, 16, 16, True), (8, 2, 16, 8, True), (8, 1, 12, 12, False),
                                               (6, 3, 32, 24, False)])
def test_prefill_attention(dtype, hq, hk, d, dv, causal):
    g = gen(6)
    q_lens, kv_lens = [3, 1, 7], [3, 1, 7] if causal else [5, 2, 7]
    q = randn(g, sum(q_lens), hq, d, dtype=dtype)
    k, v = randn(g, sum(kv_lens), hk, d, dtype=dtype), randn(g, sum(kv_lens), hk, dv, dtype=dtype)
    mask = [torch.ones(1)] if causal else []
    scale = 0.37
    out = ops.prefill_attention(q, k, v, None, None, torch.tensor(q_lens), torch.tensor(kv_lens), max(q_lens) + 2,
                                hq, hk, mask, softmax_scale=scale)
    expect = torch.cat([attention_64(q[qs:qs + ql], k[ks:ks + kl], v[ks:ks + kl], scale, causal)
                        for qs, ql, ks, kl in zip(_starts(q_lens), q_lens, _starts(kv_lens), kv_lens)])
    assert out.shape == (sum(q_lens), hq, dv) and out.dtype == dtype
    assert rel_err(out, expect) < 2 * TOL[dtype]


def test_prefill_attention_causal_aligns_ends_and_default_scale():
    g = gen(7)
    q, k, v = randn(g, 2, 2, 8), randn(g, 5, 1, 8), randn(g, 5, 1, 8)
    out = ops.prefill_attention(q, k, v, None, None, torch.tensor([2]), torch.tensor([5]), 2, 2, 1, [True])
    assert rel_err(out, attention_64(q, k, v, 1 / math.sqrt(8), True)) < TOL[torch.float32]


def _starts(lens):
    out, s = [], 0
    for n in lens:
        out.append(s)
        s += n
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs,hq,hk,d,dv,packed,causal", [
    (16, 4, 4, 16, 16, False, True), (32, 8, 2, 16, 8, True, True), (64, 8, 1, 8, 8, True, False),
    (128, 6, 2, 24, 24, False, True)])
def test_paged_prefill_attention_chunked(dtype, bs, hq, hk, d, dv, packed, causal):
    g = gen(8)
    history, q_lens = [0, 37, 5], [9, 4, 1]
    kv_lens = [h + n for h, n in zip(history, q_lens)]
    kc, vc, table = paged_cache(g, kv_lens, bs, hk, d, dv, dtype, packed)
    q = randn(g, sum(q_lens), hq, d, dtype=dtype)
    out_buf = torch.full((sum(q_lens), hq, dv), float("nan"), dtype=dtype)
    cu = torch.tensor(q_lens).cumsum(0)
    mask = [torch.ones(1)] if causal else []
    out = ops.paged_prefill_attention(q, None, None, kc, vc, table, bs, cu, torch.tensor(kv_lens), max(q_lens),
                                      max(kv_lens), hq, hk, mask, head_size_v=dv, attn_output=out_buf)
    assert out is out_buf
    parts = []
    for b, (qs, ql, kl) in enumerate(zip(_starts(q_lens), q_lens, kv_lens)):
        k = gather_tokens(kc, table[b], kl)
        v = gather_tokens(vc, table[b], kl)
        parts.append(attention_64(q[qs:qs + ql], k, v, 1 / math.sqrt(d), causal))
    assert rel_err(out, torch.cat(parts)) < 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs,hq,hk,d,dv,packed", [
    (16, 4, 4, 16, 16, False), (32, 8, 2, 16, 8, True), (64, 8, 1, 8, 8, False), (128, 16, 2, 40, 40, True)])
def test_paged_decode_attention(dtype, bs, hq, hk, d, dv, packed):
    g = gen(9)
    lens = [1, 0, 70, 129, 16]
    kc, vc, table = paged_cache(g, lens, bs, hk, d, dv, dtype, packed)
    q = randn(g, len(lens), hq, d, dtype=dtype)
    out = ops.paged_decode_attention(q, kc, vc, table.long(), bs, None, torch.tensor(lens, dtype=torch.int32),
                                     max(lens) + 5, hq, hk, head_size_v=dv, softmax_scale=0.2)
    expect = torch.zeros(len(lens), hq, dv, dtype=torch.float64)
    for b, n in enumerate(lens):
        if n:
            expect[b] = attention_64(q[b:b + 1], gather_tokens(kc, table[b], n), gather_tokens(vc, table[b], n),
                                     0.2, True)[0]
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # a zero-length row gives zeros
    assert rel_err(out, expect) < 2 * TOL[dtype]


def test_paged_decode_attention_into_query_buffer():
    g = gen(10)
    lens = [5, 33]
    kc, vc, table = paged_cache(g, lens, 16, 2, 8, 8, torch.float32, True)
    q = randn(g, 2, 4, 8)
    q0 = q.clone()
    out = ops.paged_decode_attention(q, kc, vc, table, 16, None, torch.tensor(lens), 40, 4, 2, attn_output=q)
    assert out is q
    expect = torch.stack([attention_64(q0[b:b + 1], gather_tokens(kc, table[b], n), gather_tokens(vc, table[b], n),
                                       1 / math.sqrt(8), True)[0] for b, n in enumerate(lens)])
    assert rel_err(q, expect) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,topk", [(6, 8, 2), (3, 60, 4), (1, 5, 5)])
def test_moe_gating_topk_softmax(dtype, tokens, experts, topk):
    logits = randn(gen(11), tokens, experts, dtype=dtype, scale=2.0)
    weights, ids = ops.moe_gating_topk_softmax(logits, topk, None)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    probs = torch.softmax(logits.double(), -1)
    for t in range(tokens):
        order = sorted(range(experts), key=lambda e: (-float(probs[t, e]), e))[:topk]
        assert ids[t].tolist() == order
        assert torch.allclose(weights[t].double(), probs[t, order], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_moe(dtype, renormalize):
    g = gen(12)
    tokens, hidden, inter, experts, topk = 7, 24, 10, 5, 3
    x = randn(g, tokens, hidden, dtype=dtype)
    gate_up = randn(g, experts, 2 * inter, hidden, dtype=dtype, scale=hidden ** -0.5)
    down = randn(g, experts, hidden, inter, dtype=dtype, scale=inter ** -0.5)
    ids = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]).to(torch.int32)
    weights = torch.rand(tokens, topk, generator=g)
    out = ops.fused_moe(x, gate_up, down, weights, ids, topk, renormalize, None, None)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, moe_64(x, gate_up, down, weights, ids, renormalize)) < 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear(dtype, bias):
    g = gen(13)
    x, w = randn(g, 2, 3, 17, dtype=dtype), randn(g, 9, 17, dtype=dtype, scale=0.3)
    b = randn(g, 9, dtype=dtype) if bias else None
    expect = x.double() @ w.double().T + (b.double() if bias else 0)
    assert rel_err(ops.linear(x, w, b), expect) < 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_fill_kv_cache_fused(dtype):
    g = gen(14)
    tokens, hq, hk, d, bs = 6, 4, 2, 16, 16
    buf = randn(g, tokens, (hq + 2 * hk) * d, dtype=dtype)
    q = buf[:, :hq * d].view(tokens, hq, d)
    k = buf[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
    v = buf[:, (hq + hk) * d:].view(tokens, hk, d)
    q0, k0 = q.clone(), k.clone()
    angles = randn(g, tokens, d // 2)
    cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
    kc, vc = randn(g, 2, bs, hk, d, dtype=dtype), randn(g, 2, bs, hk, d, dtype=dtype)
    slots = torch.tensor([3, 17, -1, 0, 31, 8])
    expect_k, expect_v = kc.clone().double(), vc.clone().double()
    rk = rotary_64(k0, cos, sin)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            expect_k[s // bs, s % bs] = rk[t]
            expect_v[s // bs, s % bs] = v[t].double()
    ops.apply_rotary_pos_emb_fill_kv_cache(q, k, v, kc, vc, cos, sin, slots)
    assert rel_err(q, rotary_64(q0, cos, sin)) < TOL[dtype]
    assert rel_err(kc, expect_k) < TOL[dtype] and torch.equal(vc.double(), expect_v)


def test_empty_batches_give_empty_results():
    """Zero tokens / zero sequences (possible under data-parallel padding) are valid calls."""
    kc = torch.randn(2, 16, 1, 8)
    long0 = torch.zeros(0, dtype=torch.long)
    assert ops.silu_and_mul(torch.randn(0, 8)).shape == (0, 4)
    assert ops.rms_norm(torch.randn(0, 8), torch.ones(8)).shape == (0, 8)
    assert ops.linear(torch.randn(0, 8), torch.randn(5, 8)).shape == (0, 5)
    vc = torch.randn(2, 16, 1, 8)  # distinct from kc: one tensor as both caches is refused (the keys would be lost)
    before = kc.clone(), vc.clone()
    ops.fill_kv_cache(torch.randn(0, 1, 8), torch.randn(0, 1, 8), kc, vc, long0)
    ops.fill_kv_cache(torch.randn(2, 1, 8), torch.randn(2, 1, 8), kc, vc, torch.tensor([-1, -1]))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])
    out = ops.paged_decode_attention(torch.randn(0, 2, 8), kc, kc, torch.zeros(0, 1, dtype=torch.int32), 16, None,
                                     long0, 16, 2, 1)
    assert out.shape == (0, 2, 8)
    w, ids = ops.moe_gating_topk_softmax(torch.randn(0, 8), 2)
    assert w.shape == ids.shape == (0, 2)
    assert ops.fused_moe(torch.randn(0, 8), torch.randn(4, 12, 8), torch.randn(4, 8, 6), torch.rand(0, 2),
                         torch.zeros(0, 2, dtype=torch.long), 2, True).shape == (0, 8)


def test_paged_prefill_with_an_empty_sequence_in_the_batch():
    g = gen(15)
    kc, vc, table = paged_cache(g, [2, 5, 1], 16, 1, 8, 8, torch.float32, False)
    q = randn(g, 3, 2, 8)
    # sequence 1 has no new tokens this step (cu_seqlens_q repeats 2)
    out = ops.paged_prefill_attention(q, None, None, kc, vc, table, 16, torch.tensor([2, 2, 3]),
                                      torch.tensor([2, 5, 1]), 2, 5, 2, 1, [True])
    expect = torch.cat([
        attention_64(q[0:2], gather_tokens(kc, table[0], 2), gather_tokens(vc, table[0], 2), 8 ** -0.5, True),
        attention_64(q[2:3], gather_tokens(kc, table[2], 1), gather_tokens(vc, table[2], 1), 8 ** -0.5, True)])
    assert rel_err(out, expect) < TOL[torch.float32]
