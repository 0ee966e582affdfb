"""Quantized linear-family cases (AWQ W4A16, W8A8). Packed int4 words are random int32 (every word is a valid pack of
8 nibbles); int8 weights are random in -127..127; scales are positive."""

from __future__ import annotations

import torch

import dlinfer.ops as ops
from dlinfer.testing.conformance.spec import OpSpec


def _int8(rnd, *shape):
    return rnd.ints(-127, 128, *shape).to(torch.int8).to(rnd.device)


def _pos(rnd, *shape, scale):
    return rnd.normal(*shape).abs().add(0.5).mul(scale)


def _awq_cases(quick):
    if quick:
        # the last: one row, K long enough that the split-K rule splits it on any device (a GPU compiles the
        # split's reduce for M == 1, a constant there)
        return [dict(M=3, K=64, N=16, group=32, bias=True, zeros=True), dict(M=1, K=128, N=24, group=64, bias=False,
                                                                          zeros=False),
                dict(M=5, K=256, N=8, group=128, bias=False, zeros=True),
                dict(M=1, K=1024, N=64, group=128, bias=True, zeros=True)]
    return [dict(M=m, K=4096, N=4096, group=128, bias=False, zeros=True) for m in (1, 16, 257)] + \
        [dict(M=33, K=1024, N=520, group=g, bias=True, zeros=True) for g in (32, 64)]


