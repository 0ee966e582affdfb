"""Every op of the triton vendor captured in a CUDA graph, then replayed on other inputs.

Each test captures the public ``dlinfer.ops`` call once on static buffers, then, several times, writes new
values into those buffers (new lengths up to the captured bound, shuffled block tables, new slots with
padding, new routing) and replays the graph. Each replay must give what the reference vendor computes from
the new values: nothing the op derived on the host at capture time may leak into a replay.
"""

from __future__ import annotations

import math

import pytest
import torch

import dlinfer.ops as ops
from dlinfer.vendor.reference import activation as ref_act
from dlinfer.vendor.reference import attention as ref_attn
from dlinfer.vendor.reference import kv_cache as ref_kv
from dlinfer.vendor.reference import linear as ref_linear
from dlinfer.vendor.reference import moe as ref_moe
from dlinfer.vendor.reference import norm as ref_norm
from dlinfer.vendor.reference import quant as ref_quant
from dlinfer.vendor.reference import rotary as ref_rotary

DEV = "cuda"
REPLAYS = 4
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPES = [torch.bfloat16, torch.float16]


def require(vendor, op: str) -> None:
    """Fail (not skip) when the triton vendor lacks a core op: the vendor serves every core op on NVIDIA."""
    if not vendor.provides(op):
        pytest.fail(f"the triton vendor does not provide {op}; it provides {sorted(vendor.ops)}")


