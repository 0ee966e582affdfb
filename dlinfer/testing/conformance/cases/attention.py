"""Attention cases: varlen prefill, paged (chunked) prefill, paged decode.

The paged ops also read quantized caches (``quant=8|4``: uint8 bytes, per-token scales and zeros in one of the
forms of ``inputs.quant_caches``; every slot no sequence uses has NaN scales, so a kernel that reads one fails).
"""

from __future__ import annotations

import torch

import dlinfer.ops as ops
from dlinfer.testing.conformance.inputs import mask, paged, paged_quant, qkv
from dlinfer.testing.conformance.spec import OpSpec

# A scale far above 1/sqrt(D): scores spread over hundreds, so a kernel that exponentiates before subtracting
# the row max, or applies the scale twice or not at all, fails (a refused, absurd scale is the ops' own check).
SHARP = 40.0


def _attn_output(x, mode, tokens, hq, dv, dtype, rnd):
    if mode == "given":
        return torch.full((tokens, hq, dv), float("nan"), dtype=dtype, device=rnd.device)
    if mode == "alias":
        return x["q"]
    return None


def _prefill_cases(quick):
    if quick:
        return [dict(seqs=((5, 5), (1, 1), (9, 9)), hq=8, hk=8, d=16, dv=16, causal=True, fused=True, out="none"),
                dict(seqs=((4, 4), (7, 7)), hq=8, hk=2, d=16, dv=24, causal=False, fused=False, out="given"),
                dict(seqs=((3, 6), (2, 2)), hq=8, hk=1, d=16, dv=16, causal=True, fused=False, out="alias"),
                dict(seqs=((4, 4), (5, 5)), hq=4, hk=2, d=16, dv=16, causal=True, fused=False, out="given",
                     poison=True),
                dict(seqs=((6, 9), (3, 3)), hq=4, hk=1, d=16, dv=16, causal=True, fused=False, out="none",
                     scale=SHARP),
                # head size 128 from a fused QKV buffer, padded to 2112 rows (the Triton vendor's Hopper default
                # takes calls of at least 2048 to its TMA kernel; the work stays that of 112 tokens): tiles that
                # cross into the next sequence, GQA packing, varlen, rows past the last sequence left alone
                dict(seqs=((37, 37), (5, 5), (70, 70)), hq=8, hk=2, d=128, dv=128, causal=True, fused=True,
                     out="given", poison=True, pad=2000)]
    cases = [dict(seqs=((1, 1), (129, 129), (33, 40)), hq=32, hk=8, d=128, dv=128, causal=True, fused=True,
                  out="none", poison=True),
             dict(seqs=((77, 77), (256, 256)), hq=16, hk=16, d=64, dv=64, causal=False, fused=False, out="given",
                  poison=True),
             dict(seqs=((100, 300), (64, 64)), hq=32, hk=8, d=128, dv=128, causal=True, fused=False, out="none",
                  scale=SHARP)]
    ratios = ((32, 32), (32, 8), (32, 4), (16, 1))
    for i, d in enumerate((64, 80, 96, 128, 256)):
        hq, hk = ratios[i % 4]
        cases.append(dict(seqs=((1, 1), (129, 129), (17, 17), (600, 600)), hq=hq, hk=hk, d=d, dv=d, causal=True,
                          fused=True, out="none"))
        cases.append(dict(seqs=((256, 256), (77, 77)), hq=hq, hk=hk, d=d, dv=d, causal=False, fused=False,
                          out="given"))
        cases.append(dict(seqs=((31, 100), (5, 5), (64, 1000)), hq=hq, hk=hk, d=d, dv=d, causal=True, fused=False,
                          out="alias"))
    cases.append(dict(seqs=((33, 33), (250, 250)), hq=16, hk=4, d=192, dv=128, causal=True, fused=True,
                      out="given"))
    cases.append(dict(seqs=((2048, 2048),), hq=32, hk=8, d=128, dv=128, causal=True, fused=True, out="none"))
    return cases


