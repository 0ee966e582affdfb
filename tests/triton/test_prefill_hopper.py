"""The Hopper variant of the triton prefill kernels (``PrefillConfig.tma`` / ``tma_split`` / ``warp_specialize``):
tensor descriptor (TMA) loads of the query, key and value tiles, from packed keys or from paged caches, un-split and
split; its warp-specialized form (device-side descriptors clipped to each sequence, one branch-free KV loop).

Under Triton's interpreter (CPU) against the reference vendor: the interpreter runs host- and device-side tensor
descriptors (its loads are the TMA box semantics: rows past the tensor or the descriptor's shape are zeros, rows
past a sequence in a host descriptor are the next sequence's), and ignores ``warp_specialize`` (it runs that
form's code: device-side descriptors, one loop). Padding K/V rows past the last sequence, and cache slots past each
sequence, hold NaN, so a masked tile that let a foreign row into the accumulator shows up. Compiled for sm_90 on this CPU: TMA copies, wgmma,
warp specialization, shared memory, no spills. The TMA path takes 16-bit inputs; it is checked in fp16 (the
interpreter gets bf16 ``tl.dot`` wrong), fp32 runs the pointer kernel.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_attention import make_block_table, make_cache

from dlinfer.vendor.reference import attention as reference
from dlinfer.vendor.triton import attention_decode, host
from dlinfer.vendor.triton import attention_prefill as ap

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3)}


KERNELS = ("_prefill_tma_kernel", "_prefill_tma_split_kernel", "_prefill_kernel", "_prefill_split_kernel")


class _Spy:
    """Stands in for a ``@triton.jit`` kernel in the module: counts its launches, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def hopper(monkeypatch):
    """``hopper(**fields)``: the interpreter's launch config with ``tma=True`` (un-split unless ``splits`` is
    given) and ``fields``; returns the spies of the TMA, pointer and split kernels."""

    def use(**fields):
        real = ap._config
        fields = {"tma": True, "splits": 0, **fields}
        monkeypatch.setattr(ap, "_config", lambda *args: dataclasses.replace(real(*args), **fields))
        spies = {name: _Spy(getattr(ap, name)) for name in KERNELS}
        for name, spy in spies.items():
            monkeypatch.setattr(ap, name, spy)
        return spies

    return use