def capture(fn):
    """Warm ``fn`` up on a side stream (compiles its kernels), then capture one call; return (graph, output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.double(), ref.double()
    assert torch.isfinite(o).all(), "non-finite values in the output"
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def close(out, ref, dtype, what: str, scale: float = 1.0) -> None:
    err = rel_err(out, ref)
    assert err <= TOL[dtype] * scale, f"{what}: rel err {err:.3e} > {TOL[dtype] * scale:.1e}"


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEV, dtype=torch.float32, generator=g) * scale).to(dtype)


# ----------------------------------------------------------------------------------------- element-wise
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(triton_vendor, dtype):
    require(triton_vendor, "silu_and_mul")
    g = gen(1)
    x = randn(g, 37, 2 * 704, dtype=dtype)
    graph, out = capture(lambda: ops.silu_and_mul(x))
    for _ in range(REPLAYS):
        x.copy_(randn(g, *x.shape, dtype=dtype, scale=3.0))
        graph.replay()
        close(out, ref_act.silu_and_mul(x.float()), dtype, "silu_and_mul")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norms(triton_vendor, dtype):
    require(triton_vendor, "rms_norm")
    require(triton_vendor, "add_rms_norm")
    g = gen(2)
    x, r = randn(g, 29, 4096, dtype=dtype), randn(g, 29, 4096, dtype=dtype)
    w = randn(g, 4096, dtype=dtype)

    def both():
        return ops.rms_norm(x, w, 1e-6), ops.add_rms_norm(x, r, w, 1e-5)

    graph, (normed, (added_normed, added)) = capture(both)
    for i in range(REPLAYS):
        x.copy_(randn(g, *x.shape, dtype=dtype, scale=1.0 + i))
        r.copy_(randn(g, *r.shape, dtype=dtype))
        w.copy_(randn(g, *w.shape, dtype=dtype))
        graph.replay()
        close(normed, ref_norm.rms_norm(x, w, 1e-6), dtype, "rms_norm")
        ref_n, ref_sum = ref_norm.add_rms_norm(x, r, w, 1e-5)
        close(added, ref_sum, dtype, "add_rms_norm residual")
        close(added_normed, ref_n, dtype, "add_rms_norm output")


def _rope(g, tokens, head, dtype):
    positions = torch.randint(0, 8192, (tokens,), device=DEV, generator=g).float()
    inv = 1.0 / (10000.0 ** (torch.arange(0, head, 2, device=DEV).float() / head))
    ang = positions[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_fused_qkv_views(triton_vendor, dtype):
    require(triton_vendor, "apply_rotary_pos_emb")
    g = gen(3)
    tokens, hq, hk, d = 19, 8, 2, 128
    qkv = randn(g, tokens, (hq + 2 * hk) * d, dtype=dtype)
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
    cos, sin = _rope(g, tokens, d, dtype)
    graph, _ = capture(lambda: ops.apply_rotary_pos_emb(q, k, cos, sin))
    for _ in range(REPLAYS):
        qkv.copy_(randn(g, *qkv.shape, dtype=dtype))
        c, s = _rope(g, tokens, d, dtype)
        cos.copy_(c)
        sin.copy_(s)
        ref_q, ref_k = q.float().clone(), k.float().clone()
        ref_rotary.apply_rotary_pos_emb(ref_q, ref_k, cos.float(), sin.float())
        v_before = qkv[:, (hq + hk) * d:].clone()
        graph.replay()
        close(q, ref_q, dtype, "rotary q")
        close(k, ref_k, dtype, "rotary k")
        assert torch.equal(qkv[:, (hq + hk) * d:], v_before), "rotary wrote outside q and k"


# ---------------------------------------------------------------------------------------------- KV cache
def _slots(g, tokens, num_blocks, block_size, pad):
    slots = torch.randperm(num_blocks * block_size, device=DEV, generator=g)[:tokens]
    if pad:
        slots[torch.randperm(tokens, device=DEV, generator=g)[:pad]] = -1
    return slots.to(torch.int32)


@pytest.mark.parametrize("block_size", [16, 64])
def test_fill_kv_cache_new_slots_each_replay(triton_vendor, block_size):
    require(triton_vendor, "fill_kv_cache")
    dtype = torch.bfloat16
    g = gen(4 + block_size)
    tokens, hk, d, num_blocks = 45, 4, 128, 12
    key, value = randn(g, tokens, hk, d, dtype=dtype), randn(g, tokens, hk, d, dtype=dtype)
    k_cache = randn(g, num_blocks, block_size, hk, d, dtype=dtype)
    v_cache = randn(g, num_blocks, block_size, hk, d, dtype=dtype)
    slots = _slots(g, tokens, num_blocks, block_size, pad=0)
    graph, _ = capture(lambda: ops.fill_kv_cache(key, value, k_cache, v_cache, slots))
    for i in range(REPLAYS):
        key.copy_(randn(g, *key.shape, dtype=dtype))
        value.copy_(randn(g, *value.shape, dtype=dtype))
        slots.copy_(_slots(g, tokens, num_blocks, block_size, pad=3 * i))
        want_k, want_v = k_cache.clone(), v_cache.clone()
        ref_kv.fill_kv_cache(key, value, want_k, want_v, slots, [], [], 0)
        graph.replay()
        assert torch.equal(k_cache, want_k), f"replay {i}: key cache differs from the reference fill"
        assert torch.equal(v_cache, want_v), f"replay {i}: value cache differs from the reference fill"


def test_fused_rotary_fill_kv_cache(triton_vendor):
    op = "apply_rotary_pos_emb_fill_kv_cache"
    if not triton_vendor.provides(op):
        pytest.skip(f"the triton vendor does not serve the optional fusion {op}")
    dtype = torch.bfloat16
    g = gen(5)
    tokens, hq, hk, d, bs, nb = 33, 8, 2, 128, 16, 8
    qkv = randn(g, tokens, (hq + 2 * hk) * d, dtype=dtype)
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
    v = qkv[:, (hq + hk) * d:].view(tokens, hk, d)
    cos, sin = _rope(g, tokens, d, dtype)
    k_cache, v_cache = randn(g, nb, bs, hk, d, dtype=dtype), randn(g, nb, bs, hk, d, dtype=dtype)
    slots = _slots(g, tokens, nb, bs, pad=0)
    graph, _ = capture(lambda: ops.apply_rotary_pos_emb_fill_kv_cache(q, k, v, k_cache, v_cache, cos, sin, slots))
    for i in range(REPLAYS):
        qkv.copy_(randn(g, *qkv.shape, dtype=dtype))
        slots.copy_(_slots(g, tokens, nb, bs, pad=2 * i))
        ref_q, ref_k = q.float().clone(), k.float().clone()
        ref_rotary.apply_rotary_pos_emb(ref_q, ref_k, cos.float(), sin.float())
        want_v = v_cache.clone()
        want_k = k_cache.clone()
        ref_kv.fill_kv_cache(ref_k.to(dtype), v, want_k, want_v, slots, [], [], 0)
        graph.replay()
        close(q, ref_q, dtype, "fused rotary q")
        close(k, ref_k, dtype, "fused rotary k")
        close(k_cache, want_k.float(), dtype, "fused key cache")
        assert torch.equal(v_cache, want_v), f"replay {i}: value cache differs from the reference fill"


# --------------------------------------------------------------------------------------------- attention
def _table(g, batch, max_blocks, num_blocks):
    return torch.randperm(num_blocks, device=DEV, generator=g)[:batch * max_blocks].view(batch, max_blocks).to(
        torch.int32)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_other_lengths_and_tables(triton_vendor, dtype, block_size):
    require(triton_vendor, "paged_decode_attention")
    g = gen(6 + block_size)
    batch, hq, hk, d = 6, 16, 4, 128
    max_len = 700
    max_blocks = -(-max_len // block_size)
    num_blocks = batch * max_blocks + 5
    q = randn(g, batch, hq, d, dtype=dtype)
    k_cache, v_cache = randn(g, num_blocks, block_size, hk, d, dtype=dtype), randn(g, num_blocks, block_size, hk, d,
                                                                                    dtype=dtype)
    table = _table(g, batch, max_blocks, num_blocks)
    lens = torch.full((batch,), 3, device=DEV, dtype=torch.int32)      # captured with short sequences
    out = torch.empty(batch, hq, d, device=DEV, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    graph, _ = capture(lambda: ops.paged_decode_attention(q, k_cache, v_cache, table, block_size, None, lens, max_len,
                                                          hq, hk, softmax_scale=scale, attn_output=out))
    for i in range(REPLAYS):
        new_lens = torch.randint(1, max_len + 1, (batch,), device=DEV, generator=g)
        new_lens[0] = max_len
        if i % 2:
            new_lens[-1] = 0                                            # a padded batch slot
        lens.copy_(new_lens)
        table.copy_(_table(g, batch, max_blocks, num_blocks))
        q.copy_(randn(g, *q.shape, dtype=dtype))
        out.fill_(float("nan"))
        graph.replay()
        ref = torch.empty(batch, hq, d, device=DEV, dtype=torch.float32)
        ref_attn.paged_decode_attention(q, k_cache, v_cache, table, lens, max_len, scale, ref)
        close(out, ref, dtype, f"paged decode, replay {i}, lens {lens.tolist()}")


def _varlen(g, batch, total, max_len, history_max=0):
    """Random query lengths (>= 1, sum <= total, each <= max_len) and histories."""
    while True:
        q_lens = torch.randint(1, max_len + 1, (batch,), device=DEV, generator=g)
        if int(q_lens.sum()) <= total:
            break
    hist = torch.randint(0, history_max + 1, (batch,), device=DEV, generator=g) if history_max else q_lens * 0
    return q_lens, hist


@pytest.mark.parametrize("total,max_len", [(600, 250), (2400, 1000)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_other_lengths(triton_vendor, dtype, causal, total, max_len):
    """600 query rows: the pointer kernel; 2400 (at least TMA_MIN_TOKENS): on Hopper the TMA kernel."""
    require(triton_vendor, "prefill_attention")
    g = gen(7)
    batch, hq, hk, d = 3, 8, 2, 128
    q, k, v = (randn(g, total, h, d, dtype=dtype) for h in (hq, hk, hk))
    q_lens = torch.full((batch,), 5, device=DEV, dtype=torch.int32)
    kv_lens = q_lens.clone()
    out = torch.empty(total, hq, d, device=DEV, dtype=dtype)
    mask = [None] if causal else []
    graph, _ = capture(lambda: ops.prefill_attention(q, k, v, None, None, q_lens, kv_lens, max_len, hq, hk, mask,
                                                     attn_output=out))
    for i in range(REPLAYS):
        lens, _ = _varlen(g, batch, total, max_len)
        q_lens.copy_(lens)
        kv_lens.copy_(lens)
        for t in (q, k, v):
            t.copy_(randn(g, *t.shape, dtype=dtype))
        out.fill_(float("nan"))
        graph.replay()
        used = int(lens.sum())
        ref = torch.zeros(total, hq, d, device=DEV, dtype=torch.float32)
        starts = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(DEV, torch.int32)  # vendor layout: [B + 1]
        ref_attn.prefill_attention(q, k, v, starts, starts, max_len, 1.0 / math.sqrt(d), causal, ref)
        close(out[:used], ref[:used], dtype, f"prefill (causal={causal}), replay {i}, lens {lens.tolist()}")


_TMA_TILES = "tma=1,block_m=64,block_n=64,num_warps=4,num_stages=3"


@pytest.mark.parametrize("config", ["", "default-tma", _TMA_TILES, _TMA_TILES + ",splits=2,tma_split=1"],
                         ids=["default", "default_tma", "tma", "tma_split"])
@pytest.mark.parametrize("block_size", [16, 64])
def test_paged_prefill_chunked_other_lengths(triton_vendor, block_size, config, monkeypatch, request):
    """``config``: DLINFER_TRITON_PREFILL; the TMA kernels (key/value tiles by TMA from the caches, on Hopper) take
    the block-64 calls, block 16 runs the pointer kernel whatever the config. ``default-tma``: the default config
    with the TMA threshold lowered to this small call, so Hopper's default paged TMA tiles (``HOPPER_TMA_PAGED``,
    split grids on the TMA split kernel) are what the graph replays."""
    from dlinfer.vendor.triton import attention_prefill as ap

    require(triton_vendor, "paged_prefill_attention")
    if config == "default-tma":
        monkeypatch.setattr(ap, "TMA_MIN_PAIRS", 1)
        config = ""
    monkeypatch.setenv("DLINFER_TRITON_PREFILL", config)
    ap._config.cache_clear()
    request.addfinalizer(ap._config.cache_clear)  # later tests build their config again
    dtype = torch.bfloat16
    g = gen(8 + block_size)
    batch, hq, hk, d, total, max_q, max_hist = 3, 16, 4, 128, 400, 160, 300
    max_kv = max_q + max_hist
    max_blocks = -(-max_kv // block_size)
    num_blocks = batch * max_blocks + 3
    q = randn(g, total, hq, d, dtype=dtype)
    k_cache = randn(g, num_blocks, block_size, hk, d, dtype=dtype)
    v_cache = randn(g, num_blocks, block_size, hk, d, dtype=dtype)
    table = _table(g, batch, max_blocks, num_blocks)
    cu_q = torch.arange(1, batch + 1, device=DEV, dtype=torch.int32) * 4      # captured: 4 queries each
    kv_lens = torch.full((batch,), 9, device=DEV, dtype=torch.int32)
    out = torch.empty(total, hq, d, device=DEV, dtype=dtype)
    graph, _ = capture(lambda: ops.paged_prefill_attention(q, None, None, k_cache, v_cache, table, block_size, cu_q,
                                                           kv_lens, max_q, max_kv, hq, hk, [None], attn_output=out))
    for i in range(REPLAYS):
        q_lens, hist = _varlen(g, batch, total, max_q, history_max=max_hist)
        if i == 0:
            hist.zero_()                                               # plain prefill: no history
        cu_q.copy_(q_lens.cumsum(0))
        kv_lens.copy_(q_lens + hist)
        table.copy_(_table(g, batch, max_blocks, num_blocks))
        q.copy_(randn(g, *q.shape, dtype=dtype))
        out.fill_(float("nan"))
        graph.replay()
        used = int(q_lens.sum())
        ref = torch.zeros(total, hq, d, device=DEV, dtype=torch.float32)
        starts = torch.nn.functional.pad(cu_q, (1, 0))  # vendor layout: [B + 1] start offsets
        ref_attn.paged_prefill_attention(q, k_cache, v_cache, table, starts, kv_lens, max_q, max_kv,
                                         1.0 / math.sqrt(d), True, ref)
        close(out[:used], ref[:used], dtype,
              f"paged prefill, replay {i}, q lens {q_lens.tolist()}, history {hist.tolist()}")


# --------------------------------------------------------------------------------------------------- MoE
@pytest.mark.parametrize("experts,topk", [(8, 2), (128, 8)])
def test_gating_new_logits(triton_vendor, experts, topk):
    require(triton_vendor, "moe_gating_topk_softmax")
    g = gen(9 + experts)
    logits = randn(g, 77, experts, dtype=torch.float32)
    graph, (weights, ids) = capture(lambda: ops.moe_gating_topk_softmax(logits, topk, None))
    for _ in range(REPLAYS):
        logits.copy_(randn(g, *logits.shape, scale=3.0))
        graph.replay()
        ref_w, ref_ids = ref_moe.moe_gating_topk_softmax(logits, topk)
        assert torch.equal(ids.long(), ref_ids.long()), "top-k expert ids differ from the reference"
        assert rel_err(weights, ref_w) < 1e-5


@pytest.mark.parametrize("experts,topk,hidden,inter", [(8, 2, 512, 384), (64, 8, 256, 128)])
def test_fused_moe_new_routing(triton_vendor, experts, topk, hidden, inter):
    require(triton_vendor, "fused_moe")
    dtype = torch.bfloat16
    g = gen(10 + experts)
    tokens = 37
    x = randn(g, tokens, hidden, dtype=dtype)
    gate_up = randn(g, experts, 2 * inter, hidden, dtype=dtype, scale=hidden ** -0.5)
    down = randn(g, experts, hidden, inter, dtype=dtype, scale=inter ** -0.5)

    def routing():
        logits = randn(g, tokens, experts)
        w, ids = torch.topk(torch.softmax(logits, -1), topk, dim=-1)
        return w, ids

    w0, ids0 = routing()
    topk_w, topk_ids = w0.clone(), ids0.clone()
    graph, out = capture(lambda: ops.fused_moe(x, gate_up, down, topk_w, topk_ids, topk, True))
    replay_new_routing(graph, out, g, x, topk_w, topk_ids, routing, "fused_moe", scale=1.5,
                       reference=lambda: ref_moe.fused_moe(x, gate_up, down, topk_w, topk_ids, True))


@pytest.mark.parametrize("hot_stream", ["1", "0"])
def test_fused_moe_hot_experts_new_routing(triton_vendor, monkeypatch, hot_stream):
    """Enough tokens and a skewed routing for the hot experts' own GEMMs (on their own stream, or after the others
    with DLINFER_MOE_HOT_STREAM=0): the captured call replays new skewed routings like the reference."""
    from dlinfer.vendor.triton import moe as triton_moe

    require(triton_vendor, "fused_moe")
    monkeypatch.setenv("DLINFER_MOE_HOT_STREAM", hot_stream)
    launched = []
    real = triton_moe._gemm
    monkeypatch.setattr(triton_moe, "_gemm", lambda *a, **k: (
        launched.append((k["hot"], torch.cuda.current_stream().cuda_stream)), real(*a, **k))[1])
    dtype = torch.bfloat16
    g = gen(77)
    experts, topk, hidden, inter, tokens = 128, 4, 256, 192, 300
    x = randn(g, tokens, hidden, dtype=dtype)
    gate_up = randn(g, experts, 2 * inter, hidden, dtype=dtype, scale=hidden ** -0.5)
    down = randn(g, experts, hidden, inter, dtype=dtype, scale=inter ** -0.5)

    def routing():
        logits = randn(g, tokens, experts)
        logits[:, int(torch.randint(experts, (1,), generator=g, device=DEV))] += 8.0  # one hot expert
        w, ids = torch.topk(torch.softmax(logits, -1), topk, dim=-1)
        return w, ids

    w0, ids0 = routing()
    topk_w, topk_ids = w0.clone(), ids0.clone()
    graph, out = capture(lambda: ops.fused_moe(x, gate_up, down, topk_w, topk_ids, topk, True))
    hot = {stream for is_hot, stream in launched if is_hot}
    narrow = {stream for is_hot, stream in launched if not is_hot}
    assert hot, "no hot-expert GEMM was launched: the test does not reach the path it checks"
    assert hot.isdisjoint(narrow) == (hot_stream == "1"), (hot, narrow)  # on the side stream, or on the caller's
    replay_new_routing(graph, out, g, x, topk_w, topk_ids, routing, "fused_moe (hot experts)", scale=1.5,
                       reference=lambda: ref_moe.fused_moe(x, gate_up, down, topk_w, topk_ids, True))


def replay_new_routing(graph, out, g, x, topk_w, topk_ids, routing, what, reference, scale=1.0) -> None:
    """Replay a captured MoE call on new routing (once with every token on the same experts) and new inputs."""
    for i in range(REPLAYS):
        w, ids = routing()
        if i == 1:
            ids[:] = ids[0]                                            # every token on the same experts
        topk_w.copy_(w)
        topk_ids.copy_(ids)
        x.copy_(randn(g, *x.shape, dtype=x.dtype))
        graph.replay()
        close(out, reference().float(), x.dtype, f"{what}, replay {i}", scale=scale)


@pytest.mark.parametrize("experts,topk,hidden,inter,tokens", [(8, 2, 512, 384, 160), (64, 8, 256, 128, 37)])
def test_fused_moe_w8a8_new_routing(triton_vendor, experts, topk, hidden, inter, tokens):
    """W8A8 experts (int8 weights, per-channel scales in bfloat16 as LMDeploy keeps them for bf16 models). With 160
    tokens on 8 experts the replay that puts every token on the same experts runs the hot experts' wide-tile
    GEMMs, whose grids were sized at capture for any routing."""
    require(triton_vendor, "fused_moe_w8a8")
    dtype = torch.bfloat16
    g = gen(20 + experts)
    x = randn(g, tokens, hidden, dtype=dtype)

    def int8(*shape):
        return torch.randint(-127, 128, shape, device=DEV, generator=g).to(torch.int8)

    gate_up, down = int8(experts, 2 * inter, hidden), int8(experts, hidden, inter)
    gate_up_scales = (torch.rand(experts, 2 * inter, 1, device=DEV, generator=g) + 0.5) * (0.5 / 127 * hidden ** -0.5)
    down_scales = (torch.rand(experts, hidden, 1, device=DEV, generator=g) + 0.5) * (0.5 / 127 * inter ** -0.5)
    gate_up_scales, down_scales = gate_up_scales.to(dtype), down_scales.to(dtype)

    def routing():
        w, ids = torch.topk(torch.softmax(randn(g, tokens, experts), -1), topk, dim=-1)
        return w, ids

    w0, ids0 = routing()
    topk_w, topk_ids = w0.clone(), ids0.clone()
    graph, out = capture(lambda: ops.fused_moe_w8a8(x, gate_up, gate_up_scales, down, down_scales, topk_w, topk_ids,
                                                    topk, True))
    replay_new_routing(graph, out, g, x, topk_w, topk_ids, routing, "fused_moe_w8a8",
                       reference=lambda: ref_quant.fused_moe_w8a8(x, gate_up, gate_up_scales, down, down_scales,
                                                                  topk_w, topk_ids, True))


def test_linear(triton_vendor):
    require(triton_vendor, "linear")
    dtype = torch.bfloat16
    g = gen(11)
    x, w, b = randn(g, 13, 512, dtype=dtype), randn(g, 384, 512, dtype=dtype, scale=0.05), randn(g, 384, dtype=dtype)
    graph, out = capture(lambda: ops.linear(x, w, b))
    for _ in range(REPLAYS):
        x.copy_(randn(g, *x.shape, dtype=dtype))
        graph.replay()
        close(out, ref_linear.linear(x.float(), w.float(), b.float()), dtype, "linear")
