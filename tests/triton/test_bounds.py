"""Every memory access of the Triton vendor's kernels stays inside the tensors of its launch (``bounds.py``: a
bounds-checking mode of Triton's interpreter, which otherwise reads and writes raw process memory and so lets an
out-of-range lane pass silently where a GPU reads another buffer or faults).

First the checker itself, on deliberately broken tiny kernels (a load one past the end, a store past a short
output, a negative offset, a load without a mask, an atomic, a tile running into a neighbouring tensor, an int32
offset that wraps) and on legal ones that look alike (masked-off lanes far out of range, a view read past its own
end inside its storage). Then the conformance quick matrix of every Triton op under it, in the interpreter's loop
form and the GPU's (``gpu_loops``), and the quantized-cache cases (8 and 4 bits) with the tile configs a GPU picks
(128x64 prefill tiles, split and not, decode with 64-key tiles over 16-token pages, the fused reduce's atomics),
plus the Hopper TMA prefill kernels. Last, the compiled code: the 4-bit paged-prefill case that failed on an H200,
compiled for sm_90 as the launcher specializes it, its PTX emulated on the case's data (``emulate_ptx``), touches
exactly the interpreter's bytes; the emulator itself is proven on a tiny kernel given out-of-range arguments."""

from __future__ import annotations

import collections
import contextlib
import dataclasses

import pytest
import torch
import triton
import triton.language as tl

from bounds import OutOfBounds, bounds_checked, emulate_ptx, gpu_loops
from dlinfer.testing.conformance.cases import SPECS
from dlinfer.testing.conformance import runner
from dlinfer.testing.conformance.runner import ALL_OPS, run_case
from dlinfer.vendor import registry
from dlinfer.vendor.triton import attention_decode as ad
from dlinfer.vendor.triton import attention_prefill as ap

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# The checker on tiny kernels


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n_load, n_store, shift, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(src_ptr + offs - shift, mask=offs < n_load, other=0.0)
    tl.store(dst_ptr + offs, x, mask=offs < n_store)


@triton.jit
def _load_all(ptr, BLOCK: tl.constexpr):
    return tl.load(ptr + tl.arange(0, BLOCK))


@triton.jit
def _unmasked_kernel(src_ptr, dst_ptr, BLOCK: tl.constexpr):
    tl.store(dst_ptr + tl.arange(0, BLOCK), _load_all(src_ptr, BLOCK))  # the load inside a @jit helper


