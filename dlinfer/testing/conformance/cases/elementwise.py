"""Activation, RMS norm and rotary embedding cases."""

from __future__ import annotations

import torch

import dlinfer.ops as ops
from dlinfer.testing.conformance.inputs import qkv, rope_tables
from dlinfer.testing.conformance.spec import OpSpec


def _silu_cases(quick):
    if quick:
        return [dict(shape=(3, 14)), dict(shape=(2, 3, 32), strided=True)]
    return [dict(shape=(1, 2 * 14336)), dict(shape=(7, 2 * 1000)), dict(shape=(257, 2 * 4096)),
            dict(shape=(13, 2 * 129)), dict(shape=(2, 5, 2 * 64), strided=True), dict(shape=(1024, 2 * 1408))]


def _silu_build(p, dtype, rnd):
    shape = p["shape"]
    if p.get("strided"):
        buf = rnd.normal(*shape[:-1], shape[-1] + 8, dtype=dtype)
        return {"x": buf[..., : shape[-1]]}
    return {"x": rnd.normal(*shape, dtype=dtype)}


def _norm_cases(quick):
    if quick:
        return [dict(shape=(3, 17), eps=1e-6), dict(shape=(2, 2, 32), eps=1e-5, strided=True),
                dict(shape=(4, 24), eps=1e-6, weight_fp32=True)]
    return [dict(shape=(1, 4096), eps=1e-6), dict(shape=(257, 4096), eps=1e-5), dict(shape=(13, 5120), eps=1e-6),
            dict(shape=(64, 129), eps=1e-6), dict(shape=(3, 7, 2048), eps=1e-6, strided=True),
            dict(shape=(1000, 8192), eps=1e-5), dict(shape=(7, 4096), eps=1e-6, weight_fp32=True)]


def _norm_build(p, dtype, rnd, residual=False):
    shape = p["shape"]
    if p.get("strided"):
        hidden = rnd.normal(*shape[:-1], shape[-1] + 16, dtype=dtype)[..., : shape[-1]]
    else:
        hidden = rnd.normal(*shape, dtype=dtype)
    weight_dtype = torch.float32 if p.get("weight_fp32") else dtype  # a float32 weight is accepted with any input
    inputs = {"hidden": hidden, "weight": (1.0 + rnd.normal(shape[-1], scale=0.1)).to(weight_dtype), "eps": p["eps"]}
    if residual:
        inputs["residual"] = rnd.normal(*shape, dtype=dtype)
    return inputs


def _rotary_cases(quick):
    if quick:
        return [dict(T=5, hq=4, hk=2, d=16, fused=True), dict(T=3, hq=8, hk=1, d=8, fused=False, table3d=True)]
    cases = []
    for i, d in enumerate((64, 80, 96, 128, 256)):
        hq, hk = ((32, 8), (28, 4), (16, 16), (8, 1), (32, 32))[i]
        for T in (1, 37, 1024):
            cases.append(dict(T=T, hq=hq, hk=hk, d=d, fused=(T != 37), table3d=(T == 1)))
    return cases


def _rotary_build(p, dtype, rnd):
    q, k, v, buf = qkv(rnd, p["T"], p["hq"], p["hk"], p["d"], p["d"], dtype, p["fused"])
    cos, sin = rope_tables(rnd, p["T"], p["d"], dtype)
    if p.get("table3d"):
        cos, sin = cos[None], sin[None]
    return {"q": q, "k": k, "buf": buf, "cos": cos, "sin": sin}


def _rotary_run(x):
    q, k = ops.apply_rotary_pos_emb(x["q"], x["k"], x["cos"], x["sin"])
    if q is not x["q"] or k is not x["k"]:
        raise AssertionError("apply_rotary_pos_emb must return the query and key objects it was given")
    return {"qkv_buffer": x["buf"]} if x["buf"] is not None else {"query": q, "key": k}


SPECS: dict[str, OpSpec] = {
    "silu_and_mul": OpSpec("elementwise", _silu_cases, _silu_build, lambda x: {"out": ops.silu_and_mul(x["x"])}),
    "rms_norm": OpSpec("elementwise", _norm_cases, _norm_build,
                       lambda x: {"out": ops.rms_norm(x["hidden"], x["weight"], x["eps"])}),
    "add_rms_norm": OpSpec(
        "elementwise", _norm_cases, lambda p, dt, r: _norm_build(p, dt, r, residual=True),
        lambda x: dict(zip(("normed", "added"), ops.add_rms_norm(x["hidden"], x["residual"], x["weight"], x["eps"])))),
    "apply_rotary_pos_emb": OpSpec("elementwise", _rotary_cases, _rotary_build, _rotary_run),
}
