"""Property-based tests (hypothesis) of the ops on the reference vendor against the float64 oracle: random
shapes, lengths (0 included), GQA groups, block sizes and layouts, NaN/Inf planted in inputs and in cache slots
no sequence owns, and malformed metadata. What must hold for every draw: no crash but a ValueError/TypeError
naming the argument, a refused call leaves its buffers untouched, NaN in gives NaN out exactly where the oracle
puts it, rows of zero-length sequences are zero, finite answers match the oracle, cache writes touch only their
slots.

Bounded for CI: a fixed example budget per test (derandomized, so every run draws the same examples; no example
database is written)."""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import dlinfer.ops as ops  # noqa: E402
from dlinfer.testing import oracle  # noqa: E402
from dlinfer.testing.conformance.inputs import Rand, paged  # noqa: E402
from dlinfer.vendor import registry  # noqa: E402

BOUNDED = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CAUSAL = [torch.ones(1, dtype=torch.bool)]
OK_ERRORS = (ValueError, TypeError)


@pytest.fixture(autouse=True)
def _reference_only(isolated_registry):
    with registry.forced("reference"):
        yield


def _nan_rows(out: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(ix) for ix in torch.nonzero(out.isnan().any(-1)).tolist()}


def _assert_matches_oracle(out: torch.Tensor, ref: torch.Tensor) -> None:
    """NaN rows and infinities exactly where the oracle has them; finite values close."""
    assert _nan_rows(out) == _nan_rows(ref.to(out.dtype))
    assert torch.equal(torch.isinf(out) & ~out.isnan().any(-1, keepdim=True),
                       torch.isinf(ref) & ~ref.isnan().any(-1, keepdim=True))
    finite = torch.isfinite(ref) & ~ref.isnan().any(-1, keepdim=True)
    torch.testing.assert_close(out.double()[finite], ref[finite], atol=1e-4, rtol=1e-4)


@st.composite
def paged_batches(draw, max_batch=4, max_len=40):
    """A paged batch (the conformance kit's builder): heads (GQA), head sizes, block size, per-sequence lengths
    (0 allowed), shuffled blocks, cache layouts (strided views included), garbage table entries past each
    sequence's blocks, NaN in every cache slot no sequence owns."""
    hk = draw(st.sampled_from([1, 2]))
    hq = hk * draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from([8, 16]))
    dv = draw(st.sampled_from([d, 8]))
    block = draw(st.sampled_from([1, 4, 16]))
    lens = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_batch))
    rnd = Rand(draw(st.integers(0, 2 ** 16)), torch.device("cpu"))
    kc, vc, _, table = paged(rnd, lens, block, hk, d, dv, torch.float32,
                             draw(st.sampled_from(["separate", "packed", "head_major"])),
                             index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
                             tail=draw(st.sampled_from(["random", "garbage"])))
    g = rnd.gen
    return dict(hq=hq, hk=hk, d=d, dv=dv, block=block, lens=lens, kc=kc, vc=vc, table=table, gen=g)


