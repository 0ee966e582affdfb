"""The triton vendor's element-wise kernels against the reference vendor, under Triton's interpreter (CPU).

Outputs the kernels allocate are poisoned (``torch.empty`` filled with NaN / a huge int during the triton call)
so that an element a kernel forgets to write shows up; in-place targets are pre-filled with NaN likewise.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import dlinfer.ops as ops
import dlinfer.vendor

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = list(TOL)


@contextlib.contextmanager
def poisoned_empty():
    """Make ``torch.empty``/``empty_like`` return NaN-filled (float) or huge (int) tensors."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(torch.iinfo(t.dtype).max // 2)
        return t

    torch.empty = lambda *a, **k: poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(real_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def run(vendor: str, fn, *args, **kwargs):
    dlinfer.vendor.set_override(vendor)
    try:
        if vendor == "triton":
            with poisoned_empty():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    finally:
        dlinfer.vendor.clear_overrides()


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert not torch.isnan(actual).any(), f"{what}: NaN in output (unwritten element?)"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_exact_sum(added, ref_added, dtype):
    """The residual sum is one rounding of an exact fp32 add, so it equals the reference bit for bit, except that
    Triton 3.6's interpreter truncates fp32 -> bf16 casts instead of rounding to nearest (1 ulp; exact on GPU)."""
    if dtype == torch.bfloat16:
        assert_close(added, ref_added, dtype, "residual sum")
    else:
        assert torch.equal(added, ref_added)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_triton_vendor_provides_ops():
    vendor = dlinfer.vendor.get_vendor("triton")
    for op in ("silu_and_mul", "rms_norm", "add_rms_norm", "apply_rotary_pos_emb", "fill_kv_cache", "linear"):
        assert op in vendor.ops, op


# ---------------------------------------------------------------- silu_and_mul

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (5, 2 * 37), (3, 4, 2 * 300), (2 * 1100,)])
def test_silu_and_mul(dtype, shape):
    x = torch.randn(shape, dtype=dtype) * 3
    out = run("triton", ops.silu_and_mul, x)
    assert out.is_contiguous()
    assert_close(out, run("reference", ops.silu_and_mul, x), dtype, f"silu {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_non_contiguous(dtype):
    # Rows of a wider buffer (row stride != 2d), a 3-d view with a gap between leading dims, and dim=0.
    buf = torch.randn(7, 100, dtype=dtype)
    x = buf[:, 10:10 + 2 * 29]
    assert_close(run("triton", ops.silu_and_mul, x), run("reference", ops.silu_and_mul, x), dtype, "row stride")
    x3 = torch.randn(3, 5, 2 * 19 + 6, dtype=dtype)[:, ::2, : 2 * 19]
    assert_close(run("triton", ops.silu_and_mul, x3), run("reference", ops.silu_and_mul, x3), dtype, "3-d view")
    xt = torch.randn(2 * 6, 9, dtype=dtype)
    assert_close(run("triton", ops.silu_and_mul, xt, dim=0), run("reference", ops.silu_and_mul, xt, dim=0), dtype,
                 "dim=0")


# ---------------------------------------------------------------- rms norms

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 131), (2, 3, 96), (40, 16)])
def test_rms_norm(dtype, shape):
    x = torch.randn(shape, dtype=dtype) * 2
    w = torch.randn(shape[-1], dtype=dtype)
    out = run("triton", ops.rms_norm, x, w, 1e-5)
    assert out.is_contiguous()
    assert_close(out, run("reference", ops.rms_norm, x, w, 1e-5), dtype, f"rms_norm {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (9, 200), (2, 5, 48)])
def test_add_rms_norm(dtype, shape):
    x = torch.randn(shape, dtype=dtype)
    r = torch.randn(shape, dtype=dtype) * 4
    w = torch.randn(shape[-1], dtype=dtype)
    normed, added = run("triton", ops.add_rms_norm, x, r, w, 1e-6)
    ref_normed, ref_added = run("reference", ops.add_rms_norm, x, r, w, 1e-6)
    assert_exact_sum(added, ref_added, dtype)
    assert_close(normed, ref_normed, dtype, f"add_rms_norm {shape}")


def test_rms_norm_strided_rows_and_fp32_weight():
    buf = torch.randn(6, 90, dtype=torch.bfloat16)
    x = buf[:, 3:3 + 77]
    w = torch.randn(77, dtype=torch.float32)
    assert_close(run("triton", ops.rms_norm, x, w, 1e-6), run("reference", ops.rms_norm, x, w, 1e-6),
                 torch.bfloat16, "strided rows")
    r = torch.randn(6, 77, dtype=torch.bfloat16)
    got = run("triton", ops.add_rms_norm, x, r, w, 1e-6)
    want = run("reference", ops.add_rms_norm, x, r, w, 1e-6)
    assert_close(got[0], want[0], torch.bfloat16, "strided add_rms_norm")
    assert_exact_sum(got[1], want[1], torch.bfloat16)


# ---------------------------------------------------------------- rotary

def _fused_qkv(tokens, hq, hk, d, dtype, pad=5):
    """q, k, v as strided views of one fused-projection buffer with padded rows."""
    width = (hq + 2 * hk) * d
    buf = torch.randn(tokens, width + pad, dtype=dtype)
    qkv = buf[:, :width].view(tokens, hq + 2 * hk, d)
    return buf, qkv[:, :hq], qkv[:, hq:hq + hk], qkv[:, hq + hk:]


def _cos_sin(tokens, d, dtype):
    pos = torch.randint(0, 4096, (tokens,)).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hk,d", [(1, 4, 4, 16), (5, 8, 2, 64), (3, 6, 1, 80), (4, 40, 5, 32)])
def test_rotary_on_fused_qkv_views(dtype, tokens, hq, hk, d):
    buf, q, k, _ = _fused_qkv(tokens, hq, hk, d, dtype)
    cos, sin = _cos_sin(tokens, d, dtype)
    ref_buf = buf.clone()
    width = (hq + 2 * hk) * d
    ref_qkv = ref_buf[:, :width].view(tokens, hq + 2 * hk, d)
    ref_q, ref_k = ref_qkv[:, :hq], ref_qkv[:, hq:hq + hk]
    out_q, out_k = run("triton", ops.apply_rotary_pos_emb, q, k, cos, sin)
    assert out_q is q and out_k is k
    run("reference", ops.apply_rotary_pos_emb, ref_q, ref_k, cos, sin)
    assert_close(q, ref_q, dtype, "rotary q")
    assert_close(k, ref_k, dtype, "rotary k")
    # Nothing outside q and k moved: v and the row padding are bit-identical.
    assert torch.equal(buf[:, (hq + hk) * d:], ref_buf[:, (hq + hk) * d:])


def test_rotary_fp32_tables_with_bf16_activations():
    tokens, hq, hk, d = 3, 4, 2, 32
    q = torch.randn(tokens, hq, d, dtype=torch.bfloat16)
    k = torch.randn(tokens, hk, d, dtype=torch.bfloat16)
    cos, sin = _cos_sin(tokens, d, torch.float32)
    rq, rk = q.clone(), k.clone()
    run("triton", ops.apply_rotary_pos_emb, q, k, cos[None], sin[None])
    run("reference", ops.apply_rotary_pos_emb, rq, rk, cos, sin)
    assert_close(q, rq, torch.bfloat16, "q")
    assert_close(k, rk, torch.bfloat16, "k")


# ---------------------------------------------------------------- fill_kv_cache

def _caches(num_blocks, block_size, hk, d, dv, dtype, packed):
    if packed:  # vLLM: kv[NB, Hk, BS, D + Dv], K and V strided views of it
        kv = torch.full((num_blocks, hk, block_size, d + dv), float("nan"), dtype=dtype)
        return kv.transpose(1, 2)[..., :d], kv.transpose(1, 2)[..., d:]
    return (torch.full((num_blocks, block_size, hk, d), float("nan"), dtype=dtype),
            torch.full((num_blocks, block_size, hk, dv), float("nan"), dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("tokens,hk,d,dv,block_size", [(6, 2, 16, 16, 16), (5, 3, 64, 32, 4), (1, 8, 24, 40, 64)])
def test_fill_kv_cache(dtype, index_dtype, packed, tokens, hk, d, dv, block_size):
    num_blocks = 3
    key = torch.randn(tokens, hk, d, dtype=dtype)
    value = torch.randn(tokens, hk, dv, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    if tokens > 2:
        slots[1] = -1  # padding tokens
        slots[-1] = -1
    slots = slots.to(index_dtype)
    k_cache, v_cache = _caches(num_blocks, block_size, hk, d, dv, dtype, packed)
    rk_cache, rv_cache = _caches(num_blocks, block_size, hk, d, dv, dtype, packed)
    assert k_cache.is_contiguous() != packed
    got = run("triton", ops.fill_kv_cache, key, value, k_cache, v_cache, slots)
    assert got[0] is k_cache and got[1] is v_cache
    run("reference", ops.fill_kv_cache, key, value, rk_cache, rv_cache, slots)
    # A copy: bit-exact, and every untouched slot still NaN.
    assert torch.equal(k_cache.nan_to_num(7.0), rk_cache.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), rv_cache.nan_to_num(7.0))
    written = int((slots >= 0).sum())
    assert int((~k_cache.isnan()).sum()) == written * hk * d
    assert int((~v_cache.isnan()).sum()) == written * hk * dv


def test_fill_kv_cache_strided_key_value():
    # key and value as views of a fused qkv projection.
    dtype = torch.float16
    _, _, key, value = _fused_qkv(4, 2, 2, 32, dtype)
    k_cache, v_cache = _caches(2, 16, 2, 32, 32, dtype, packed=True)
    rk_cache, rv_cache = _caches(2, 16, 2, 32, 32, dtype, packed=True)
    slots = torch.tensor([31, 0, -1, 17])
    run("triton", ops.fill_kv_cache, key, value, k_cache, v_cache, slots)
    run("reference", ops.fill_kv_cache, key, value, rk_cache, rv_cache, slots)
    assert torch.equal(k_cache.nan_to_num(7.0), rk_cache.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), rv_cache.nan_to_num(7.0))


# ---------------------------------------------------------------- rotary + fill_kv_cache, fused

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("tokens,hq,hk,d,dv,block_size", [(5, 8, 2, 32, 32, 16), (3, 3, 3, 16, 24, 4)])
def test_rotary_fill_kv_cache(dtype, packed, tokens, hq, hk, d, dv, block_size):
    num_blocks = 3
    q = torch.randn(tokens, hq, d, dtype=dtype)
    k = torch.randn(tokens, hk, d, dtype=dtype)
    v = torch.randn(tokens, hk, dv, dtype=dtype)
    cos, sin = _cos_sin(tokens, d, dtype)
    slots = torch.randperm(num_blocks * block_size)[:tokens].to(torch.int32)
    slots[1] = -1
    k_cache, v_cache = _caches(num_blocks, block_size, hk, d, dv, dtype, packed)
    rk_cache, rv_cache = _caches(num_blocks, block_size, hk, d, dv, dtype, packed)
    rq, rk = q.clone(), k.clone()
    run("triton", ops.apply_rotary_pos_emb_fill_kv_cache, q, k, v, k_cache, v_cache, cos, sin, slots)
    run("reference", ops.apply_rotary_pos_emb, rq, rk, cos, sin)
    run("reference", ops.fill_kv_cache, rk, v, rk_cache, rv_cache, slots)
    assert_close(q, rq, dtype, "q")
    assert_close(k, rk, dtype, "k")
    # The cache holds exactly the in-place rotated k (same rounding), and v bit-exact.
    written = slots >= 0
    blocks, offsets = slots[written].long() // block_size, slots[written].long() % block_size
    assert torch.equal(k_cache[blocks, offsets], k[written])
    assert torch.equal(v_cache[blocks, offsets], v[written])
    assert int((~k_cache.isnan()).sum()) == int(written.sum()) * hk * d
    assert int((~v_cache.isnan()).sum()) == int(written.sum()) * hk * dv
    assert_close(k_cache.nan_to_num(7.0), rk_cache.nan_to_num(7.0), dtype, "k cache")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rotary_fill_kv_cache_op_on_fused_qkv(dtype):
    """Through ``dlinfer.ops``: q/k/v strided views of one fused projection, a packed cache, int64 slots."""
    tokens, hq, hk, d, block_size = 4, 4, 2, 32, 16
    buf, q, k, v = _fused_qkv(tokens, hq, hk, d, dtype)
    ref_buf = buf.clone()
    width = (hq + 2 * hk) * d
    ref_qkv = ref_buf[:, :width].view(tokens, hq + 2 * hk, d)
    rq, rk, rv = ref_qkv[:, :hq], ref_qkv[:, hq:hq + hk], ref_qkv[:, hq + hk:]
    cos, sin = _cos_sin(tokens, d, dtype)
    slots = torch.tensor([5, -1, 40, 17])
    k_cache, v_cache = _caches(3, block_size, hk, d, d, dtype, packed=True)
    rk_cache, rv_cache = _caches(3, block_size, hk, d, d, dtype, packed=True)
    assert "apply_rotary_pos_emb_fill_kv_cache" in dlinfer.vendor.get_vendor("triton").ops
    got = run("triton", ops.apply_rotary_pos_emb_fill_kv_cache, q, k, v, k_cache, v_cache, cos, sin, slots)
    assert got[0] is q and got[1] is k
    run("reference", ops.apply_rotary_pos_emb_fill_kv_cache, rq, rk, rv, rk_cache, rv_cache, cos, sin, slots)
    assert_close(buf, ref_buf, dtype, "fused qkv buffer")
    assert_close(k_cache.nan_to_num(7.0), rk_cache.nan_to_num(7.0), dtype, "k cache")
    assert torch.equal(v_cache.nan_to_num(7.0), rv_cache.nan_to_num(7.0))
    assert int((~k_cache.isnan()).sum()) == 3 * hk * d


def test_rotary_fill_kv_cache_rejects_bad_shapes():
    q = torch.randn(2, 2, 16)
    k = torch.randn(2, 1, 16)
    v = torch.randn(2, 1, 16)
    k_cache, v_cache = _caches(1, 16, 1, 16, 16, torch.float32, packed=False)
    cos, sin = _cos_sin(2, 16, torch.float32)
    with pytest.raises(ValueError, match="kv_start_indices"):
        run("triton", ops.apply_rotary_pos_emb_fill_kv_cache, q, k, v, k_cache, v_cache, cos, sin,
            torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="key_cache"):
        run("triton", ops.apply_rotary_pos_emb_fill_kv_cache, q, k, v, k_cache[..., :8], v_cache, cos, sin,
            torch.tensor([0, 1]))