def _prefill_build(p, dtype, rnd):
    q_lens = [s[0] for s in p["seqs"]]
    kv_lens = [s[1] for s in p["seqs"]]
    hq, hk, d, dv = p["hq"], p["hk"], p["d"], p["dv"]
    pad = p.get("pad", 0)  # rows past the last sequence (queries and keys)
    if p["fused"] and q_lens == kv_lens:
        q, k, v, _ = qkv(rnd, sum(q_lens) + pad, hq, hk, d, dv, dtype, True)
    else:
        q = rnd.normal(sum(q_lens) + pad, hq, d, dtype=dtype)
        k = rnd.normal(sum(kv_lens) + pad, hk, d, dtype=dtype)
        v = rnd.normal(sum(kv_lens) + pad, hk, dv, dtype=dtype)
    x = {"q": q, "k": k, "v": v, "p": p, "valid": sum(q_lens),
         "q_lens": torch.tensor(q_lens, dtype=torch.int32, device=rnd.device),
         "kv_lens": torch.tensor(kv_lens, dtype=torch.int32, device=rnd.device)}
    if p.get("poison"):
        first_kv = [sum(kv_lens[:b]) for b in range(len(kv_lens))]
        _poison(q, k, v, q_row=0, k_row=first_kv[-1], v_row=first_kv[0])
    x["out"] = _attn_output(x, p["out"], q.shape[0], hq, dv, dtype, rnd)
    return x


def _poison(q, k, v, q_row, k_row, v_row):
    """NaN/Inf where the rule "NaN in, NaN out" decides the answer: NaN in one query element (that row and head
    become NaN), NaN in the FIRST key of a sequence (every query of it sees that key: the heads of KV head 0
    become NaN) and +Inf in the first value of a sequence (+Inf in that column of the heads of the last KV head;
    ``None`` skips one). Positions a query cannot see are never poisoned: what reaches those is not defined."""
    if q_row is not None:
        q[q_row, q.shape[1] - 1, 1] = float("nan")
    if k_row is not None:
        k[k_row, 0, 0] = float("nan")
    if v_row is not None:
        v[v_row, v.shape[1] - 1, 0] = float("inf")


def _prefill_run(x):
    p = x["p"]
    out = ops.prefill_attention(x["q"], x["k"], x["v"], None, None, x["q_lens"], x["kv_lens"],
                                max(s[0] for s in p["seqs"]) + 2, p["hq"], p["hk"], mask(p["causal"], x["q"].device),
                                softmax_scale=p.get("scale"), attn_output=x["out"])
    if x["out"] is not None and out is not x["out"]:
        raise AssertionError("prefill_attention must return the attn_output it was given")
    return {"out": out[: x["valid"]]}