@triton.jit
def _atomic_kernel(ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.atomic_add(ptr + offs, 1, mask=offs < n)


@triton.jit
def _cas_kernel(ptr, index):
    tl.atomic_cas(ptr + index, 0, 1)


@triton.jit
def _two_tensors_kernel(a_ptr, b_ptr, out_ptr, delta, BLOCK: tl.constexpr):
    """Lanes 0..3 read ``a``; the others read ``a_ptr + delta + lane``, i.e. ``b`` (b_ptr is not used)."""
    offs = tl.arange(0, BLOCK).to(tl.int64)
    x = tl.load(a_ptr + tl.where(offs < 4, offs, delta + offs))
    tl.store(out_ptr + offs, x)


@triton.jit
def _int32_offsets_kernel(src_ptr, dst_ptr, stride, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    offs = rows * stride  # int32: wraps for a large stride
    x = tl.load(src_ptr + offs, mask=rows == 0, other=0.0)
    tl.store(dst_ptr + rows, x, mask=rows == 0)


@triton.jit
def _range_kernel(src_ptr, dst_ptr, n, WHILE_LOOP: tl.constexpr):
    stop = tl.load(src_ptr + 1).to(tl.int32) * 0 + n  # a runtime loop bound
    if WHILE_LOOP:
        i = stop * 0
        while i < stop:
            tl.store(dst_ptr + i, tl.load(src_ptr + i))
            i += 1
    else:
        for i in range(0, stop):
            tl.store(dst_ptr + i, tl.load(src_ptr + i))


def test_in_bounds_accesses_pass_and_are_counted():
    src, dst = torch.arange(10, dtype=torch.float32), torch.zeros(10)
    with bounds_checked() as log:
        _copy_kernel[(1,)](src, dst, 10, 10, 0, BLOCK=64)  # lanes 10..63 masked off: never checked
    assert torch.equal(dst, src)
    assert log.accesses == 2 and log.launches == ["_copy_kernel"] and not log.violations


def test_a_load_one_past_the_end_raises_with_the_kernel_argument_and_lane():
    src, dst = torch.arange(10, dtype=torch.float32), torch.zeros(11)
    with pytest.raises(OutOfBounds) as err, bounds_checked():
        _copy_kernel[(1,)](src, dst, 11, 10, 0, BLOCK=16)
    text = str(err.value)
    assert "_copy_kernel(0, 0, 0): load of fp32" in text and "1 of 11 active lanes" in text
    assert "nearest argument 'src_ptr'" in text and "lane (10,): src_ptr+10 elements (past its storage's end" in text


def test_a_store_past_the_output_and_a_negative_offset_raise():
    src, dst = torch.arange(16, dtype=torch.float32), torch.zeros(8)
    with pytest.raises(OutOfBounds, match=r"store of fp32 out of bounds in 8 of 16 .*dst_ptr\+8 elements"), \
            bounds_checked():
        _copy_kernel[(1,)](src, dst, 16, 16, 0, BLOCK=16)
    with pytest.raises(OutOfBounds, match=r"load of fp32 .* src_ptr-2 elements \(before its storage"), \
            bounds_checked():
        _copy_kernel[(1,)](src, torch.zeros(16), 16, 16, 2, BLOCK=16)


def test_a_view_read_past_its_end_inside_its_storage_is_legal():
    """Aliased views and reads past a view into its own buffer (a packed K|V cache) are not violations."""
    base = torch.arange(16, dtype=torch.float32)
    dst = torch.zeros(8)
    with bounds_checked() as log:
        _copy_kernel[(1,)](base[:4], dst, 8, 8, 0, BLOCK=8)
        _copy_kernel[(1,)](base[8:], base[:8], 8, 8, 0, BLOCK=8)  # output aliases the input's storage
    assert not log.violations and log.accesses == 4


def test_an_unmasked_load_and_atomics_are_checked():
    with pytest.raises(OutOfBounds, match="load of fp16 out of bounds in 4 of 16"), bounds_checked():
        _unmasked_kernel[(1,)](torch.zeros(12, dtype=torch.float16), torch.zeros(16, dtype=torch.float16), BLOCK=16)
    counters = torch.zeros(6, dtype=torch.int32)
    with bounds_checked():
        _atomic_kernel[(1,)](counters, 6, BLOCK=8)
    assert counters.tolist() == [1] * 6
    with pytest.raises(OutOfBounds, match=r"atomic_rmw of int32 .* ptr\+6 elements"), bounds_checked():
        _atomic_kernel[(1,)](counters, 7, BLOCK=8)
    with pytest.raises(OutOfBounds, match=r"atomic_cas of int32 .* ptr\+9 elements"), bounds_checked():
        _cas_kernel[(1,)](counters, 9)


def test_violations_can_be_collected_instead_of_raised():
    src, dst = torch.arange(4, dtype=torch.float32), torch.zeros(8)
    with bounds_checked(raise_on_violation=False) as log:
        _copy_kernel[(2,)](src, dst, 8, 8, 0, BLOCK=8)  # two programs, each loads 4 lanes out of bounds
    assert len(log.violations) == 2
    assert "_copy_kernel(0, 0, 0)" in log.violations[0] and "_copy_kernel(1, 0, 0)" in log.violations[1]


def test_a_tile_running_into_another_tensor_is_caught():
    """Lanes past ``a`` that land inside ``b`` are in bounds of *some* argument; one access never spans two
    tensors legitimately, so it is reported (unless ``one_storage=False``)."""
    a, b = torch.zeros(4), torch.ones(4)
    delta = (b.data_ptr() - a.data_ptr()) // 4 - 4
    assert (b.data_ptr() - a.data_ptr()) % 4 == 0
    out = torch.empty(8)
    with pytest.raises(OutOfBounds, match=r"spans the storages of \['a_ptr', 'b_ptr'\]"), bounds_checked():
        _two_tensors_kernel[(1,)](a, b, out, delta, BLOCK=8)
    with bounds_checked(one_storage=False) as log:
        _two_tensors_kernel[(1,)](a, b, out, delta, BLOCK=8)
    assert out.tolist() == [0.0] * 4 + [1.0] * 4 and not log.violations


def test_an_int32_offset_that_wraps_is_caught():
    src, dst = torch.zeros(4), torch.zeros(4)
    with bounds_checked(int32_overflow=True) as log:
        _int32_offsets_kernel[(1,)](src, dst, 1 << 20, BLOCK=4)  # 3 << 20 fits in int32
    assert not log.violations
    with pytest.raises(OutOfBounds, match=r"int32 mul wraps around in 2 lanes .*lane \(2,\): 2147483648"), \
            bounds_checked(int32_overflow=True):
        _int32_offsets_kernel[(1,)](src, dst, 1 << 30, BLOCK=4)
    with bounds_checked() as log:  # off by default
        _int32_offsets_kernel[(1,)](src, dst, 1 << 30, BLOCK=4)
    assert not log.violations


def test_gpu_loops_runs_the_for_loops_a_gpu_compiles():
    """Inside ``gpu_loops`` a kernel's ``WHILE_LOOP=True`` becomes False and ``range()`` over a runtime bound
    works (outside it, Triton 3.6's interpreter refuses a runtime bound in ``range()`` and 3.7's takes it: not
    asserted here)."""
    src, dst = torch.arange(10, dtype=torch.float32), torch.zeros(10)
    with gpu_loops() as switched:
        _range_kernel[(1,)](src, dst, 10, WHILE_LOOP=True)
    assert switched == ["_range_kernel"] and torch.equal(dst, src)
    dst.zero_()
    _range_kernel[(1,)](src, dst, 10, WHILE_LOOP=True)  # restored: the while loop
    assert torch.equal(dst, src)


def test_no_checks_outside_the_block():
    src, dst = torch.arange(16, dtype=torch.float32), torch.zeros(16)
    with bounds_checked() as log:
        pass
    _copy_kernel[(1,)](src[:12], dst, 16, 16, 0, BLOCK=16)  # reads past the view, inside its storage: harmless
    assert log.accesses == 0


# ---------------------------------------------------------------------------------------------------------------
# The Triton vendor's kernels under the checker


def _checked_cases(op, cases, dtypes, seed, loops="interpreter"):
    """Run ``cases`` of ``op`` (Triton vs the reference) under the bounds checker, with the kernels' interpreter
    loops or (``loops="gpu"``) the ``for`` loops a GPU compiles; returns (failures, launches, checked accesses by
    kind)."""
    bad, launches, kinds = [], [], collections.Counter()
    for i, p in enumerate(cases):
        for j, dtype in enumerate(dtypes):
            with gpu_loops() if loops == "gpu" else contextlib.nullcontext(), \
                    bounds_checked(raise_on_violation=False, int32_overflow=True) as log:
                r = run_case("triton", op, p, dtype, CPU, seed + 7919 * i + j)
            launches += log.launches
            kinds += log.kinds
            if log.violations or r.status not in ("pass", "skipped"):
                bad.append(f"{op} [{r.case}] {r.dtype}: {r.status} {r.detail[:300]} {log.violations[:2]}")
    return bad, launches, kinds


TRITON_OPS = [op for op in ALL_OPS if registry.get_vendor("triton").provides(op)]


@pytest.mark.parametrize("loops", ["interpreter", "gpu"])
@pytest.mark.parametrize("op", TRITON_OPS)
def test_every_triton_op_quick_matrix_stays_in_bounds(op, loops):
    """Every quick case in the three dtypes; the kernels' interpreter loops and the loops a GPU runs."""
    bad, launches, _ = _checked_cases(op, SPECS[op].cases(True), (torch.float32, torch.float16, torch.bfloat16),
                                      100, loops)
    assert not bad, bad
    if op in ("fill_kv_cache", "prefill_attention", "paged_prefill_attention", "paged_decode_attention",
              "fused_moe", "rms_norm"):
        assert launches, f"{op}: no Triton kernel ran"


def _gpu_prefill(monkeypatch, tiles=None, splits=1, **fields):
    """The prefill launch config a GPU picks (tiles and warps from the CUDA branch of ``_config``), optionally with
    other tiles and a forced number of splits."""
    gpu_config = ap._config.__wrapped__

    def config(device_type, dtype, *args):
        cfg = gpu_config("cuda-like", dtype, *args)  # any device type but "cpu": the GPU's tiles
        if tiles:
            cfg = dataclasses.replace(cfg, block_m=tiles[0], block_n=tiles[1])
        return dataclasses.replace(cfg, splits=splits, pdl=False, **fields)

    monkeypatch.setattr(ap, "_config", config)


def _quant_cases(op, full_too=False):
    cases = [p for p in SPECS[op].cases(True) if p.get("quant")]
    if full_too:  # the full matrix's 4-bit GQA-16 head size 80 case (padded to 128; block 64; 1000 + 200 tokens)
        cases += [p for p in SPECS[op].cases(False) if p.get("quant") == 4 and p["hk"] == 1 and p["d"] == 80]
    return cases


@pytest.mark.parametrize("tiles", [None, (64, 64), (64, 32), (32, 64)], ids=["gpu", "64x64", "64x32", "32x64"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("loops", ["interpreter", "gpu"])
def test_quantized_paged_prefill_with_gpu_tiles_stays_in_bounds(monkeypatch, tiles, splits, loops):
    """The 4-bit case that failed on an H200 (head size 24 padded to 32, GQA 4, packed cache, stacked scales) and
    the 8-bit one, with the GPU's 128x64 tiles and others, direct and split, in both loop forms."""
    _gpu_prefill(monkeypatch, tiles, splits)
    cases = _quant_cases("paged_prefill_attention", full_too=tiles is None and splits == 3 and loops == "gpu")
    bad, launches, _ = _checked_cases("paged_prefill_attention", cases, (torch.float32, torch.float16), 40, loops)
    assert not bad, bad
    kernel = "_prefill_split_kernel" if splits > 1 else "_prefill_kernel"
    assert kernel in launches


@pytest.mark.parametrize("splits", [1, 3])
def test_paged_and_varlen_prefill_with_gpu_tiles_stay_in_bounds(monkeypatch, splits):
    _gpu_prefill(monkeypatch, None, splits)
    bad = []
    for op in ("paged_prefill_attention", "prefill_attention"):
        bad += _checked_cases(op, [p for p in SPECS[op].cases(True) if not p.get("quant")],
                              (torch.float32, torch.float16), 60, "gpu")[0]
    assert not bad, bad


@pytest.mark.parametrize("loops", ["interpreter", "gpu"])
@pytest.mark.parametrize("ws", [False, True], ids=["tma", "tma_ws"])
def test_tma_prefill_stays_in_bounds(monkeypatch, ws, loops):
    """The Hopper kernel's tensor-descriptor loads (host-side descriptors, or made on the device per sequence),
    over the Hopper tests' cases (padding tokens past the last sequence, tiles running into the next one)."""
    from test_prefill_hopper import HOPPER_CASES, _case, _check

    real = ap._config
    monkeypatch.setattr(ap, "_config", lambda *args: dataclasses.replace(real(*args), tma=True, splits=0,
                                                                          warp_specialize=ws))
    with gpu_loops() if loops == "gpu" else contextlib.nullcontext(), bounds_checked(int32_overflow=True) as log:
        for hq, hk, d, dv, dtype, causal, q_lens, kv_lens in HOPPER_CASES:
            query, key, value, cu_q, cu_kv = _case(hq, hk, d, dv, dtype, q_lens, kv_lens or q_lens, hq + d + dv)
            _check(query, key, value, cu_q, cu_kv, q_lens, causal, dtype, dv)
    assert log.launches == ["_prefill_tma_kernel"] * len(HOPPER_CASES)


@pytest.mark.parametrize("fused", [False, True], ids=["two_kernels", "fused_reduce"])
def test_paged_decode_with_gpu_tiles_stays_in_bounds(monkeypatch, fused):
    """64-key tiles spanning four 16-token pages, tl.dot for every group, splits; the fused reduce's arrival
    counters (atomics)."""
    gpu = ad.DecodeConfig(block_n=64, block_h=16, use_dot=True, num_warps=4, num_stages=3, target_programs=264,
                          min_split_tokens=16, fused_reduce=fused)
    monkeypatch.setattr(ad, "_config", lambda *args: gpu)
    bad, launches, kinds = _checked_cases("paged_decode_attention", SPECS["paged_decode_attention"].cases(True),
                                          (torch.float32, torch.float16), 90, "gpu")
    assert not bad, bad
    assert "_decode_split_kernel" in launches
    assert (kinds["atomic_rmw"] > 0) == fused  # the arrival counters


# ---------------------------------------------------------------------------------------------------------------
# The compiled kernels: the sm_90 PTX of the 4-bit case, emulated on its data, touches the interpreter's bytes


def _compile_ptx(records, tmp_path) -> list[str]:
    """The sm_90 PTX of each recorded launch, compiled (in a fresh process, without the interpreter) with the
    specialization Triton's CUDA launcher gives its arguments."""
    import json

    from sm90 import compile_for_sm90

    specs = []
    for i, rec in enumerate(records):
        signature, constexprs, divisible = rec.signature()
        specs.append(dict(module=rec.module, kernel=rec.kernel, signature=signature, constexprs=constexprs,
                          divisible=divisible, options=rec.options, ptx=str(tmp_path / f"{i}.ptx")))
    (tmp_path / "spec.json").write_text(json.dumps(specs))
    compile_for_sm90(f"""
import importlib, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for k in json.load(open({str(tmp_path / "spec.json")!r})):
    fn = getattr(importlib.import_module(k["module"]), k["kernel"])
    attrs = {{(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in k["divisible"]}}
    source = ASTSource(fn, k["signature"], constexprs=k["constexprs"], attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=k["options"])
    open(k["ptx"], "w").write(compiled.asm["ptx"])
print("compiled")
""")
    return [open(spec["ptx"]).read() for spec in specs]


@pytest.mark.parametrize("dtype,splits", [(torch.float16, 1), (torch.float16, 3), (torch.bfloat16, 1)],
                         ids=["fp16", "fp16-split3", "bf16"])
def test_compiled_4bit_prefill_touches_the_interpreters_bytes(monkeypatch, tmp_path, dtype, splits):
    """The quick matrix's 4-bit paged-prefill case that failed on an H200 (head size 24 padded to 32, GQA 4,
    packed cache, stacked scales): its kernels (split: the split kernel and the combine) compiled for sm_90 with
    the launcher's specialization, their PTX emulated thread by thread on the case's data, read and write
    exactly the bytes the interpreter's run of the GPU loop form reads and writes, program by program, and never
    an address outside the launch's tensors."""
    _gpu_prefill(monkeypatch, None, splits)
    monkeypatch.setattr(runner, "interpreter_skip", lambda vendor, op, dtype: None)  # bf16 dots: conftest's patch
    case = next(p for p in SPECS["paged_prefill_attention"].cases(True) if p.get("quant") == 4 and p["d"] == 24)
    with gpu_loops(), bounds_checked(record=True) as log:
        result = run_case("triton", "paged_prefill_attention", case, dtype, CPU, 40)
    assert result.status == "pass", result.detail
    want = ["_prefill_split_kernel", "_prefill_combine_kernel"] if splits > 1 else ["_prefill_kernel"]
    assert [r.kernel for r in log.records] == want
    for record, ptx in zip(log.records, _compile_ptx(log.records, tmp_path)):
        assert record.touched
        for program, touched in sorted(record.touched.items()):
            got = emulate_ptx(ptx, record, program)
            for kind in ("load", "store"):
                assert got[kind] == touched.get(kind, set()), (record.kernel, program, kind)


def test_the_ptx_emulator_sees_what_the_compiled_kernel_touches(tmp_path):
    """On a tiny kernel: the emulated PTX touches the recorded bytes; with a length past the input (the same
    compiled code, other arguments) it reads outside the launch's tensors, which raises; with the lanes shifted
    inside the storage, the bytes differ from the record."""
    src, dst = torch.arange(10, dtype=torch.float32), torch.zeros(10)
    with bounds_checked(record=True) as log:
        _copy_kernel[(1,)](src, dst, 10, 10, 0, BLOCK=16, num_warps=1)
    record, = log.records
    assert record.signature()[0]["src_ptr"] == "*fp32" and record.options == {"num_warps": 1}
    ptx, = _compile_ptx(log.records, tmp_path)
    got = emulate_ptx(ptx, record, (0, 0, 0))
    assert got == {kind: record.touched[(0, 0, 0)][kind] for kind in ("load", "store")}
    assert len(got["load"]) == len(got["store"]) == 40
    record.args["n_load"] = ("value", 11)
    with pytest.raises(OutOfBounds, match="outside every tensor of the launch"):
        emulate_ptx(ptx, record, (0, 0, 0))
    record.args["n_load"] = ("value", 10)
    record.args["shift"] = ("value", -2)  # reads src[2:12]: past the end again
    with pytest.raises(OutOfBounds):
        emulate_ptx(ptx, record, (0, 0, 0))
    record.args["n_load"] = ("value", 8)
    assert emulate_ptx(ptx, record, (0, 0, 0))["load"] != record.touched[(0, 0, 0)]["load"]
