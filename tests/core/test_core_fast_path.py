"""The eager call path: plain tensors in eager mode reach the vendor without the custom op and without the
named argument checks (one combined check instead), the vendor choice is cached per op and follows every registry
change, and CPU tensors can be made to take the accelerator path (the benchmarks' model of a GPU call)."""

from __future__ import annotations

import collections
import importlib

import pytest
import torch

import dlinfer.ops as ops
from dlinfer.errors import VendorContractError
from dlinfer.ops import _checks
from dlinfer.vendor import Vendor

# the modules (dlinfer.ops re-exports functions of the same names)
activation, attention, fused, kv_cache, linear, moe, norm, quant, rotary = (
    importlib.import_module(f"dlinfer.ops.{name}")
    for name in ("activation", "attention", "fused", "kv_cache", "linear", "moe", "norm", "quant", "rotary"))
# the clean contract, as vLLM's backend calls it (held here: the LMDeploy wrappers' slow path calls them, and the
# fixture below forbids that path)
_varlen_attention, _paged_prefill, _paged_decode = (attention.varlen_attention, attention.paged_prefill,
                                                    attention.paged_decode)

BF16 = torch.bfloat16


def _fast_calls():
    """op -> a valid call of the public op with plain CPU tensors (the shapes of a decode step, made small)."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=BF16)  # noqa: E731
    x, r, w = rnd(2, 64), rnd(2, 64), torch.nn.Parameter(torch.ones(64, dtype=BF16), requires_grad=False)
    qkv = rnd(3, (4 + 2 + 2) * 16)
    q, k = qkv[:, :64].view(3, 4, 16), qkv[:, 64:96].view(3, 2, 16)
    cos, sin = rnd(3, 16), rnd(3, 16)
    logits, xm = rnd(3, 8), rnd(3, 64)
    tw, ti = torch.topk(torch.softmax(logits.float(), -1), 2, dim=-1)
    gate_up, down, lw = rnd(8, 32, 64), rnd(8, 64, 16), rnd(32, 64)
    v = qkv[:, 96:].view(3, 2, 16)
    k_cache, v_cache = rnd(4, 8, 2, 16), rnd(4, 8, 2, 16)
    packed = rnd(4, 8, 2, 32)  # a strided (packed) K/V cache, as vLLM lays it out
    slots = torch.tensor([3, 17, -1], dtype=torch.int32)
    table = torch.tensor([[0, 1], [2, 3], [1, 0]], dtype=torch.int32)
    kv_lens = torch.tensor([9, 16, 0], dtype=torch.int32)
    q_lens = torch.tensor([2, 1], dtype=torch.int32)
    out = torch.empty(3, 4, 16, dtype=BF16)
    starts = torch.tensor([0, 2, 3], dtype=torch.int32)  # the contract's [B + 1] offsets
    a8 = torch.randint(-127, 128, (2, 64), dtype=torch.int8, generator=g)
    b8 = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g)
    a_scale, b_scale = torch.rand(2, 1, generator=g) + 0.1, torch.rand(32, generator=g) + 0.1
    return {
        "rms_norm": lambda: ops.rms_norm(x, w, 1e-6),
        "add_rms_norm": lambda: ops.add_rms_norm(x, r, w, 1e-6),
        "silu_and_mul": lambda: ops.silu_and_mul(x),
        "apply_rotary_pos_emb": lambda: ops.apply_rotary_pos_emb(q, k, cos, sin),
        "moe_gating_topk_softmax": lambda: ops.moe_gating_topk_softmax(logits, 2, None),
        "fused_moe": lambda: ops.fused_moe(xm, gate_up, down, tw, ti, 2, True),
        "linear": lambda: ops.linear(x, lw),
        "linear_bias": lambda: ops.linear(x, lw, torch.nn.Parameter(rnd(32), requires_grad=False)),
        "fill_kv_cache": lambda: ops.fill_kv_cache(k, v, k_cache, v_cache, slots),
        "fill_kv_cache_packed": lambda: ops.fill_kv_cache(k, v, packed[..., :16], packed[..., 16:], slots.long()),
        "apply_rotary_pos_emb_fill_kv_cache": lambda: ops.apply_rotary_pos_emb_fill_kv_cache(
            q, k, v, k_cache, v_cache, cos, sin, slots),
        "paged_decode_attention": lambda: ops.paged_decode_attention(
            q.contiguous(), k_cache, v_cache, table, 8, None, kv_lens, 16, 4, 2),
        "paged_decode_attention_out": lambda: ops.paged_decode_attention(
            q, packed[..., :16], packed[..., 16:], table, 8, None, kv_lens.long(), 16, 4, 2, head_size_v=16,
            softmax_scale=0.3, attn_output=out, quant_bits=None),
        "prefill_attention": lambda: ops.prefill_attention(q, k, v, None, None, q_lens, q_lens, 2, 4, 2, [None]),
        "prefill_attention_non_causal": lambda: ops.prefill_attention(
            q, k, v, None, None, q_lens, q_lens.long(), 2, 4, 2, [], softmax_scale=0.25, attn_output=out),
        "paged_prefill_attention": lambda: ops.paged_prefill_attention(
            q, None, None, k_cache, v_cache, table[:2], 8, torch.cumsum(q_lens, 0, dtype=torch.int32),
            kv_lens[:2], 2, 16, 4, 2, [None], attn_output=out),
        # the clean contract (vLLM's backend calls it)
        "varlen_attention": lambda: _varlen_attention(q, k, v, starts, starts, 2, attn_output=out),
        "paged_prefill": lambda: _paged_prefill(q, k_cache, v_cache, table[:2], starts, kv_lens[:2], 2, 16,
                                                causal=False),
        "paged_decode": lambda: _paged_decode(q, packed[..., :16], packed[..., 16:], table, kv_lens, 16,
                                              softmax_scale=0.5, attn_output=out),
        # W8A8
        "dynamic_quant": lambda: ops.dynamic_quant(x),
        "linear_w8a8": lambda: ops.linear_w8a8(a8, b8, a_scale, b_scale, BF16, bias=rnd(32)),
        "rms_norm_w8a8": lambda: ops.rms_norm_w8a8(x, w, 1e-6),
        "add_rms_norm_w8a8": lambda: ops.add_rms_norm_w8a8(x, r, w, 1e-6),
    }


#: op -> (module, the custom op's attribute, the slow path's check functions in that module)
_SLOW = {
    "rms_norm": (norm, "_rms_norm", ("_check",)),
    "add_rms_norm": (norm, "_add_rms_norm", ("_check",)),
    "silu_and_mul": (activation, "_silu_and_mul", ()),
    "apply_rotary_pos_emb": (rotary, "_apply_rotary_pos_emb", ("rotary_checks",)),
    "moe_gating_topk_softmax": (moe, "_moe_gating_topk_softmax", ()),
    "fused_moe": (moe, "_fused_moe", ("check_experts",)),
    "linear": (linear, "_linear", ()),
    "linear_bias": (linear, "_linear", ()),
    "fill_kv_cache": (kv_cache, "_fill_kv_cache", ("fill_kv_cache_checks", "check_cache")),
    "fill_kv_cache_packed": (kv_cache, "_fill_kv_cache", ("fill_kv_cache_checks", "check_cache")),
    "apply_rotary_pos_emb_fill_kv_cache": (fused, "_rotary_fill", ("rotary_checks", "fill_kv_cache_checks")),
    "paged_decode_attention": (attention, "_paged_decode_attention", ("_lmdeploy_paged", "paged_decode")),
    "paged_decode_attention_out": (attention, "_paged_decode_attention", ("_lmdeploy_paged", "paged_decode")),
    "prefill_attention": (attention, "_prefill_attention", ("_queries", "varlen_attention")),
    "prefill_attention_non_causal": (attention, "_prefill_attention", ("_queries", "varlen_attention")),
    "paged_prefill_attention": (attention, "_paged_prefill_attention", ("_lmdeploy_paged", "paged_prefill")),
    "varlen_attention": (attention, "_prefill_attention", ("_queries", "_heads_of", "_offsets")),
    "paged_prefill": (attention, "_paged_prefill_attention", ("_paged_common", "_offsets", "_block_table")),
    "paged_decode": (attention, "_paged_decode_attention", ("_paged_common", "_offsets", "_block_table")),
    "dynamic_quant": (quant, "_dynamic_quant", ("_quant_dtype",)),
    "linear_w8a8": (quant, "_linear_w8a8", ("_quant_dtype", "_out_dtype", "_vector")),
    "rms_norm_w8a8": (quant, "_rms_norm_w8a8", ("_quant_dtype", "_norm_check")),
    "add_rms_norm_w8a8": (quant, "_add_rms_norm_w8a8", ("_quant_dtype", "_norm_check")),
}


@pytest.fixture
def slow_path_forbidden(monkeypatch):
    """The custom ops, the named argument checks and the generic ``run`` all raise: only the fast path works."""
    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"the eager fast path was not taken: {what} was called")
        return fail

    for op, (module, custom_op, checks) in _SLOW.items():
        monkeypatch.setattr(module, custom_op, forbidden(f"the custom op {custom_op}"))
        monkeypatch.setattr(module, "run", forbidden("_dispatch.run"))
        for check in checks:
            monkeypatch.setattr(module, check, forbidden(f"{module.__name__}.{check}"))
    for name in ("tensor", "integer", "number", "same_device", "same_dtype", "dim_is", "distinct"):
        monkeypatch.setattr(_checks, name, forbidden(f"_checks.{name}"))


@pytest.mark.parametrize("op", sorted(_SLOW))
def test_plain_eager_calls_take_the_fast_path(op, slow_path_forbidden):
    _fast_calls()[op]()


@pytest.mark.parametrize("op", sorted(_SLOW))
def test_the_fast_path_gives_the_checked_path_result(op, monkeypatch):
    """Same output through the fast path and through the custom op with the named checks (tracing mode)."""
    fast = _fast_calls()[op]()
    fast = tuple(t.clone() for t in fast) if isinstance(fast, tuple) else fast.clone()  # in-place ops return inputs
    monkeypatch.setattr("dlinfer.ops._dispatch._dispatch_modes", lambda: 1)  # as if a dispatch mode were active
    slow = _fast_calls()[op]()
    torch.testing.assert_close(fast, slow)


def test_bad_arguments_still_get_the_named_error():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"weight.shape\[0\] must equal hidden_states.shape\[-1\]"):
        ops.rms_norm(x, torch.ones(63))
    with pytest.raises(ValueError, match="epsilon must be finite"):
        ops.rms_norm(x, torch.ones(64), float("nan"))
    with pytest.raises(ValueError, match="residual must have hidden_states' shape"):
        ops.add_rms_norm(x, torch.randn(1, 64), torch.ones(64))
    with pytest.raises(ValueError, match="query and key are the same memory"):
        q = torch.randn(3, 2, 16)
        ops.apply_rotary_pos_emb(q, q, torch.randn(3, 16), torch.randn(3, 16))
    with pytest.raises(ValueError, match=r"weight.shape\[1\] must equal x.shape\[-1\]"):
        ops.linear(x, torch.randn(8, 32))
    with pytest.raises(ValueError, match="topk"):
        ops.moe_gating_topk_softmax(torch.randn(3, 4), 5)
    cache = torch.zeros(4, 8, 2, 16)
    k = torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match="key_cache and value_cache are the same memory"):
        ops.fill_kv_cache(k, k, cache, cache, torch.tensor([0, 1, 2]))
    table, lens = torch.zeros(3, 2, dtype=torch.int32), torch.full((3,), 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_size"):
        ops.paged_decode_attention(torch.randn(3, 4, 16), cache, cache, table, 16, None, lens, 16, 4, 2)
    with pytest.raises(ValueError, match="softmax_scale"):
        ops.paged_decode_attention(torch.randn(3, 4, 16), cache, cache, table, 8, None, lens, 16, 4, 2,
                                   softmax_scale=-1.0)
    with pytest.raises(TypeError, match="attn_mask"):
        ops.prefill_attention(k, k, k, None, None, lens, lens, 1, 2, 2, None)
    q = torch.randn(3, 4, 16)
    with pytest.raises(ValueError, match=r"kv_seqlens must have dtype in \(int32\)"):  # the contract: int32 only
        _paged_decode(q, cache, cache, table, lens.long(), 16)
    with pytest.raises(ValueError, match="cu_seqlens_q must hold B \\+ 1 start offsets"):
        _varlen_attention(k, k, k, lens[:0], lens[:0], 1)


# ------------------------------------------------------------------------------------ cache invalidation
def _counting_vendor(name, counts, priority=-5, default=(), wrong_shape=False):
    def silu(x):
        counts[name] += 1
        d = x.shape[-1] // 2
        out = torch.nn.functional.silu(x[..., :d]) * x[..., d:]
        return out[..., :-1] if wrong_shape else out

    return Vendor(name=name, priority=priority, devices=frozenset({"cpu"}), default_devices=frozenset(default),
                  ops={"silu_and_mul": silu})


def test_every_registry_change_reaches_the_next_call(isolated_registry):
    counts = collections.Counter()
    x = torch.randn(2, 8)
    isolated_registry.register_vendor(_counting_vendor("aaa", counts))
    isolated_registry.register_vendor(_counting_vendor("bbb", counts))

    def served():
        before = dict(counts)
        ops.silu_and_mul(x)
        changed = [n for n in counts if counts[n] != before.get(n, 0)]
        return changed[0] if changed else "reference"

    assert served() == "reference"
    isolated_registry.set_override("aaa", op="silu_and_mul")
    assert served() == "aaa"
    with isolated_registry.forced("bbb", "silu_and_mul"):
        assert served() == "bbb"
    assert served() == "aaa"
    isolated_registry.set_override(None, op="silu_and_mul")
    assert served() == "reference"
    isolated_registry.register_vendor(_counting_vendor("ccc", counts, priority=10**6, default=("cpu",)))
    assert served() == "ccc"
    with isolated_registry.pinned("reference"):
        assert served() == "reference"
    assert served() == "ccc"
    isolated_registry.unregister_vendor("ccc")
    assert served() == "reference"


def test_env_override_is_read_again_after_clear_selection_cache(isolated_registry, monkeypatch):
    counts = collections.Counter()
    isolated_registry.register_vendor(_counting_vendor("aaa", counts))
    ops.silu_and_mul(torch.randn(2, 8))
    monkeypatch.setenv("DLINFER_VENDOR_SILU_AND_MUL", "aaa")
    isolated_registry.clear_selection_cache()
    ops.silu_and_mul(torch.randn(2, 8))
    assert counts["aaa"] == 1


def test_the_accelerator_path_skips_the_result_check_unless_dlinfer_check(isolated_registry, monkeypatch):
    """On host tensors the vendor result is always checked; on the accelerator path (modelled on the CPU) only with
    DLINFER_CHECK=1, read at every call."""
    counts = collections.Counter()
    isolated_registry.register_vendor(_counting_vendor("wrong", counts, wrong_shape=True))
    isolated_registry.set_override("wrong", op="silu_and_mul")
    x = torch.randn(2, 8)
    monkeypatch.delenv("DLINFER_CHECK", raising=False)
    with pytest.raises(VendorContractError, match="vendor 'wrong', op silu_and_mul"):
        ops.silu_and_mul(x)
    saved = _checks.HOST_DEVICE_TYPES
    _checks.set_host_device_types(frozenset())
    try:
        assert ops.silu_and_mul(x).shape == (2, 3)  # unchecked, as on a GPU
        assert not _checks.values_checked(x)
        monkeypatch.setenv("DLINFER_CHECK", "1")
        with pytest.raises(VendorContractError):
            ops.silu_and_mul(x)
        assert _checks.values_checked(x)
        monkeypatch.setenv("DLINFER_CHECK", "0")
        assert ops.silu_and_mul(x).shape == (2, 3)
    finally:
        _checks.set_host_device_types(saved)
    with pytest.raises(VendorContractError):
        ops.silu_and_mul(x)
    with pytest.raises(ValueError, match="host device types"):
        _checks.set_host_device_types(frozenset({"cuda"}))
