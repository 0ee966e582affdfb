"""Cache writes: fill_kv_cache and the fused rotary + cache write."""

from __future__ import annotations

import torch

import dlinfer.ops as ops
from dlinfer.testing.conformance.inputs import caches, qkv, rope_tables
from dlinfer.testing.conformance.spec import OpSpec


def _fill_cases(quick):
    if quick:
        return [dict(T=5, hk=2, d=16, dv=16, block=16, layout="separate", pad=0),
                dict(T=7, hk=1, d=16, dv=8, block=32, layout="packed", pad=2),
                dict(T=4, hk=2, d=8, dv=8, block=16, layout="head_major", pad=1, fused_kv=True, idx=torch.int64)]
    cases = []
    layouts = ("separate", "packed", "head_major")
    for i, block in enumerate((16, 32, 64, 128)):
        for j, (d, dv) in enumerate(((64, 64), (80, 80), (128, 128), (256, 256), (192, 128))):
            T = (1, 37, 256, 2049)[(i + j) % 4]
            cases.append(dict(T=T, hk=(8, 1, 4, 2, 16)[j], d=d, dv=dv, block=block,
                              layout=layouts[(i + j) % 3], pad=min((0, 3)[(i * j) % 2], T - 1),  # a token to write
                              fused_kv=bool((i + j) % 2), idx=(torch.int32, torch.int64)[i % 2]))
    return cases


def _fill_build(p, dtype, rnd, rotary=False):
    T, hk, d, dv, block = p["T"], p["hk"], p["d"], p["dv"], p["block"]
    num_blocks = (T + block - 1) // block + 2
    k_cache, v_cache, buffers = caches(rnd, num_blocks, block, hk, d, dv, dtype, p["layout"])
    slots = rnd.perm(num_blocks * block)[:T]
    if p["pad"]:
        slots[rnd.perm(T)[: p["pad"]]] = -1
    inputs = {"k_cache": k_cache, "v_cache": v_cache, "buffers": buffers,
              "slots": slots.to(rnd.device, p.get("idx", torch.int32))}
    if rotary:
        hq = p["hq"]
        q, k, v, buf = qkv(rnd, T, hq, hk, d, dv, dtype, p.get("fused_kv", False))
        cos, sin = rope_tables(rnd, T, d, dtype)
        inputs.update(q=q, k=k, v=v, qkv=buf, cos=cos, sin=sin)
    elif p.get("fused_kv"):
        buf = rnd.normal(T, hk * (d + dv), dtype=dtype)
        inputs.update(k=buf[:, : hk * d].view(T, hk, d), v=buf[:, hk * d:].view(T, hk, dv))
    else:
        inputs.update(k=rnd.normal(T, hk, d, dtype=dtype), v=rnd.normal(T, hk, dv, dtype=dtype))
    return inputs


def _fill_run(x):
    kc, vc = ops.fill_kv_cache(x["k"], x["v"], x["k_cache"], x["v_cache"], x["slots"])
    if kc is not x["k_cache"] or vc is not x["v_cache"]:
        raise AssertionError("fill_kv_cache must return the cache objects it was given")
    return {f"cache_buffer{i}": b for i, b in enumerate(x["buffers"])}


def _rotary_fill_cases(quick):
    if quick:
        return [dict(T=5, hq=4, hk=2, d=16, dv=16, block=16, layout="packed", pad=1, fused_kv=True),
                dict(T=3, hq=8, hk=1, d=8, dv=8, block=32, layout="separate", pad=0)]
    return [dict(T=T, hq=hq, hk=hk, d=d, dv=d, block=block, layout=layout, pad=pad, fused_kv=fused)
            for T, hq, hk, d, block, layout, pad, fused in (
                (1, 32, 8, 128, 64, "packed", 0, True), (37, 28, 4, 128, 16, "separate", 3, True),
                (256, 16, 16, 64, 32, "head_major", 0, False), (2049, 32, 8, 128, 128, "packed", 5, True),
                (64, 8, 1, 80, 16, "separate", 1, True), (19, 16, 2, 256, 64, "packed", 0, True))]


def _rotary_fill_run(x):
    q, k = ops.apply_rotary_pos_emb_fill_kv_cache(x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["cos"],
                                                   x["sin"], x["slots"])
    out = {f"cache_buffer{i}": b for i, b in enumerate(x["buffers"])}
    if x["qkv"] is not None:
        out["qkv_buffer"] = x["qkv"]
    else:
        out.update(query=q, key=k)
    return out


SPECS: dict[str, OpSpec] = {
    "fill_kv_cache": OpSpec("exact", _fill_cases, _fill_build, _fill_run),
    "apply_rotary_pos_emb_fill_kv_cache": OpSpec(
        "elementwise", _rotary_fill_cases, lambda p, dt, r: _fill_build(p, dt, r, rotary=True), _rotary_fill_run),
}
