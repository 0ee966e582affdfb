"""The library route of the triton vendor's ``prefill_attention`` (``PrefillConfig.sdpa``, ``DLINFER_TRITON_PREFILL=
"sdpa=1"``): a uniform batch served by torch's SDPA (cuDNN on CUDA), everything else by the Triton kernel.

On CPU the route's own logic runs with the CPU device allowed and torch's math backend in place of cuDNN (module
switches the tests patch; on CUDA the route asks for cuDNN only). Checked against the reference vendor: uniform
batches (3 x 17 tokens) in fp16/bf16, GQA 1 and 4, causal and non-causal, strided views of a fused QKV and a
strided output; that it is not taken when the host cannot prove equal lengths, when keys have their own offsets
tensor, when it is off (the default), under CUDA-graph capture, or for shapes it leaves to the kernel; and that a
call SDPA raises on falls back to the Triton kernel, is logged once and never retried. Spies count SDPA calls and
kernel launches, so each test proves which path ran.
"""

from __future__ import annotations

import dataclasses
import logging
import types

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

import dlinfer.ops as ops
import dlinfer.vendor
from dlinfer.vendor.reference import attention as reference
from dlinfer.vendor.triton import attention_decode
from dlinfer.vendor.triton import attention_prefill as ap
from test_attention import close as _close
from test_prefill_hopper import _Spy

KERNELS = ("_prefill_kernel", "_prefill_split_kernel", "_prefill_tma_kernel")


@pytest.fixture
def route(monkeypatch):
    """``route(sdpa)``: the interpreter's launch config with ``sdpa`` (``None``: as built, off by default; the
    interpreter's config takes no ``DLINFER_TRITON_PREFILL`` overrides), the route allowed on CPU tensors with the
    math backend, no capture; returns the spies (``.sdpa``: SDPA's calls, ``.launches()``: kernel launches)."""

    def use(sdpa: bool | None = True):
        if sdpa is not None:
            real_config = ap._config
            monkeypatch.setattr(ap, "_config", lambda *args: dataclasses.replace(real_config(*args), sdpa=sdpa))
        monkeypatch.setattr(ap, "_SDPA_DEVICES", ("cuda", "cpu"))
        monkeypatch.setattr(ap, "_SDPA_BACKENDS", [SDPBackend.MATH])
        monkeypatch.setattr(ap, "_SDPA_REFUSED", set())
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        spies = types.SimpleNamespace(sdpa=[], kernels={name: _Spy(getattr(ap, name)) for name in KERNELS})
        for name, spy in spies.kernels.items():
            monkeypatch.setattr(ap, name, spy)
        real = F.scaled_dot_product_attention

        def counted(*args, **kwargs):
            spies.sdpa.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
        spies.launches = lambda: sum(spy.launches for spy in spies.kernels.values())
        return spies

    return use


def _inputs(hq, hk, d, dtype, lens, seed, fused=False, dv=None):
    """Packed query/key/value (``fused``: views of one ``[T, (Hq + 2 Hk) * D]`` QKV tensor) and start offsets."""
    gen = torch.Generator().manual_seed(seed)
    tokens, dv = sum(lens), dv or d
    if fused:
        qkv = torch.randn(tokens, (hq + hk) * d + hk * dv, generator=gen).to(dtype)
        query = qkv[:, :hq * d].view(tokens, hq, d)
        key = qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
        value = qkv[:, (hq + hk) * d:].view(tokens, hk, dv)
    else:
        query = torch.randn(tokens, hq, d, generator=gen).to(dtype)
        key = torch.randn(tokens, hk, d, generator=gen).to(dtype)
        value = torch.randn(tokens, hk, dv, generator=gen).to(dtype)
    cu = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return query, key, value, cu


def _want(query, key, value, cu, max_q, causal):
    want = torch.empty(query.shape[0], query.shape[1], value.shape[2], dtype=torch.float32)
    reference.prefill_attention(query, key, value, cu, cu, max_q, query.shape[-1] ** -0.5, causal, want)
    return want