def _poison(draw, x, q):
    """Maybe plant NaN/Inf in the query and in slots sequences own (where the rule decides the answer); returns
    the (token, head) planted in the query, or None."""
    planted = None
    if draw(st.booleans()):
        t, h, i = (draw(st.integers(0, n - 1)) for n in q.shape)
        q[t, h, i] = draw(st.sampled_from([float("nan"), float("inf")]))
        planted = (t, h)
    live = [b for b, n in enumerate(x["lens"]) if n]
    if live and draw(st.booleans()):
        b = draw(st.sampled_from(live))
        pos = 0  # the first token: every query of the sequence sees it, causal or not
        blk, slot = int(x["table"][b, pos // x["block"]]), pos % x["block"]
        cache = x[draw(st.sampled_from(["kc", "vc"]))]
        cache[blk, slot, draw(st.integers(0, x["hk"] - 1)), 0] = draw(st.sampled_from([float("nan"), float("inf")]))
    return planted


@BOUNDED
@given(data=st.data())
def test_paged_decode_matches_the_oracle(data):
    x = data.draw(paged_batches())
    q = torch.randn(len(x["lens"]), x["hq"], x["d"], generator=x["gen"])
    planted = _poison(data.draw, x, q)
    lens = torch.tensor(x["lens"], dtype=torch.int32)
    cu = torch.arange(1, len(x["lens"]) + 1, dtype=torch.int32)
    out = ops.paged_decode_attention(q, x["kc"], x["vc"], x["table"], x["block"], cu, lens, max(x["lens"]),
                                     x["hq"], x["hk"])
    ref = torch.empty(out.shape, dtype=torch.float64)
    scale = 1 / math.sqrt(x["d"])
    oracle.paged_decode_attention(q.double(), x["kc"].double(), x["vc"].double(), x["table"], lens, 0, scale, ref)
    _assert_matches_oracle(out, ref)
    if planted and x["lens"][planted[0]]:
        assert planted in _nan_rows(out)  # NaN in, NaN out (not merely "as the oracle says")
    for b, n in enumerate(x["lens"]):
        if n == 0:
            assert bool((out[b] == 0).all())  # zero by its length, whatever its query holds


@BOUNDED
@given(data=st.data())
def test_paged_prefill_matches_the_oracle(data):
    x = data.draw(paged_batches())
    q_lens = [data.draw(st.integers(0, n)) for n in x["lens"]]
    pad = data.draw(st.integers(0, 2))
    q = torch.randn(sum(q_lens) + pad, x["hq"], x["d"], generator=x["gen"])
    planted = _poison(data.draw, x, q[: sum(q_lens)]) if sum(q_lens) else None
    causal = data.draw(st.booleans())
    ends = torch.tensor(q_lens).cumsum(0).to(torch.int32)
    lens = torch.tensor(x["lens"], dtype=torch.int32)
    out = ops.paged_prefill_attention(q, None, None, x["kc"], x["vc"], x["table"], x["block"], ends, lens,
                                      max(q_lens + [0]), max(x["lens"]), x["hq"], x["hk"], CAUSAL if causal else [])
    ref = torch.zeros(out.shape, dtype=torch.float64)
    starts = torch.cat([torch.zeros(1, dtype=torch.int32), ends])
    oracle.paged_prefill_attention(q.double(), x["kc"].double(), x["vc"].double(), x["table"], starts, lens, 0, 0,
                                   1 / math.sqrt(x["d"]), causal, ref)
    _assert_matches_oracle(out, ref)
    if planted:  # its sequence has q_len <= kv_len keys, and every query sees the first
        assert planted in _nan_rows(out)
    assert bool((out[sum(q_lens):] == 0).all())  # padding rows of a new output are zeros


@BOUNDED
@given(data=st.data())
def test_prefill_matches_the_oracle(data):
    hk = data.draw(st.sampled_from([1, 2]))
    hq = hk * data.draw(st.sampled_from([1, 2, 4]))
    d = data.draw(st.sampled_from([8, 16]))
    causal = data.draw(st.booleans())
    seqs = data.draw(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), min_size=1, max_size=4))
    seqs = [(min(a, b), b) if causal else (a, b) for a, b in seqs]  # causal: q_len <= kv_len
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    tq, tk = sum(a for a, _ in seqs), sum(b for _, b in seqs)
    q, k, v = (torch.randn(n, h, d, generator=g) for n, h in ((tq, hq), (tk, hk), (tk, hk)))
    planted = None
    if tq and data.draw(st.booleans()):
        planted = (data.draw(st.integers(0, tq - 1)), 0)
        q[planted[0], 0, 0] = float("nan")
    first_keys = [sum(b for _, b in seqs[:i]) for i, (_, b) in enumerate(seqs) if b]
    if first_keys and data.draw(st.booleans()):
        (k if data.draw(st.booleans()) else v)[data.draw(st.sampled_from(first_keys)), 0, 1] = float("nan")
    scale = data.draw(st.floats(1e-3, 10.0))
    q_lens = torch.tensor([a for a, _ in seqs], dtype=torch.int32)
    kv_lens = torch.tensor([b for _, b in seqs], dtype=torch.int32)
    out = ops.prefill_attention(q, k, v, None, None, q_lens, kv_lens, int(q_lens.max()), hq, hk,
                                CAUSAL if causal else [], softmax_scale=scale)
    ref = torch.zeros(out.shape, dtype=torch.float64)
    z = torch.zeros(1, dtype=torch.int32)
    oracle.prefill_attention(q.double(), k.double(), v.double(), torch.cat([z, q_lens.cumsum(0)]),
                             torch.cat([z, kv_lens.cumsum(0)]), 0, scale, causal, ref)
    _assert_matches_oracle(out, ref)
    if planted:
        seq = int(torch.searchsorted(q_lens.cumsum(0), planted[0], right=True))
        if seqs[seq][1]:  # its sequence has keys: the row sees at least one
            assert planted in _nan_rows(out)


@BOUNDED
@given(log_scale=st.floats(-30.0, 40.0), data=st.data())
def test_any_softmax_scale_is_refused_or_gives_a_convex_combination(log_scale, data):
    """A finite scale is refused by name or computed: each output row lies within its values' range (never
    zeros from an overflow, never NaN from finite inputs)."""
    scale = 10.0 ** log_scale
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    q, k, v = torch.rand(3, 2, 16, generator=g) * 2 - 1, torch.rand(5, 2, 16, generator=g) * 2 - 1, \
        torch.rand(5, 2, 16, generator=g) * 2 - 1
    try:
        out = ops.prefill_attention(q, k, v, None, None, torch.tensor([3], dtype=torch.int32),
                                    torch.tensor([5], dtype=torch.int32), 3, 2, 2, [], softmax_scale=scale)
    except ValueError as exc:
        assert "softmax_scale" in str(exc) and scale > 1e30
        return
    assert bool(torch.isfinite(out).all())
    lo, hi = v.amin(0), v.amax(0)  # [H, Dv]
    assert bool((out >= lo - 1e-5).all()) and bool((out <= hi + 1e-5).all())


