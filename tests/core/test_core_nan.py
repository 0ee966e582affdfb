"""Never a silent wrong answer from attention: NaN/Inf in, NaN out (the reference vendor and the float64 oracle);
only rows that see no key at all are zero, decided by lengths, never by values; an absurd softmax_scale is
refused; a new prefill output holds no leftover memory."""

from __future__ import annotations

import math

import pytest
import torch

import dlinfer.ops as ops
from dlinfer.testing import oracle
from dlinfer.vendor import registry

CAUSAL = [torch.ones(1, dtype=torch.bool)]


@pytest.fixture(autouse=True)
def _reference_only(isolated_registry):
    with registry.forced("reference"):
        yield


def _prefill(q, k, v, q_lens, kv_lens, causal=True, **kw):
    hq, hk = q.shape[1], k.shape[1]
    return ops.prefill_attention(q, k, v, None, None, torch.tensor(q_lens, dtype=torch.int32),
                                 torch.tensor(kv_lens, dtype=torch.int32), max(q_lens), hq, hk,
                                 CAUSAL if causal else [], **kw)


def _cache(lens, block, hk, d, seed=0):
    """Caches holding ``lens`` tokens per sequence (blocks in order), NaN in every slot past a length."""
    g = torch.Generator().manual_seed(seed)
    need = [max(1, -(-n // block)) for n in lens]
    kc = torch.randn(sum(need), block, hk, d, generator=g)
    vc = torch.randn(sum(need), block, hk, d, generator=g)
    table = torch.zeros(len(lens), max(need), dtype=torch.int32)
    first = 0
    for b, (n, m) in enumerate(zip(lens, need)):
        table[b, :m] = torch.arange(first, first + m)
        flat_k, flat_v = kc[first:first + m].flatten(0, 1), vc[first:first + m].flatten(0, 1)
        flat_k[n:], flat_v[n:] = float("nan"), float("nan")
        kc[first:first + m], vc[first:first + m] = flat_k.view(m, block, hk, d), flat_v.view(m, block, hk, d)
        first += m
    return kc, vc, table


def _decode(q, kc, vc, table, lens, **kw):
    b, hq = q.shape[0], q.shape[1]
    return ops.paged_decode_attention(q, kc, vc, table, kc.shape[1], torch.arange(1, b + 1, dtype=torch.int32),
                                      torch.tensor(lens, dtype=torch.int32), max(lens), hq, kc.shape[2], **kw)


def _paged_prefill(q, kc, vc, table, q_lens, kv_lens, **kw):
    ends = torch.tensor(q_lens).cumsum(0).to(torch.int32)
    return ops.paged_prefill_attention(q, None, None, kc, vc, table, kc.shape[1], ends,
                                       torch.tensor(kv_lens, dtype=torch.int32), max(q_lens), max(kv_lens),
                                       q.shape[1], kc.shape[2], CAUSAL, **kw)


def _nan_rows(out: torch.Tensor) -> set[tuple[int, int]]:
    """(token, head) pairs whose output holds a NaN."""
    return {tuple(ix) for ix in torch.nonzero(out.isnan().any(-1)).tolist()}


# ----------------------------------------------------------------------------------------------- prefill
def test_prefill_nan_in_query_gives_nan_in_that_row_only():
    torch.manual_seed(0)
    q, k, v = torch.randn(7, 4, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    q[5, 3, 2] = float("nan")
    out = _prefill(q, k, v, [3, 4], [3, 4])
    assert _nan_rows(out) == {(5, 3)}


def test_prefill_nan_in_a_visible_key_or_value_gives_nan():
    torch.manual_seed(1)
    q, k, v = torch.randn(6, 4, 16), torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    k[3, 1, 0] = float("nan")  # sequence 1's first key (token 3), KV head 1 = query heads 2 and 3
    out = _prefill(q, k, v, [3, 3], [3, 3])
    assert _nan_rows(out) == {(t, h) for t in (3, 4, 5) for h in (2, 3)}
    k[3, 1, 0] = 0.5
    v[0, 0, 7] = float("inf")  # sequence 0's first value: every query of it sees it
    out = _prefill(q, k, v, [3, 3], [3, 3])
    assert bool((out[:3, :2, 7] == float("inf")).all())
    out[:3, :2, 7] = 0.0
    assert bool(torch.isfinite(out).all())  # other heads, columns and sequences untouched


def test_prefill_inf_in_a_key_gives_nan_not_zero():
    torch.manual_seed(2)
    q, k, v = torch.randn(4, 2, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    k[0] = float("inf")  # every query sees key 0; softmax of an infinite score is undefined
    out = _prefill(q, k, v, [4], [4], causal=False)
    assert bool(out.isnan().any(-1).all()), out


def test_prefill_huge_but_representable_scale_is_computed():
    """A scale far past sensible (1e30) still gives softmax's limit, the value of the best key, never zeros."""
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 1, 16), torch.randn(5, 1, 16), torch.randn(5, 1, 16)
    out = _prefill(q, k, v, [1], [5], causal=False, softmax_scale=1e30)
    best = int(torch.einsum("d,kd->k", q[0, 0], k[:, 0]).argmax())
    torch.testing.assert_close(out[0, 0], v[best, 0])


@pytest.mark.parametrize("scale", [1e39, 3e38, 1e300])
def test_absurd_softmax_scale_is_rejected(scale):
    q, k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    with pytest.raises(ValueError, match="softmax_scale"):
        _prefill(q, k, v, [2], [2], softmax_scale=scale)
    kc, vc, table = _cache([3, 2], 4, 2, 16)
    with pytest.raises(ValueError, match="softmax_scale"):
        _decode(torch.randn(2, 2, 16), kc, vc, table, [3, 2], softmax_scale=scale)
    with pytest.raises(ValueError, match="softmax_scale"):
        _paged_prefill(torch.randn(3, 2, 16), kc, vc, table, [2, 1], [3, 2], softmax_scale=scale)


def test_prefill_padding_rows_of_a_new_output_are_zero():
    """sum(q_seqlens) < query rows: the rows past the last sequence are padding; a NEW output holds zeros there
    (never leftover memory), as does paged_prefill_attention's."""
    q, k, v = torch.randn(64, 2, 16), torch.randn(64, 2, 16), torch.randn(64, 2, 16)
    for _ in range(3):  # leftover memory of freed tensors is what an uninitialised output would show
        junk = torch.full((64, 2, 16), 1.7e19)
        del junk
        out = _prefill(q, k, v, [3, 2], [3, 2])
        assert bool((out[5:] == 0).all()), out[5:].abs().max()
        kc, vc, table = _cache([3, 2], 4, 2, 16)
        out = _paged_prefill(q, kc, vc, table, [3, 2], [3, 2])
        assert bool((out[5:] == 0).all()), out[5:].abs().max()


# ----------------------------------------------------------------------------------------- paged ops
def test_decode_nan_in_query_or_visible_cache_gives_nan_and_empty_rows_stay_zero():
    torch.manual_seed(4)
    kc, vc, table = _cache([9, 0, 5], 4, 2, 16)
    q = torch.randn(3, 4, 16)
    q[1] = float("nan")  # a zero-length sequence: zero by its length, whatever its query holds
    out = _decode(q, kc, vc, table, [9, 0, 5])
    assert bool((out[1] == 0).all())
    assert _nan_rows(out) == set()  # NaN slots past the lengths are never read
    q[2, 0, 0] = float("nan")
    vc[int(table[0, 2]), 0, 1, 3] = float("nan")  # token 8 of sequence 0, KV head 1
    out = _decode(q, kc, vc, table, [9, 0, 5])
    assert _nan_rows(out) == {(2, 0), (0, 2), (0, 3)}


def test_paged_prefill_nan_in_a_visible_key_gives_nan():
    torch.manual_seed(5)
    kc, vc, table = _cache([6, 4], 4, 1, 16)
    kc[int(table[1, 0]), 0, 0, 0] = float("nan")  # sequence 1's first key: every query of it sees it
    q = torch.randn(5, 2, 16)  # 2 new tokens of sequence 0, 3 of sequence 1
    out = _paged_prefill(q, kc, vc, table, [2, 3], [6, 4])
    assert _nan_rows(out) == {(t, h) for t in (2, 3, 4) for h in (0, 1)}


# ------------------------------------------------------------------------------------------- the oracle
def test_oracle_propagates_nan_and_zeros_only_rows_without_keys():
    q, k, v = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(3, 2, 8, dtype=torch.float64), \
        torch.randn(3, 2, 8, dtype=torch.float64)
    q[..., 0] = q[..., 0].abs() + 0.1  # so that an infinite key component gives +inf scores
    q[1, 0, 0] = float("nan")
    out = oracle.attention_64(q, k, v, 0.5, True)
    assert _nan_rows(out) == {(1, 0)}
    k[0, 1, 0] = float("inf")  # key 0 of KV head 1: seen by every query (causal, equal lengths)
    out = oracle.attention_64(q, k, v, 0.5, True)
    assert _nan_rows(out) == {(1, 0), (0, 1), (1, 1), (2, 1)}
    # causal with more queries than keys: the first query sees nothing and is zero even if it is NaN
    q[0] = float("nan")
    out = oracle.attention_64(q, k[1:], v[1:], 0.5, True)
    assert bool((out[0] == 0).all())
    assert math.isnan(float(out[1, 0, 0]))