@pytest.mark.parametrize("fused", [False, True], ids=["packed", "fused_qkv"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non_causal"])
@pytest.mark.parametrize("hq,hk", [(8, 8), (8, 2)], ids=["gqa1", "gqa4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_uniform_batch_served_by_sdpa(dtype, hq, hk, causal, fused, route):
    spies = route()
    d, lens = 64, [17, 17, 17]
    query, key, value, cu = _inputs(hq, hk, d, dtype, lens, hq * 10 + hk + causal + 2 * fused, fused)
    want = _want(query, key, value, cu, 17, causal)
    # a strided output (a wider buffer's first D columns): columns past D stay untouched
    buffer = torch.full((query.shape[0], hq, d + 8), float("nan"), dtype=dtype)
    ap.prefill_attention(query, key, value, cu, cu, 17, d ** -0.5, causal, buffer[..., :d])
    _close(buffer[..., :d], want, dtype)
    assert torch.isnan(buffer[..., d:]).all(), "wrote past the output view"
    assert len(spies.sdpa) == 1 and spies.launches() == 0
    assert spies.sdpa[0]["enable_gqa"] == (hq != hk) and spies.sdpa[0]["is_causal"] == causal


def test_route_output_may_alias_the_query(route):
    """LMDeploy passes ``attn_output = query[..., :Dv]``: SDPA reads the query before the one copy writes it."""
    spies = route()
    query, key, value, cu = _inputs(8, 2, 128, torch.float16, [17, 17, 17], 7)
    want = _want(query, key, value, cu, 17, True)
    ap.prefill_attention(query, key, value, cu, cu, 17, 128 ** -0.5, True, query)
    _close(query, want, torch.float16)
    assert len(spies.sdpa) == 1 and spies.launches() == 0


def test_public_op_reaches_the_route(route):
    """``dlinfer.ops.prefill_attention`` given one lengths tensor for queries and keys passes one offsets tensor to
    the vendor (the route); a second tensor of the same lengths gives a second offsets tensor (the kernel)."""
    spies = route()
    hq, hk, d, lens = 8, 2, 64, [17, 17, 17]
    query, key, value, _ = _inputs(hq, hk, d, torch.float16, lens, 3)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    want = _want(query, key, value, torch.tensor([0, 17, 34, 51], dtype=torch.int32), 17, True)
    dlinfer.vendor.set_override("triton")
    for kv_seqlens, served_by_sdpa in ((seqlens, True), (seqlens.clone(), False)):
        spies.sdpa.clear()
        out = torch.full_like(query, float("nan"))
        ops.prefill_attention(query, key, value, None, None, seqlens, kv_seqlens, 17, hq, hk, [None],
                              attn_output=out)
        _close(out, want, torch.float16)
        assert (len(spies.sdpa) == 1) == served_by_sdpa


NOT_TAKEN = {
    # name: (lens, max_q_seq_len, head size, Dv, dtype, PrefillConfig.sdpa; None: the config as built)
    "unequal_lengths": ([17, 10, 17], 17, 64, 64, torch.float16, True),  # T = 44 != 3 * 17
    "loose_bound": ([17, 17, 17], 20, 64, 64, torch.float16, True),  # equal, but T != 3 * max_q: unproven
    "one_token": ([1, 1, 1], 1, 64, 64, torch.float16, True),  # cuDNN SDPA refuses one key
    "head_size_32": ([17, 17, 17], 17, 32, 32, torch.float16, True),
    "dv_differs": ([17, 17, 17], 17, 64, 32, torch.float16, True),
    "fp32": ([17, 17, 17], 17, 64, 64, torch.float32, True),
    "off_by_default": ([17, 17, 17], 17, 64, 64, torch.float16, None),
    "off": ([17, 17, 17], 17, 64, 64, torch.float16, False),
}


@pytest.mark.parametrize("case", list(NOT_TAKEN))
def test_kernel_serves_what_the_route_leaves(case, route):
    lens, max_q, d, dv, dtype, sdpa = NOT_TAKEN[case]
    spies = route(sdpa)
    query, key, value, cu = _inputs(4, 2, d, dtype, lens, len(case), dv=dv)
    got = torch.full((query.shape[0], 4, dv), float("nan"), dtype=dtype)
    ap.prefill_attention(query, key, value, cu, cu, max_q, d ** -0.5, True, got)
    _close(got, _want(query, key, value, cu, max_q, True), dtype)
    assert spies.sdpa == [] and spies.launches() >= 1


def test_keys_with_their_own_offsets_tensor(route):
    """Equal offsets in a second tensor: the host cannot tell them from other offsets without reading them."""
    spies = route()
    query, key, value, cu = _inputs(4, 2, 64, torch.float16, [17, 17, 17], 5)
    got = torch.full_like(query, float("nan"))
    ap.prefill_attention(query, key, value, cu, cu.clone(), 17, 0.125, True, got)
    _close(got, _want(query, key, value, cu, 17, True), torch.float16)
    assert spies.sdpa == [] and spies.launches() >= 1


def test_not_taken_while_capturing(route, monkeypatch):
    """cuDNN builds an execution plan per new shape: never inside a CUDA graph capture."""
    spies = route()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    query, key, value, cu = _inputs(4, 2, 64, torch.float16, [17, 17, 17], 9)
    got = torch.full_like(query, float("nan"))
    ap.prefill_attention(query, key, value, cu, cu, 17, 0.125, False, got)
    _close(got, _want(query, key, value, cu, 17, False), torch.float16)
    assert spies.sdpa == [] and spies.launches() >= 1


def test_sdpa_failure_falls_back_once(route, monkeypatch, caplog):
    """SDPA raising (no cuDNN kernel for the configuration): the Triton kernel serves the call, the configuration is
    logged once and never tried again; another configuration still takes the route."""
    spies = route()
    real = F.scaled_dot_product_attention

    def refuse(*args, **kwargs):
        real(*args, **kwargs)  # the spy: counts the call
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)
    query, key, value, cu = _inputs(4, 2, 64, torch.float16, [17, 17, 17], 13)
    want = _want(query, key, value, cu, 17, True)
    with caplog.at_level(logging.WARNING, logger="dlinfer"):
        for expected_launches in (1, 2):
            got = torch.full_like(query, float("nan"))
            ap.prefill_attention(query, key, value, cu, cu, 17, 0.125, True, got)
            _close(got, want, torch.float16)
            assert len(spies.sdpa) == 1 and spies.launches() == expected_launches
    warnings = [r for r in caplog.records if "SDPA" in r.getMessage()]
    assert len(warnings) == 1 and "No available kernel" in warnings[0].getMessage()
    assert ap._SDPA_REFUSED == {(torch.float16, 4, 2, 64, True)}
    monkeypatch.setattr(F, "scaled_dot_product_attention", real)  # non-causal: a configuration not refused
    got = torch.full_like(query, float("nan"))
    ap.prefill_attention(query, key, value, cu, cu, 17, 0.125, False, got)
    _close(got, _want(query, key, value, cu, 17, False), torch.float16)
    assert spies.launches() == 2


def test_sdpa_field_parsed_from_the_override(monkeypatch):
    """Off by default; ``DLINFER_TRITON_PREFILL="sdpa=1"`` turns it on (the GPU configs take the overrides)."""
    cfg = ap.PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    assert cfg.sdpa is False
    monkeypatch.setenv("DLINFER_TRITON_PREFILL", "sdpa=1,block_n=64")
    tuned = attention_decode.env_overrides(cfg, "DLINFER_TRITON_PREFILL")
    assert tuned.sdpa is True and tuned.block_n == 64
    monkeypatch.setenv("DLINFER_TRITON_PREFILL", "sdpa=0")
    assert attention_decode.env_overrides(tuned, "DLINFER_TRITON_PREFILL").sdpa is False


def test_padding_rows_go_to_the_kernel_when_values_are_checked(route, monkeypatch):
    """The route assumes no padding rows after the last sequence (the host cannot see them): lengths 1 and 3 in
    T = 6 rows with the bound 3 pass ``T == B * max_q``. With ``DLINFER_CHECK=1`` the route reads the offsets and
    sends this batch to the Triton kernel (right answer for the real rows); a truly uniform batch still takes it."""
    monkeypatch.setenv("DLINFER_CHECK", "1")
    spies = route()
    query, key, value, _ = _inputs(4, 2, 64, torch.float16, [1, 3, 2], 11)  # 6 rows
    cu = torch.tensor([0, 1, 4], dtype=torch.int32)  # two sequences, then two padding rows
    got = torch.zeros(6, 4, 64, dtype=torch.float16)
    ap.prefill_attention(query, key, value, cu, cu, 3, 64 ** -0.5, True, got)
    _close(got[:4], _want(query[:4], key[:4], value[:4], cu, 3, True), torch.float16)
    assert spies.sdpa == [] and spies.launches() >= 1
    query, key, value, cu = _inputs(4, 2, 64, torch.float16, [3, 3], 12)
    got = torch.zeros(6, 4, 64, dtype=torch.float16)
    ap.prefill_attention(query, key, value, cu, cu, 3, 64 ** -0.5, True, got)
    _close(got, _want(query, key, value, cu, 3, True), torch.float16)
    assert len(spies.sdpa) == 1