@BOUNDED
@given(data=st.data())
def test_fill_kv_cache_writes_exactly_its_slots(data):
    block = data.draw(st.sampled_from([1, 4, 16]))
    num_blocks = data.draw(st.integers(1, 6))
    slots_total = num_blocks * block
    t = data.draw(st.integers(0, min(slots_total, 20)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    slots = torch.randperm(slots_total, generator=g)[:t]
    padding = torch.tensor(data.draw(st.lists(st.booleans(), min_size=t, max_size=t)), dtype=torch.bool)
    slots[padding] = -1
    key, value = torch.randn(t, 2, 8, generator=g), torch.randn(t, 2, 4, generator=g)
    kc, vc = torch.randn(num_blocks, block, 2, 8, generator=g), torch.randn(num_blocks, block, 2, 4, generator=g)
    k_ref, v_ref = kc.clone(), vc.clone()
    oracle.fill_kv_cache(key, value, k_ref, v_ref, slots)
    ops.fill_kv_cache(key, value, kc, vc, slots.to(data.draw(st.sampled_from([torch.int32, torch.int64]))))
    assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref)  # written slots exact, every other slot untouched


@BOUNDED
@given(data=st.data())
def test_malformed_paged_metadata_is_refused_by_name_and_writes_nothing(data):
    """Lengths past the table's capacity or max_kv_seq_len, negative lengths, block ids outside the cache:
    a ValueError/TypeError naming the argument, and the given output keeps every byte."""
    x = data.draw(paged_batches(max_batch=3, max_len=20))
    lens = list(x["lens"])
    table = x["table"].clone()
    b = data.draw(st.integers(0, len(lens) - 1))
    fault = data.draw(st.sampled_from(["too_long", "negative", "block_id", "max_len"]))
    max_len = max(lens + [1])
    if fault == "too_long":
        lens[b] = table.shape[1] * x["block"] + data.draw(st.integers(1, 5))
        max_len = max(lens)
        name = "kv_seqlens"
    elif fault == "negative":
        lens[b] = -data.draw(st.integers(1, 5))
        name = "kv_seqlens"
    elif fault == "block_id":
        lens[b] = max(lens[b], 1)
        table[b, 0] = data.draw(st.sampled_from([-1, x["kc"].shape[0], 10 ** 6]))
        name = "block_offsets"
    else:
        lens[b] = max(lens[b], 1)
        max_len = lens[b] - 1
        name = "kv_seqlens"
    q = torch.randn(len(lens), x["hq"], x["d"], generator=x["gen"])
    out = torch.full((len(lens), x["hq"], x["dv"]), 7.0)
    kc_before, vc_before = x["kc"].clone(), x["vc"].clone()
    with pytest.raises(OK_ERRORS) as exc:
        ops.paged_decode_attention(q, x["kc"], x["vc"], table, x["block"], None,
                                   torch.tensor(lens, dtype=torch.int32), max_len, x["hq"], x["hk"],
                                   attn_output=out)
    assert name in str(exc.value), (fault, str(exc.value))
    assert bool((out == 7.0).all())
    assert torch.equal(x["kc"].nan_to_num(123.0), kc_before.nan_to_num(123.0))
    assert torch.equal(x["vc"].nan_to_num(123.0), vc_before.nan_to_num(123.0))


@BOUNDED
@given(data=st.data())
def test_norms_and_activation_match_the_oracle_and_keep_nan_in_its_row(data):
    tokens = data.draw(st.integers(0, 6))
    hidden = 2 * data.draw(st.integers(1, 24))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    x, res, w = torch.randn(tokens, hidden, generator=g), torch.randn(tokens, hidden, generator=g), \
        torch.randn(hidden, generator=g)
    bad_row = None
    if tokens and data.draw(st.booleans()):
        bad_row = data.draw(st.integers(0, tokens - 1))
        x[bad_row, data.draw(st.integers(0, hidden // 2 - 1))] = data.draw(st.sampled_from([float("nan"),
                                                                                           float("inf")]))
    eps = data.draw(st.sampled_from([1e-6, 1e-5]))
    outs = {"rms_norm": (ops.rms_norm(x, w, eps), oracle.rms_norm_64(x, w, eps)),
            "add_rms_norm": (ops.add_rms_norm(x, res, w, eps)[0], oracle.rms_norm_64(x.double() + res.double(), w,
                                                                                     eps)),
            "silu_and_mul": (ops.silu_and_mul(x), oracle.silu_and_mul_64(x))}
    for name, (out, ref) in outs.items():
        assert out.shape == ref.shape, name
        good = torch.ones(tokens, dtype=torch.bool)
        if bad_row is not None:
            good[bad_row] = False
            if name != "silu_and_mul":  # the norm of a row with NaN/Inf is NaN: that row, whole
                assert bool(out[bad_row].isnan().any()), name
            else:  # the poisoned gate column: NaN or Inf there too, never a number
                assert not bool(torch.isfinite(out[bad_row]).all()), name
        torch.testing.assert_close(out[good].double(), ref[good], atol=1e-4, rtol=1e-4)
