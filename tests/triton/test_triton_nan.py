"""NaN in, NaN out in the Triton attention kernels (interpreter on CPU): the rows a NaN/Inf can reach are NaN,
exactly those the reference vendor makes NaN; rows of zero-length sequences stay zero; the split-KV decode's
combine step never drops a NaN partial as if it were empty."""

from __future__ import annotations

import pytest
import torch

import dlinfer.ops as ops
from dlinfer.vendor import registry

CAUSAL = [torch.ones(1, dtype=torch.bool)]


def _both(fn):
    """``fn()`` with the Triton vendor forced, then with the reference vendor forced."""
    out = {}
    for vendor in ("triton", "reference"):
        with registry.forced(vendor):
            out[vendor] = fn()
    return out["triton"], out["reference"]


def _nan_rows(out):
    return {tuple(ix) for ix in torch.nonzero(out.isnan().any(-1)).tolist()}


def _cache(lens, block, hk, d, dtype):
    g = torch.Generator().manual_seed(0)
    need = [max(1, -(-n // block)) for n in lens]
    kc = torch.randn(sum(need), block, hk, d, generator=g).to(dtype)
    vc = torch.randn(sum(need), block, hk, d, generator=g).to(dtype)
    table = torch.zeros(len(lens), max(need), dtype=torch.int32)
    first = 0
    for b, m in enumerate(need):
        table[b, :m] = torch.arange(first, first + m)
        first += m
    return kc, vc, table


@pytest.mark.parametrize("hq,hk", [(2, 2), (4, 1)])  # one head (elementwise) and a group (tl.dot)
@pytest.mark.parametrize("where", ["query", "key", "value"])
def test_decode_nan_survives_the_split_combine(hq, hk, where):
    lens = [70, 0, 40]
    kc, vc, table = _cache(lens, 16, hk, 16, torch.float32)
    q = torch.randn(3, hq, 16)
    if where == "query":
        q[0, hq - 1, 3] = float("nan")
    elif where == "key":
        kc[int(table[0, 0]), 0, 0, 5] = float("nan")  # token 0 of sequence 0: in the first of several splits
    else:
        vc[int(table[2, 1]), 2, hk - 1, 1] = float("inf")
    q[1] = float("nan")  # a zero-length sequence: zero, whatever its query holds

    def run():
        return ops.paged_decode_attention(q, kc, vc, table, 16, torch.arange(1, 4, dtype=torch.int32),
                                          torch.tensor(lens, dtype=torch.int32), 79, hq, hk)

    tri, ref = _both(run)
    assert _nan_rows(ref) or bool(torch.isinf(ref).any())  # the case poisons something visible
    assert _nan_rows(tri) == _nan_rows(ref)
    assert torch.equal(torch.isinf(tri), torch.isinf(ref))
    assert bool((tri[1] == 0).all())
    finite = torch.isfinite(ref)
    torch.testing.assert_close(tri[finite], ref[finite], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("where", ["query", "key", "value"])
@pytest.mark.parametrize("paged", [False, True])
def test_prefill_nan_in_nan_out(where, paged):
    hq, hk, d = 4, 2, 16
    q_lens, kv_lens = [3, 5], [3, 5]
    q = torch.randn(8, hq, d, dtype=torch.float16)
    k, v = torch.randn(8, hk, d, dtype=torch.float16), torch.randn(8, hk, d, dtype=torch.float16)
    if where == "query":
        q[4, 1, 0] = float("nan")
    elif where == "key":
        k[3, 1, 2] = float("nan")  # first key of sequence 1: every query of it sees it
    else:
        v[0, 0, 3] = float("nan")  # first value of sequence 0
    if paged:
        kc, vc, table = _cache(kv_lens, 16, hk, d, torch.float16)
        kc[0, :3], vc[0, :3] = k[:3], v[:3]
        kc[1, :5], vc[1, :5] = k[3:], v[3:]

        def run():
            return ops.paged_prefill_attention(q, None, None, kc, vc, table, 16, torch.tensor([3, 8], dtype=torch.int32),
                                               torch.tensor(kv_lens, dtype=torch.int32), 5, 5, hq, hk, CAUSAL)
    else:
        def run():
            return ops.prefill_attention(q, k, v, None, None, torch.tensor(q_lens, dtype=torch.int32),
                                         torch.tensor(kv_lens, dtype=torch.int32), 5, hq, hk, CAUSAL)

    tri, ref = _both(run)
    assert _nan_rows(ref)
    assert _nan_rows(tri) == _nan_rows(ref)
    finite = torch.isfinite(ref)
    torch.testing.assert_close(tri[finite], ref[finite], atol=2e-3, rtol=2e-3)