def _paged_prefill_cases(quick):
    if quick:
        return [dict(seqs=((0, 5), (7, 3), (20, 1)), hq=8, hk=8, d=16, dv=16, block=16, layout="separate",
                     causal=True, out="none"),
                dict(seqs=((9, 4), (0, 6)), hq=8, hk=2, d=32, dv=16, block=32, layout="packed", causal=False,
                     out="given", pad=2),
                dict(seqs=((16, 2), (3, 3)), hq=8, hk=1, d=16, dv=16, block=16, layout="head_major", causal=True,
                     out="alias", tail="garbage"),
                dict(seqs=((6, 3), (0, 4), (20, 2)), hq=4, hk=2, d=16, dv=16, block=16, layout="separate",
                     causal=True, out="given", pad=1, poison=True),
                dict(seqs=((10, 3), (0, 5)), hq=4, hk=2, d=16, dv=16, block=16, layout="packed", causal=True,
                     out="none", scale=SHARP)] + _quant_cases(True, prefill=True)
    cases = _quant_cases(False, prefill=True) + [dict(seqs=((0, 129), (300, 17), (64, 64)), hq=32, hk=8, d=128, dv=128, block=64, layout="packed",
                  causal=True, out="none", poison=True),
             dict(seqs=((200, 56), (0, 300)), hq=32, hk=8, d=128, dv=128, block=16, layout="separate",
                  causal=True, out="given", scale=SHARP)]
    ratios = ((32, 32), (32, 8), (32, 4), (16, 1))
    layouts = ("separate", "packed", "head_major")
    seqs_list = (((0, 129), (300, 17), (1000, 1), (64, 64)), ((0, 512), (2000, 48)), ((5, 3), (0, 1), (4095, 200)))
    i = 0
    for d in (64, 80, 96, 128, 256):
        for block in (16, 32, 64, 128):
            hq, hk = ratios[i % 4]
            cases.append(dict(seqs=seqs_list[i % 3], hq=hq, hk=hk, d=d, dv=d, block=block, layout=layouts[i % 3],
                              causal=(i % 4 != 3), out=("none", "given", "alias")[i % 3], pad=(0, 5)[i % 2],
                              tail=("random", "garbage")[(i // 2) % 2], host_lens=(i % 5 == 0)))
            i += 1
    cases.append(dict(seqs=((100, 33), (0, 250)), hq=16, hk=4, d=192, dv=128, block=64, layout="packed",
                      causal=True, out="given"))
    return cases


def _quant_cases(quick, prefill):
    """Quantized caches (8 and 4 bits): GQA ratios, odd head sizes, block 16/64, LMDeploy's [..., 2] scales and
    the other forms, float32 scales beside 16-bit queries, NaN in a scale (``poison``)."""
    if prefill:
        quick_cases = [dict(seqs=((9, 4), (0, 6), (20, 1)), hq=8, hk=2, d=16, dv=16, block=16, layout="separate",
                            causal=True, out="none", quant=8, form="lmdeploy", poison=True),
                       dict(seqs=((16, 2), (3, 3)), hq=4, hk=1, d=24, dv=16, block=16, layout="packed", causal=True,
                            out="given", quant=4, form="stacked")]
        seqs_list = (((0, 129), (300, 17), (64, 64)), ((5, 3), (0, 1), (1000, 200)), ((0, 512), (77, 48)))
    else:
        quick_cases = [dict(lens=(1, 17, 0, 40), hq=8, hk=2, d=16, dv=16, block=16, layout="separate", out="given",
                            quant=8, form="lmdeploy", poison=True),
                       dict(lens=(33, 5), hq=4, hk=1, d=24, dv=16, block=16, layout="packed", out="none", quant=4,
                            form="stacked", tail="garbage")]
        lens_list = ((1, 17, 0, 4000, 129, 64, 65), (2048, 3), (0, 1, 300, 5000, 16, 33, 100, 7))
    if quick:
        return quick_cases
    cases = []
    shapes = ((32, 8, 128, 64), (32, 32, 128, 16), (16, 1, 80, 64), (28, 4, 96, 16), (16, 4, 192, 64),
              (8, 2, 256, 16))
    for i, (hq, hk, d, block) in enumerate(shapes):
        for quant in (8, 4):
            c = dict(hq=hq, hk=hk, d=d, dv=128 if d == 192 else d, block=block,
                     layout=("separate", "packed", "head_major")[i % 3], quant=quant,
                     form=("lmdeploy", "pair", "stacked")[(i + quant) % 3], scales_fp32=(i == 3),
                     poison=(i % 3 == 0), tail=("random", "garbage")[i % 2])
            if prefill:
                c.update(seqs=seqs_list[i % 3], causal=(i != 4), out=("none", "given", "alias")[i % 3])
            else:
                c.update(lens=lens_list[i % 3], out=("given", "none", "alias")[i % 3])
            cases.append(c)
    return cases


def _cache_inputs(p, kv_lens, dtype, rnd, index_dtype=torch.int32):
    """``(x, k_cache, v_cache, table)``: float caches with NaN in unused slots, or a quantized cache (``quant``)
    with NaN scales there; ``x`` holds what the run passes (``kv``: kv_scales, kv_zeros, quant_bits)."""
    if p.get("quant"):
        c = paged_quant(rnd, kv_lens, p["block"], p["hk"], p["d"], p["dv"], p["quant"], p["layout"],
                        torch.float32 if p.get("scales_fp32") else dtype, p["form"], index_dtype=index_dtype,
                        tail=p.get("tail", "random"))
        return ({"kv": dict(kv_scales=c["kv_scales"], kv_zeros=c["kv_zeros"], quant_bits=p["quant"]), "sz": c},
                c["k_cache"], c["v_cache"], c["table"])
    k_cache, v_cache, _, table = paged(rnd, kv_lens, p["block"], p["hk"], p["d"], p["dv"], dtype, p["layout"],
                                        index_dtype=index_dtype, tail=p.get("tail", "random"))
    return {"kv": {}}, k_cache, v_cache, table


def _paged_prefill_build(p, dtype, rnd):
    q_lens = [s[1] for s in p["seqs"]]
    kv_lens = [s[0] + s[1] for s in p["seqs"]]
    hq, dv = p["hq"], p["dv"]
    x, k_cache, v_cache, table = _cache_inputs(p, kv_lens, dtype, rnd)
    tokens = sum(q_lens) + p.get("pad", 0)
    lens_device = "cpu" if p.get("host_lens") else rnd.device
    q = rnd.normal(tokens, hq, p["d"], dtype=dtype)
    if p.get("poison"):
        _poison_cache(q, k_cache, v_cache, table, kv_lens, x.get("sz"))
    x.update({"q": q, "k_cache": k_cache, "v_cache": v_cache, "table": table,
         "p": p, "valid": sum(q_lens),
         "cu": torch.tensor(q_lens, dtype=torch.int64).cumsum(0).to(lens_device, torch.int32),
         "kv_lens": torch.tensor(kv_lens, dtype=torch.int32, device=lens_device)})
    x["out"] = _attn_output(x, p["out"], tokens, hq, dv, dtype, rnd)
    return x


def _paged_prefill_run(x):
    p = x["p"]
    out = ops.paged_prefill_attention(
        x["q"], None, None, x["k_cache"], x["v_cache"], x["table"], p["block"], x["cu"], x["kv_lens"],
        max(s[1] for s in p["seqs"]) + 3, max(s[0] + s[1] for s in p["seqs"]) + 5, p["hq"], p["hk"],
        mask(p["causal"], x["q"].device), head_size_v=p["dv"], softmax_scale=p.get("scale"), attn_output=x["out"],
        **x["kv"])
    if x["out"] is not None and out is not x["out"]:
        raise AssertionError("paged_prefill_attention must return the attn_output it was given")
    return {"out": out[: x["valid"]]}


def _decode_cases(quick):
    if quick:
        return [dict(lens=(1, 17, 0, 40), hq=8, hk=8, d=16, dv=16, block=16, layout="separate", out="given"),
                dict(lens=(33, 5), hq=8, hk=2, d=32, dv=16, block=32, layout="packed", out="none"),
                dict(lens=(20, 0, 3), hq=8, hk=1, d=16, dv=16, block=16, layout="head_major", out="alias",
                     tail="garbage", idx=torch.int64),
                dict(lens=(70, 0, 9, 40), hq=4, hk=2, d=16, dv=16, block=16, layout="separate", out="given",
                     poison=True),
                dict(lens=(70, 33), hq=2, hk=2, d=16, dv=16, block=16, layout="packed", out="none", poison=True),
                dict(lens=(50, 1, 9), hq=4, hk=2, d=16, dv=16, block=16, layout="separate", out="none",
                     scale=SHARP)] + _quant_cases(True, prefill=False)
    cases = [dict(lens=(4000, 0, 129, 1), hq=32, hk=8, d=128, dv=128, block=64, layout="packed", out="given",
                  poison=True),
             dict(lens=(2048, 17), hq=32, hk=32, d=128, dv=128, block=16, layout="separate", out="none",
                  poison=True),
             dict(lens=(1000, 3, 129), hq=32, hk=8, d=128, dv=128, block=64, layout="packed", out="given",
                  scale=SHARP)]
    ratios = ((32, 32), (32, 8), (32, 4), (16, 1))
    layouts = ("separate", "packed", "head_major")
    lens_list = ((1, 17, 0, 4000, 129, 64, 65, 1023), (2048,), (0, 0, 1, 300, 5000, 16, 33, 100, 7, 1, 2, 3, 999,
                                                               4096, 31, 32, 1500))
    i = 0
    for d in (64, 80, 96, 128, 256):
        for block in (16, 32, 64, 128):
            hq, hk = ratios[i % 4]
            cases.append(dict(lens=lens_list[i % 3], hq=hq, hk=hk, d=d, dv=d, block=block, layout=layouts[i % 3],
                              out=("given", "none", "alias")[i % 3], tail=("random", "garbage")[(i // 2) % 2],
                              idx=(torch.int32, torch.int64)[(i // 3) % 2], host_lens=(i % 5 == 1)))
            i += 1
    cases.append(dict(lens=(100, 0, 777), hq=16, hk=4, d=192, dv=128, block=64, layout="packed", out="given"))
    cases.append(dict(lens=tuple(range(1, 257, 5)), hq=32, hk=8, d=128, dv=128, block=64, layout="packed",
                      out="given"))
    return cases + _quant_cases(False, prefill=False)


def _decode_build(p, dtype, rnd):
    hq, dv = p["hq"], p["dv"]
    x, k_cache, v_cache, table = _cache_inputs(p, p["lens"], dtype, rnd, p.get("idx", torch.int32))
    lens_device = "cpu" if p.get("host_lens") else rnd.device
    q = rnd.normal(len(p["lens"]), hq, p["d"], dtype=dtype)
    if p.get("poison"):
        _poison_cache(q, k_cache, v_cache, table, p["lens"], x.get("sz"))
        for b, n in enumerate(p["lens"]):
            if n == 0:
                q[b] = float("nan")  # a sequence with no key is zero, whatever its query holds
    x.update({"q": q, "k_cache": k_cache, "v_cache": v_cache,
              "table": table, "p": p, "kv_lens": torch.tensor(p["lens"], dtype=torch.int32, device=lens_device)})
    x["out"] = _attn_output(x, p["out"], len(p["lens"]), hq, dv, dtype, rnd)
    return x


def _poison_cache(q, k_cache, v_cache, table, kv_lens, quant=None):
    """:func:`_poison` for a paged cache: NaN in query row 0, NaN in the first key of the longest sequence (in
    the first of a split decode's slices), +Inf in the first value of the shortest non-empty one. A quantized
    cache (``quant``: its scales and zeros) gets NaN in that key's scale (KV head 0) and value's zero (last KV
    head) instead."""
    live = [b for b, n in enumerate(kv_lens) if n > 0]
    longest = max(live, key=lambda b: kv_lens[b])
    shortest = min(live, key=lambda b: kv_lens[b])
    k_first, v_first = int(table[longest, 0]), int(table[shortest, 0])
    if quant is None:
        _poison(q, k_cache[k_first], v_cache[v_first], q_row=0, k_row=0, v_row=0)
        return
    _poison(q, None, None, q_row=0, k_row=None, v_row=None)
    quant["ks"][k_first, 0, 0] = float("nan")
    quant["vz"][v_first, 0, -1] = float("nan")


def _decode_run(x):
    p = x["p"]
    b = len(p["lens"])
    cu = torch.arange(1, b + 1, dtype=torch.int32, device=x["q"].device)
    out = ops.paged_decode_attention(x["q"], x["k_cache"], x["v_cache"], x["table"], p["block"], cu, x["kv_lens"],
                                     max(p["lens"]) + 9, p["hq"], p["hk"], head_size_v=p["dv"],
                                     softmax_scale=p.get("scale"), attn_output=x["out"], **x["kv"])
    if x["out"] is not None and out is not x["out"]:
        raise AssertionError("paged_decode_attention must return the attn_output it was given")
    return {"out": out}


SPECS: dict[str, OpSpec] = {
    "prefill_attention": OpSpec("matmul", _prefill_cases, _prefill_build, _prefill_run),
    "paged_prefill_attention": OpSpec("matmul", _paged_prefill_cases, _paged_prefill_build, _paged_prefill_run),
    "paged_decode_attention": OpSpec("matmul", _decode_cases, _decode_build, _decode_run),
}
