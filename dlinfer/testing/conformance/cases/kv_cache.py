"""Cache writes: fill_kv_cache (float and quantized caches) and the fused rotary + cache write.

A quantized write (``quant=8|4``) is judged bit for bit like a float one: the bytes, scales and zeros follow
from the float32 rounding rules of ``dlinfer.ops.kv_quant``, which every vendor must keep exactly.
"""

from __future__ import annotations

import torch

import dlinfer.ops as ops
from dlinfer.testing.conformance.inputs import caches, qkv, quant_caches, rope_tables
from dlinfer.testing.conformance.spec import OpSpec


def _quant_fill_cases(quick):
    """Quantized writes: 8 and 4 bits, LMDeploy's [..., 2] scales/zeros and the other forms, float32 scales
    beside 16-bit values, odd head counts, NaN rows (``poison``: scale and zero NaN, bytes 0)."""
    if quick:
        return [dict(T=6, hk=2, d=16, dv=16, block=16, layout="separate", pad=1, quant=8, form="lmdeploy"),
                dict(T=5, hk=3, d=24, dv=8, block=16, layout="packed", pad=0, quant=4, form="pair", poison=True)]
    cases = []
    forms = ("lmdeploy", "pair", "stacked")
    for i, (T, hk, d, dv, block) in enumerate(((1, 8, 128, 128, 64), (37, 1, 64, 64, 16), (256, 4, 80, 80, 64),
                                               (300, 2, 128, 128, 16), (19, 3, 96, 96, 32), (64, 2, 192, 128, 64))):
        for quant in (8, 4):
            cases.append(dict(T=T, hk=hk, d=d, dv=dv, block=block, layout=("separate", "packed", "head_major")[i % 3],
                              pad=min(i % 3, T - 1), quant=quant, form=forms[(i + quant) % 3],
                              scales_fp32=(i == 2), poison=(i % 2 == 1), idx=(torch.int32, torch.int64)[i % 2]))
    return cases


def _fill_cases(quick):
    if quick:
        return [dict(T=5, hk=2, d=16, dv=16, block=16, layout="separate", pad=0),
                dict(T=7, hk=1, d=16, dv=8, block=32, layout="packed", pad=2),
                dict(T=4, hk=2, d=8, dv=8, block=16, layout="head_major", pad=1, fused_kv=True,
                     idx=torch.int64)] + _quant_fill_cases(True)
    cases = _quant_fill_cases(False)
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
    quant = None
    if p.get("quant"):
        quant = quant_caches(rnd, num_blocks, block, hk, d, dv, p["quant"], p["layout"],
                             torch.float32 if p.get("scales_fp32") else dtype, p["form"])
        k_cache, v_cache, buffers = quant["k_cache"], quant["v_cache"], quant["buffers"]
    else:
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
    if quant is not None:
        inputs.update(quant=quant, bits=p["quant"])
        inputs["k"][T // 2, hk - 1] = 1.5  # a constant head: stored exactly
        if p.get("poison"):  # in tokens that are written
            live = (inputs["slots"] >= 0).nonzero()[:, 0].tolist()
            inputs["k"][live[0], 0, d - 1] = float("nan")
            inputs["v"][live[-1], hk - 1, 0] = float("inf")
    return inputs


def _fill_run(x):
    if "quant" in x:
        q = x["quant"]
        kc, vc = ops.fill_kv_cache(x["k"], x["v"], x["k_cache"], x["v_cache"], x["slots"], q["fill_k"], q["fill_v"],
                                   x["bits"])
    else:
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