def _case(hq, hk, d, dv, dtype, q_lens, kv_lens, seed, pad=3):
    """Packed query/key/value with ``pad`` trailing tokens (K/V padding is NaN) and the start offsets."""
    gen = torch.Generator().manual_seed(seed)
    tokens, kv_tokens = sum(q_lens) + pad, sum(kv_lens) + pad
    query = torch.randn(tokens, hq, d, generator=gen).to(dtype)
    key = torch.randn(kv_tokens, hk, d, generator=gen).to(dtype)
    value = torch.randn(kv_tokens, hk, dv, generator=gen).to(dtype)
    key[sum(kv_lens):] = float("nan")
    value[sum(kv_lens):] = float("nan")
    cu_q = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_kv = cu_q if kv_lens == q_lens else torch.tensor([0, *kv_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return query, key, value, cu_q, cu_kv


def _check(query, key, value, cu_q, cu_kv, q_lens, causal, dtype, dv):
    tokens, hq = query.shape[:2]
    got = torch.full((tokens, hq, dv), float("nan"), dtype=dtype)
    want = torch.full((tokens, hq, dv), float("nan"), dtype=dtype)
    scale = query.shape[-1] ** -0.5
    ap.prefill_attention(query, key, value, cu_q, cu_kv, max(q_lens), scale, causal, got)
    reference.prefill_attention(query, key, value, cu_q, cu_kv, max(q_lens), scale, causal, want)
    real = sum(q_lens)
    assert not torch.isnan(got[:real]).any(), "an output element was not written (or a NaN row leaked in)"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got[:real].float(), want[:real].float(), atol=atol, rtol=rtol)
    assert torch.isnan(got[real:]).all(), "wrote padding tokens past the last sequence"


HOPPER_CASES = [
    # Hq, Hk, D, Dv, dtype, causal, q_lens, kv_lens (None: the same offsets tensor as the queries)
    (8, 8, 64, 64, torch.float16, True, [37, 1, 0, 20], None),  # GQA 1, a one-token and an empty sequence
    (8, 2, 128, 128, torch.float16, True, [5, 0, 33, 1], None),  # GQA 4 (packed)
    (8, 1, 64, 64, torch.float16, True, [19, 40, 1], None),  # GQA 8 (packed, 4 tokens a tile)
    (4, 1, 128, 128, torch.float16, False, [12, 30, 0], [40, 3, 5]),  # non-causal, q/kv lengths differ
    (8, 2, 64, 128, torch.float16, True, [7, 20], [30, 20]),  # causal end alignment (q shorter), Dv != D
    (8, 8, 128, 64, torch.float16, False, [1, 17, 0], None),  # non-causal GQA 1
]


@pytest.mark.parametrize("ws", [False, True], ids=["tma", "tma_ws"])
@pytest.mark.parametrize("hq,hk,d,dv,dtype,causal,q_lens,kv_lens", HOPPER_CASES)
def test_tma_prefill_matches_reference(hq, hk, d, dv, dtype, causal, q_lens, kv_lens, ws, hopper):
    spies = hopper(warp_specialize=ws)
    query, key, value, cu_q, cu_kv = _case(hq, hk, d, dv, dtype, q_lens, kv_lens or q_lens, hq * 10 + d + dv)
    _check(query, key, value, cu_q, cu_kv, q_lens, causal, dtype, dv)
    assert spies["_prefill_tma_kernel"].launches == 1 and spies["_prefill_kernel"].launches == 0


def test_tma_prefill_with_gpu_tiles(hopper):
    """The GPU's 128 x 64 tiles (GQA 4 packed: 32 tokens a tile): two masked diagonal tiles per query tile,
    sequences that are not a multiple of a tile, rows of the next sequence inside the last tiles."""
    spies = hopper(block_m=128, block_n=64, num_warps=8, num_stages=3)
    q_lens = [150, 70, 1]
    query, key, value, cu_q, cu_kv = _case(8, 2, 64, 64, torch.float16, q_lens, q_lens, 5)
    _check(query, key, value, cu_q, cu_kv, q_lens, True, torch.float16, 64)
    assert spies["_prefill_tma_kernel"].launches == 1


def test_tma_output_may_alias_the_query(hopper):
    """LMDeploy passes ``attn_output = query[..., :Dv]``: each program reads its query tile before it writes."""
    hopper()
    q_lens = [21, 14]
    query, key, value, cu_q, _ = _case(4, 2, 64, 64, torch.float16, q_lens, q_lens, 11, pad=0)
    want = torch.empty_like(query)
    reference.prefill_attention(query, key, value, cu_q, cu_q, 21, 0.125, True, want)
    ap.prefill_attention(query, key, value, cu_q, cu_q, 21, 0.125, True, query)
    torch.testing.assert_close(query.float(), want.float(), atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("hq,hk,d,dv,dtype,causal,q_lens,kv_lens", HOPPER_CASES[:5])
def test_tma_split_prefill_matches_reference(hq, hk, d, dv, dtype, causal, q_lens, kv_lens, splits, hopper):
    """With ``tma_split`` a split grid runs the TMA split kernel (then the combine kernel), never the pointer
    kernels."""
    spies = hopper(splits=splits, tma_split=True)
    query, key, value, cu_q, cu_kv = _case(hq, hk, d, dv, dtype, q_lens, kv_lens or q_lens, hq + d + splits)
    _check(query, key, value, cu_q, cu_kv, q_lens, causal, dtype, dv)
    assert spies["_prefill_tma_split_kernel"].launches == 1
    assert sum(spies[k].launches for k in KERNELS) == 1


@pytest.mark.parametrize("shape", ["d32", "d256", "fp32", "strided_heads", "split", "split_ws"])
def test_pointer_kernel_where_tma_does_not_apply(shape, hopper):
    """Head sizes other than 64/128, fp32, K/V whose heads are not contiguous (no 2-D ``[T, Hkv * D]`` view), a
    split grid without ``tma_split`` (the default: the TMA split kernel has not run on a GPU yet) and one asking for
    warp specialization run the pointer kernels, and give the reference's result."""
    fields = {"split": dict(splits=2), "split_ws": dict(splits=2, tma_split=True, warp_specialize=True)}
    spies = hopper(**fields.get(shape, {}))
    d = {"d32": 32, "d256": 256}.get(shape, 64)
    dtype = torch.float32 if shape == "fp32" else torch.float16
    q_lens = [9, 26]
    query, key, value, cu_q, cu_kv = _case(4, 2, d, d, dtype, q_lens, q_lens, 3)
    if shape == "strided_heads":  # K and V interleaved per head: head stride 2 * D
        kv = torch.stack([key, value], dim=2)
        key, value = kv[:, :, 0], kv[:, :, 1]
    _check(query, key, value, cu_q, cu_kv, q_lens, True, dtype, d)
    assert spies["_prefill_tma_kernel"].launches + spies["_prefill_tma_split_kernel"].launches == 0
    assert spies["_prefill_kernel"].launches + spies["_prefill_split_kernel"].launches == 1


def _paged_case(hq, hk, d, dv, page, q_lens, history, seed, layout="contiguous"):
    """A paged prefill call's tensors: ``[blocks, page, Hk, D]`` caches (``layout="blocked"``: views of a
    ``[blocks, 2, page, Hk, D]`` buffer, so pages do not follow each other row by row) whose slots past each
    sequence and unused blocks hold NaN, a shuffled block table with garbage past each sequence, 3 padding query
    rows."""
    gen = torch.Generator().manual_seed(seed)
    kv_lens = [q + h for q, h in zip(q_lens, history)]
    table, blocks = make_block_table(kv_lens, page, math.ceil(max(kv_lens) / page) + 2, gen)
    if layout == "blocked":
        kv = torch.randn(blocks, 2, page, hk, d, generator=gen).to(torch.float16)
        key_cache, value_cache = kv[:, 0], kv[:, 1]
    else:
        key_cache, value_cache = make_cache(blocks, page, hk, d, dv, torch.float16, False, gen)
    live = torch.zeros(blocks, page, dtype=torch.bool)
    for b, n in enumerate(kv_lens):
        for t in range(n):
            live[table[b, t // page], t % page] = True
    key_cache[~live] = float("nan")
    value_cache[~live] = float("nan")
    query = torch.randn(sum(q_lens) + 3, hq, d, generator=gen).to(torch.float16)
    cu_q = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return query, key_cache, value_cache, table, cu_q, torch.tensor(kv_lens, dtype=torch.int32)


def _check_paged(case, q_lens, causal, dv, max_kv):
    query, key_cache, value_cache, table, cu_q, kv_lens = case
    outs = []
    for impl in (ap.paged_prefill_attention, reference.paged_prefill_attention):
        out = torch.full((query.shape[0], query.shape[1], dv), float("nan"), dtype=query.dtype)
        impl(query, key_cache, value_cache, table, cu_q, kv_lens, max(q_lens), max_kv, query.shape[-1] ** -0.5,
             causal, out)
        outs.append(out)
    real = sum(q_lens)
    assert not torch.isnan(outs[0][:real]).any(), "an output element was not written (or a NaN slot leaked in)"
    torch.testing.assert_close(outs[0][:real].float(), outs[1][:real].float(), atol=4e-3, rtol=4e-3)
    assert torch.isnan(outs[0][real:]).all(), "wrote padding tokens past the last sequence"


PAGED_CASES = [
    # Hq, Hk, D, Dv, page, causal, q_lens, history
    (8, 2, 64, 64, 16, True, [9, 0, 1, 20], [70, 33, 90, 45]),  # chunked prefill, GQA 4 (packed), empty, 1 token
    (8, 8, 128, 128, 32, True, [37, 5], [0, 40]),  # no history, GQA 1, two key tiles a page
    (8, 1, 64, 128, 16, False, [12, 30], [20, 0]),  # non-causal, GQA 8, Dv != D
    (4, 2, 128, 64, 48, True, [3, 17], [50, 13]),  # a 48-key page: three 16-key tiles a page
]


@pytest.mark.parametrize("splits", [0, 3])
@pytest.mark.parametrize("hq,hk,d,dv,page,causal,q_lens,history", PAGED_CASES)
def test_tma_paged_prefill_matches_reference(hq, hk, d, dv, page, causal, q_lens, history, splits, hopper):
    """With ``tma`` in the config, paged prefill reads its key/value tiles by TMA from the caches viewed as 2-D
    ``[blocks * page, Hk * D]`` (a tile inside one page, found through the block table), un-split and (with
    ``tma_split``) split; the
    NaN in the slots past each sequence never reaches an output."""
    spies = hopper(splits=splits, tma_split=True)
    case = _paged_case(hq, hk, d, dv, page, q_lens, history, seed=hq + d + page + splits)
    _check_paged(case, q_lens, causal, dv, max(q + h for q, h in zip(q_lens, history)) + 20)
    kernel = "_prefill_tma_split_kernel" if splits else "_prefill_tma_kernel"
    assert spies[kernel].launches == 1 and sum(spies[k].launches for k in KERNELS) == 1


@pytest.mark.parametrize("why", ["page_not_a_tile_multiple", "blocked_pages", "warp_specialize", "untuned"])
def test_paged_prefill_runs_the_pointer_kernel_where_tma_does_not_apply(why, hopper, monkeypatch):
    """A page that is not a whole number of key tiles, caches whose pages do not follow each other row by row, a
    warp-specialized config and a config without ``tma`` (the CPU's default) run the pointer kernel, with the
    reference's result."""
    if why == "untuned":
        spies = {name: _Spy(getattr(ap, name)) for name in KERNELS}
        for name, spy in spies.items():
            monkeypatch.setattr(ap, name, spy)
    else:
        spies = hopper(**({"warp_specialize": True} if why == "warp_specialize" else {}))
    page = 24 if why == "page_not_a_tile_multiple" else 16
    case = _paged_case(8, 2, 64, 64, page, [7, 19], [30, 4], seed=len(why),
                       layout="blocked" if why == "blocked_pages" else "contiguous")
    _check_paged(case, [7, 19], True, 64, 60)
    assert spies["_prefill_tma_kernel"].launches + spies["_prefill_tma_split_kernel"].launches == 0
    assert spies["_prefill_kernel"].launches + spies["_prefill_split_kernel"].launches == 1


def test_quantized_paged_prefill_never_takes_the_tma_kernels(hopper):
    """An 8-bit cache is dequantized in registers by the pointer kernel, whatever the config asks."""
    spies = hopper()
    gen = torch.Generator().manual_seed(2)
    q_lens, kv_lens, page, hq, hk, d = [5, 9], [20, 9], 16, 4, 2, 64
    table, blocks = make_block_table(kv_lens, page, 4, gen)
    caches = [torch.randint(0, 256, (blocks, page, hk, d), generator=gen, dtype=torch.uint8) for _ in "kv"]
    scales = [(torch.rand(blocks, page, hk, generator=gen) / 64).half() for _ in "kv"]
    zeros = [torch.full((blocks, page, hk), 128.0).half() for _ in "kv"]
    query = torch.randn(sum(q_lens), hq, d, generator=gen).half()
    cu_q = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    outs = [torch.empty_like(query) for _ in range(2)]
    for impl, out in zip((ap.paged_prefill_attention, reference.paged_prefill_attention), outs):
        impl(query, *caches, table, cu_q, lens, 9, 20, d ** -0.5, True, out, scales, zeros, 8)
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=4e-3, rtol=4e-3)
    assert spies["_prefill_kernel"].launches == 1 and spies["_prefill_tma_kernel"].launches == 0


def test_default_config_leaves_tma_and_warp_specialization_off(monkeypatch):
    """Off on the CPU and in a bare config (the existing tests cover the pointer path), and the tuning override
    reaches both switches."""
    assert not ap.PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3).tma
    assert not ap.PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3).warp_specialize
    ap._config.cache_clear()
    cfg = ap._config("cpu", torch.float16, 128, 128)
    assert not cfg.tma and not cfg.warp_specialize
    monkeypatch.setenv("DLINFER_TRITON_PREFILL", "tma=1,warp_specialize=1,block_n=64")
    tuned = attention_decode.env_overrides(cfg, "DLINFER_TRITON_PREFILL")
    assert tuned.tma and tuned.warp_specialize and tuned.block_n == 64
    assert ap._pack(tuned, 4) == 1 and ap._pack(dataclasses.replace(tuned, warp_specialize=False), 4) == 4
    assert ap._pack(dataclasses.replace(tuned, tma=False), 4) == 4  # warp_specialize acts only with tma


@pytest.mark.parametrize("card", sorted(host.CARDS))
def test_hopper_runs_tma_tiles_where_the_call_qualifies(monkeypatch, card):
    """On sm_90 a 16-bit head-size-128 call the TMA kernel takes gets HOPPER_TMA (measured there); a call it cannot
    take, other head sizes, fp32 and every other card keep the pointer kernel's tiles; ``tma=0`` restores them, and
    other overrides apply to the TMA tiles."""
    monkeypatch.delenv("DLINFER_TRITON_PREFILL", raising=False)
    hopper_card = host.CARDS[card].capability == 9
    ap._config.cache_clear()
    try:
        with host.simulate(host.CARDS[card]):
            for long_queries in (False, True):
                plain = ap._config("cuda", torch.bfloat16, 128, 128, long_queries, 0, False)
                assert not plain.tma
                tma = ap._config("cuda", torch.bfloat16, 128, 128, long_queries, 0, True)
                want = dataclasses.replace(ap.HOPPER_TMA, target_programs=tma.target_programs)
                assert (tma == want) if hopper_card else (tma == plain)
                assert not ap._config("cuda", torch.bfloat16, 64, 64, long_queries, 0, True).tma
                assert not ap._config("cuda", torch.float32, 128, 128, long_queries, 0, True).tma
            for long_queries in (False, True):  # tma=0: the pointer kernel on its own tiles
                ap._config.cache_clear()
                plain = ap._config("cuda", torch.float16, 128, 128, long_queries, 0, False)
                monkeypatch.setenv("DLINFER_TRITON_PREFILL", "tma=0")
                ap._config.cache_clear()
                assert ap._config("cuda", torch.float16, 128, 128, long_queries, 0, True) == plain
                monkeypatch.setenv("DLINFER_TRITON_PREFILL", "num_stages=2")  # other overrides: on the TMA tiles
                ap._config.cache_clear()
                tuned = ap._config("cuda", torch.float16, 128, 128, long_queries, 0, True)
                assert (tuned.tma and tuned.block_m == 64 and tuned.num_stages == 2) if hopper_card else not tuned.tma
                monkeypatch.delenv("DLINFER_TRITON_PREFILL")
    finally:
        ap._config.cache_clear()


def test_the_launch_asks_for_tma_tiles_only_for_calls_the_tma_kernel_takes(monkeypatch):
    """``_launch`` tells ``_config`` whether the TMA kernel can take the call (un-paged, unquantized,
    ``_tma_applies``) and it has at least ``TMA_MIN_TOKENS`` query rows, and a config with ``tma`` runs the TMA
    kernel only where it can take the call."""
    monkeypatch.setattr(ap, "TMA_MIN_TOKENS", 8)
    asked = []
    real = ap._config

    def config(*args):
        asked.append(args[-1])
        return dataclasses.replace(real(*args), tma=True, splits=0)

    monkeypatch.setattr(ap, "_config", config)
    spies = {name: _Spy(getattr(ap, name)) for name in ("_prefill_tma_kernel", "_prefill_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(ap, name, spy)
    query, key, value, cu_q, _ = _case(4, 2, 64, 64, torch.float16, [5, 3], [5, 3], 1, pad=0)
    out = torch.empty_like(query)
    ap.prefill_attention(query, key, value, cu_q, cu_q, 5, 0.125, True, out)
    strided = torch.empty(key.shape[0], 2, 2 * 64, dtype=key.dtype)[:, :, :64]  # K heads not contiguous
    strided.copy_(key)
    ap.prefill_attention(query, strided, value, cu_q, cu_q, 5, 0.125, True, out)
    monkeypatch.setattr(ap, "TMA_MIN_TOKENS", 9)  # 8 rows: too few for the default TMA tiles
    ap.prefill_attention(query, key, value, cu_q, cu_q, 5, 0.125, True, out)
    assert asked == [True, False, False]
    assert spies["_prefill_tma_kernel"].launches == 2 and spies["_prefill_kernel"].launches == 1


@pytest.mark.parametrize("card", ["H100", "A100"])
def test_paged_hopper_default_runs_split_grids_on_the_tma_kernel_too(monkeypatch, card):
    """A paged call the TMA kernels take gets HOPPER_TMA_PAGED on sm_90 (its split grids on the TMA split kernel:
    measured faster there), the pointer tiles elsewhere."""
    monkeypatch.delenv("DLINFER_TRITON_PREFILL", raising=False)
    ap._config.cache_clear()
    try:
        with host.simulate(host.CARDS[card]):
            cfg = ap._config("cuda", torch.bfloat16, 128, 128, False, 0, True, True)
            if host.CARDS[card].capability == 9:
                assert cfg == dataclasses.replace(ap.HOPPER_TMA_PAGED, target_programs=cfg.target_programs)
                assert cfg.tma and cfg.tma_split
            else:
                assert not cfg.tma and cfg == ap._config("cuda", torch.bfloat16, 128, 128, False, 0, False, True)
    finally:
        ap._config.cache_clear()


def test_paged_launch_asks_for_tma_and_large_tiles_where_they_pay(monkeypatch):
    """Paged prefill asks ``_config`` for the TMA tiles where the TMA kernels can take the call (16-bit, head size
    64/128, unquantized, pages of whole 64-key tiles, rows after rows) with at least ``TMA_MIN_PAIRS`` query-key
    pairs, and for the large pointer tiles for long queries or a chunk of ``CHUNK_MIN_QUERIES`` over a history of
    ``LONG_HISTORY`` keys (the launch is stopped once the question is asked)."""
    asked = []

    def config(*args):
        asked.append((args[4], args[6], args[7]))  # large tiles, tma_call, paged
        raise StopIteration

    monkeypatch.setattr(ap, "_config", config)

    def ask(page, max_q, max_kv, tokens=256, layout="contiguous", quant=False):
        case = _paged_case(4, 1, 128, 128, page, [3, 2], [5, 0], seed=page, layout=layout)
        query, key_cache, value_cache, table, cu_q, kv_lens = case
        query = query[:1].expand(tokens, -1, -1).contiguous()  # only the row count matters here
        extra = ()
        if quant:
            key_cache, value_cache = (t.to(torch.uint8) for t in (key_cache, value_cache))
            sz = torch.ones(key_cache.shape[:3], dtype=torch.float16)
            extra = ((sz, sz), (sz, sz), 8)
        with pytest.raises(StopIteration):
            ap.paged_prefill_attention(query, key_cache, value_cache, table, cu_q, kv_lens, max_q, max_kv, 0.1, True,
                                       torch.empty_like(query), *extra)
        return asked.pop()

    pairs = ap.TMA_MIN_PAIRS
    assert ask(64, 256, pairs // 256) == (True, True, True)  # a chunk over a long history: TMA tiles
    assert ask(64, 256, pairs // 256 - 1, tokens=255) == (True, False, True)  # too few pairs for the TMA launch
    assert ask(64, 512, 512, tokens=8192) == (False, True, True)  # whole prompts (16 x 512)
    assert ask(16, 256, 16640) == (True, False, True)  # 16-key pages: the pointer kernel's large tiles
    assert ask(64, 256, 16640, layout="blocked") == (True, False, True)  # pages not row after row
    assert ask(64, 256, 16640, quant=True) == (True, False, True)  # an 8-bit cache
    assert ask(16, ap.CHUNK_MIN_QUERIES - 1, 16640) == (False, False, True)  # a short chunk: the small tiles
    assert ask(16, 512, ap.LONG_HISTORY - 1) == (False, False, True)  # whole prompts: the small tiles
    assert ask(16, ap.LONG_QUERIES, 1024) == (True, False, True)
    assert 1 << 20 <= pairs <= 1 << 23 and ap.CHUNK_MIN_QUERIES <= 256 and ap.LONG_HISTORY <= 16384


def test_eager_sized_prefills_keep_the_pointer_kernel(monkeypatch):
    """The shipped threshold: a 128-token prefill (host-bound when eager) does not ask for the TMA tiles, a
    2048-token one does (the launch is stopped once the question is asked)."""
    asked = []

    def config(*args):
        asked.append(args[-1])
        raise StopIteration

    monkeypatch.setattr(ap, "_config", config)
    for tokens in (128, ap.TMA_MIN_TOKENS - 1, ap.TMA_MIN_TOKENS):
        query, key, value, cu_q, _ = _case(2, 1, 64, 64, torch.float16, [tokens], [tokens], 1, pad=0)
        with pytest.raises(StopIteration):
            ap.prefill_attention(query, key, value, cu_q, cu_q, tokens, 0.125, True, torch.empty_like(query))
    assert asked == [False, False, True] and 1024 <= ap.TMA_MIN_TOKENS <= 4096


def test_tma_descriptors_equal_triton_s_own_and_keep_its_box_rule():
    """The descriptors built without per-call validation are the ones ``TensorDescriptor`` builds (every field),
    and a box Triton refuses is still refused."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    qkv = torch.randn(40, 12, 64, dtype=torch.float16)
    query, key, value = qkv[:, :8], qkv[:, 8:10], qkv[:, 10:]
    got = ap._tma_descriptors(query, key, value, 16, 4, 32)
    want = (TensorDescriptor(query, [40, 8, 64], [query.stride(0), 64, 1], [16, 4, 64]),
            TensorDescriptor(key, [40, 128], [key.stride(0), 1], [32, 64]),
            TensorDescriptor(value, [40, 128], [value.stride(0), 1], [32, 64]))
    assert got == want and all(type(g) is TensorDescriptor for g in got)
    with pytest.raises(ValueError, match="power of 2"):
        ap._tma_descriptors(query, key, value, 16, 3, 32)


def test_warp_specialization_with_eight_warps_is_refused(monkeypatch):
    """Triton 3.6 warp-specializes the loop on sm_90 only with 4 warps (8 compile to the unspecialized kernel): a
    GPU config asking for it with 8 is a ValueError naming the variable, raised before the card is queried."""
    monkeypatch.setenv("DLINFER_TRITON_PREFILL", "tma=1,warp_specialize=1,num_warps=8")
    ap._config.cache_clear()
    try:
        with pytest.raises(ValueError, match="DLINFER_TRITON_PREFILL: warp_specialize=1 needs num_warps=4"):
            ap._config("cuda", torch.bfloat16, 128, 128, True, 0)
    finally:
        ap._config.cache_clear()


# ------------------------------------------------------------------- GPU code paths, compiled without a GPU
_COMPILE_TMA_FOR_SM90 = r'''
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dlinfer.vendor.triton import attention_prefill as pre

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
LIMIT = 227 * 1024


def compile_tma(dt, bm, bn, pack, d, dv, causal, warps, stages, ws, page=0, split=False):
    consts = dict(GROUP=4, PACK=pack, HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_M=bm, BLOCK_N=bn, PAGED=bool(page),
                  PAGE_SIZE=page or 1, CAUSAL=causal, DOT_PRECISION="tf32", WHILE_LOOP=False)
    consts.update(USE_PDL=True) if split else consts.update(NUM_KV_HEADS=8, WARP_SPECIALIZE=ws)
    if ws:  # the tensors' pointers, descriptors made on the device
        types = dict(q_desc="*" + dt, k_desc="*" + dt, v_desc="*" + dt)
    else:
        types = dict(q_desc=f"tensordesc<{dt}[{bm // pack},{pack},{d}]>", k_desc=f"tensordesc<{dt}[{bn},{d}]>",
                     v_desc=f"tensordesc<{dt}[{bn},{dv}]>")
    types.update(out_ptr="*" + dt, mid_o_ptr="*fp32", mid_lse_ptr="*fp32", q_starts_ptr="*i32", kv_ptr_lens="*i32",
                 block_table_ptr="*i32", qk_scale="fp32")
    fn = pre._prefill_tma_split_kernel if split else pre._prefill_tma_kernel
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in consts else types.get(name, "i32")
        if sig[name].startswith("*") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        done = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True, check=True)
    stats = done.stdout + done.stderr
    regs = int(re.search(r"Used (\d+) registers", stats).group(1))
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", stats)]
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    assert "async_tma_copy_global_to_local" in ttgir and "cp.async.bulk.tensor" in ptx, "no TMA loads"
    assert "wgmma.mma_async" in ptx, "not on Hopper tensor cores (wgmma)"
    assert kernel.metadata.shared <= LIMIT, (dt, bm, bn, stages, kernel.metadata.shared)
    assert not any(spills), ("register spills", dt, bm, bn, warps, stages, spills)
    print("tma", "ws" if ws else "", "split" if split else "", f"page {page}" if page else "", dt, bm, bn, pack, d,
          causal, warps, stages, "shared", kernel.metadata.shared, "regs", regs)
    return kernel


for dt, bm, bn, pack, d, dv, causal, warps, stages in (
        ("bf16", 128, 128, 4, 128, 128, True, 8, 3), ("bf16", 128, 128, 4, 128, 128, True, 8, 2),
        ("bf16", 128, 64, 4, 128, 128, True, 8, 3), ("bf16", 64, 64, 4, 128, 128, True, 4, 3),
        ("bf16", 64, 128, 4, 128, 128, True, 4, 2), ("bf16", 128, 128, 1, 128, 128, False, 8, 3),
        ("fp16", 128, 64, 8, 64, 64, True, 4, 3)):
    compile_tma(dt, bm, bn, pack, d, dv, causal, warps, stages, False)
# Split grids and paged caches (page 64 and 128; the page of each key tile from the block table): the Hopper tiles.
for page, split in ((0, True), (64, False), (64, True), (128, False)):
    compile_tma("bf16", 64, 64, 4, 128, 128, True, 4, 3, False, page, split)
compile_tma("bf16", 128, 128, 4, 128, 128, True, 8, 3, False, 128, False)
# The warp-specialized form: a producer warp group and two consumer groups (12 warps, setmaxnreg).
for dt, bm, bn, d, causal, stages in (("bf16", 128, 128, 128, True, 2), ("bf16", 128, 128, 128, False, 2),
                                      ("bf16", 128, 64, 128, True, 2), ("bf16", 128, 64, 128, True, 3),
                                      ("fp16", 128, 64, 64, True, 2)):
    kernel = compile_tma(dt, bm, bn, 1, d, d, causal, 4, stages, True)
    assert "ttg.warp_specialize" in kernel.asm["ttgir"] and "setmaxnreg" in kernel.asm["ptx"], "not specialized"
    assert kernel.metadata.num_warps == 12, kernel.metadata.num_warps
print("compiled")
'''


def test_tma_kernel_compiles_for_sm90():
    """The TMA kernel's GPU configs (bf16 at D 128: 128x128 / 128x64 tiles with 8 warps, 64x64 / 64x128 with 4, 2
    and 3 stages, packed and not, causal and not; fp16 at D 64), its split kernel and both over paged caches, compile
    for sm_90 with the triton wheel's ptxas: TMA
    copies (``cp.async.bulk.tensor``), wgmma, at most 227 KB of shared memory, no register spills (``ptxas -v``);
    so does the warp-specialized form (128x128 and 128x64 tiles, 4 warps, 2 and 3 stages), and it is specialized:
    a ``ttg.warp_specialize`` region, ``setmaxnreg``, 12 warps."""
    from sm90 import compile_for_sm90

    compile_for_sm90(_COMPILE_TMA_FOR_SM90)