def _awq_build(p, dtype, rnd):
    k, n, g = p["K"], p["N"], p["group"]
    words = rnd.ints(-2 ** 31, 2 ** 31 - 1, k, n // 8).to(torch.int32).to(rnd.device)
    zeros = rnd.ints(-2 ** 31, 2 ** 31 - 1, k // g, n // 8).to(torch.int32).to(rnd.device) if p["zeros"] else None
    return {"x": rnd.normal(p["M"], k, dtype=dtype), "qweight": words,
            "scale": _pos(rnd, k // g, n, scale=0.1 * k ** -0.5).to(dtype), "offset": zeros,
            "bias": rnd.normal(n, dtype=dtype) if p["bias"] else None, "group": g}


def _awq_run(x):
    return {"out": ops.weight_quant_matmul(x["x"], x["qweight"], x["scale"], offset=x["offset"], bias=x["bias"],
                                           group_size=x["group"])}


def _rows_cases(quick):
    if quick:
        return [dict(shape=(5, 32), zero_row=True), dict(shape=(2, 3, 17), zero_row=False)]
    return [dict(shape=(1, 4096), zero_row=False), dict(shape=(257, 4096), zero_row=True),
            dict(shape=(4096, 14336), zero_row=False)]


def _rows_build(p, dtype, rnd):
    x = rnd.normal(*p["shape"], dtype=dtype)
    if p["zero_row"]:
        x[1].zero_()
    h = p["shape"][-1]
    return {"x": x, "residual": rnd.normal(*p["shape"], dtype=dtype), "w": rnd.normal(h, dtype=dtype).add(1.0)}


def _w8a8_cases(quick):
    if quick:
        return [dict(shape=(4, 32), N=24, bias=True, flat_scale=False), dict(shape=(2, 3, 16), N=8, bias=False,
                                                                             flat_scale=True),
                dict(shape=(1, 1024), N=64, bias=True, flat_scale=False)]  # one row, K split (see _awq_cases)
    return [dict(shape=(m, 4096), N=n, bias=False, flat_scale=False) for m in (1, 256, 4096)
            for n in (6144, 4096)]


def _w8a8_build(p, dtype, rnd):
    k, n = p["shape"][-1], p["N"]
    m = 1
    for s in p["shape"][:-1]:
        m *= s
    rms_scale = _pos(rnd, m, scale=0.02)
    return {"a": _int8(rnd, *p["shape"]), "b": _int8(rnd, n, k),
            "rms_scale": rms_scale if p["flat_scale"] else rms_scale.reshape(m, 1),
            "linear_scale": _pos(rnd, n, 1, scale=0.01 * k ** -0.5), "bias": rnd.normal(n, dtype=dtype)
            if p["bias"] else None, "dtype": dtype,
            "x": rnd.normal(*p["shape"], dtype=dtype), "input_scale": torch.full((1,), 0.03, device=rnd.device,
                                                                                 dtype=dtype),
            "input_offset": torch.full((1,), 3, dtype=torch.int8, device=rnd.device),
            "quant_bias": rnd.ints(-5000, 5000, n).to(torch.int32).to(rnd.device) if p["bias"] else None}


def _moe_cases(quick):
    """Routing: ``distinct`` experts per token, ``repeat`` (a token's second slot repeats its first expert: counted
    twice) or ``skew`` (expert 0 gets every token: in the full matrix enough rows for the wide-tile hot class)."""
    if quick:
        return [dict(T=5, H=32, I=16, E=4, topk=2, renormalize=True, route="distinct"),
                dict(T=7, H=40, I=24, E=6, topk=3, renormalize=False, route="repeat"),
                dict(T=9, H=48, I=8, E=5, topk=2, renormalize=True, route="skew")]
    return [dict(T=t, H=2048, I=768, E=16, topk=4, renormalize=True, route="distinct") for t in (1, 64)] + \
        [dict(T=300, H=1024, I=352, E=8, topk=2, renormalize=False, route="skew"),
         dict(T=33, H=520, I=200, E=8, topk=8, renormalize=True, route="repeat")]


def _moe_build(p, dtype, rnd):
    t, h, i, e = p["T"], p["H"], p["I"], p["E"]
    ids = torch.stack([rnd.perm(e)[:p["topk"]] for _ in range(t)]).to(rnd.device)
    if p["route"] == "repeat":
        ids[:, 1] = ids[:, 0]
    elif p["route"] == "skew":  # expert 0 first for every token, the others keep distinct experts
        ids = torch.where(ids == 0, ids[:, :1], ids)
        ids[:, 0] = 0
    return {"x": rnd.normal(t, h, dtype=dtype), "gu": _int8(rnd, e, 2 * i, h), "dw": _int8(rnd, e, h, i),
            "gs": _pos(rnd, e, 2 * i, 1, scale=0.5 / 127 * h ** -0.5), "ds": _pos(rnd, e, h, 1, scale=0.5 / 127 * i ** -0.5),
            "w": rnd.normal(t, p["topk"]).abs(), "ids": ids, "topk": p["topk"], "renormalize": p["renormalize"]}


def _moe_run(x):
    return {"out": ops.fused_moe_w8a8(x["x"], x["gu"], x["gs"], x["dw"], x["ds"], x["w"], x["ids"], x["topk"],
                                      x["renormalize"])}


def _q(result, names):
    """Outputs by name; the int8 values go out as int32 (the comparison leaves integer outputs to ``_q_check``)."""
    out = dict(zip(names, result))
    out["q"] = out["q"].to(torch.int32)
    return out


def _q_check(out, ref, inputs, dtype):
    """Rounding at a tie may differ between implementations: every quantized value within 1 of the reference's,
    and at most 1 % of them (or 2) off by one."""
    diff = (out["q"].long() - ref["q"].long()).abs()
    if diff.numel() == 0:
        return []
    worst, off = int(diff.max()), int((diff > 0).sum())
    if worst > 1 or off > max(2, diff.numel() // 100):
        return [f"q: {off} of {diff.numel()} quantized values differ, by up to {worst} (allowed: 1, in at most 1 %)"]
    return []


SPECS: dict[str, OpSpec] = {
    "weight_quant_matmul": OpSpec("matmul", _awq_cases, _awq_build, _awq_run),
    "dynamic_quant": OpSpec("matmul", _rows_cases, _rows_build,
                            lambda x: _q(ops.dynamic_quant(x["x"], torch.int8), ("q", "scale")), _q_check),
    "linear_w8a8": OpSpec("matmul", _w8a8_cases, _w8a8_build,
                          lambda x: {"out": ops.linear_w8a8(x["a"], x["b"], x["rms_scale"], x["linear_scale"],
                                                            x["dtype"], torch.int8, x["bias"])}),
    "linear_w8a8_static": OpSpec("matmul", _w8a8_cases, _w8a8_build,
                                 lambda x: {"out": ops.linear_w8a8_static(
                                     x["x"], x["b"], x["input_scale"], x["input_offset"],
                                     x["linear_scale"].reshape(-1), x["dtype"], torch.int8, x["quant_bias"])}),
    "rms_norm_w8a8": OpSpec("matmul", _rows_cases, _rows_build,
                            lambda x: _q(ops.rms_norm_w8a8(x["x"], x["w"], 1e-6), ("q", "scale")), _q_check),
    "add_rms_norm_w8a8": OpSpec("matmul", _rows_cases, _rows_build,
                                lambda x: _q(ops.add_rms_norm_w8a8(x["x"], x["residual"], x["w"], 1e-6),
                                             ("q", "scale", "residual")), _q_check),
    "fused_moe_w8a8": OpSpec("matmul", _moe_cases, _moe_build, _moe_run),
}
