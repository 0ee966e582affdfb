"""MoE cases: top-k gating and the fused expert MLP."""

from __future__ import annotations

import torch

import dlinfer.ops as ops
from dlinfer.testing.conformance.compare import TOLERANCES
from dlinfer.testing.conformance.spec import OpSpec
from dlinfer.utils.layout import n_fastest


def _gating_cases(quick):
    if quick:
        return [dict(T=5, E=8, topk=2), dict(T=3, E=60, topk=4)]
    return [dict(T=1, E=8, topk=2), dict(T=4096, E=8, topk=2), dict(T=37, E=60, topk=4),
            dict(T=513, E=128, topk=8), dict(T=7, E=256, topk=8), dict(T=100, E=64, topk=6)]


def _gating_build(p, dtype, rnd):
    return {"logits": rnd.normal(p["T"], p["E"], dtype=dtype, scale=2.0), "topk": p["topk"]}


def _gating_run(x):
    weights, ids = ops.moe_gating_topk_softmax(x["logits"], x["topk"], None)
    return {"weights": weights, "ids": ids}


def _gating_check(out, ref, x, dtype) -> list[str]:
    """Ids may differ from the reference only between (near-)equal probabilities; dtypes are fixed."""
    problems = []
    w, ids = out["weights"], out["ids"]
    if w.dtype != torch.float32 or ids.dtype != torch.int64:
        problems.append(f"weights/ids must be float32/int64, got {w.dtype}/{ids.dtype}")
        return problems
    probs = torch.softmax(x["logits"].double(), dim=-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= probs.shape[1]):
        return [f"expert ids out of range [0, {probs.shape[1]})"]
    if ids.numel() and bool((ids.sort(dim=-1).values.diff(dim=-1) == 0).any()):
        problems.append("an expert id is selected twice for one token")
    chosen = probs.gather(1, ids.long())
    rtol = TOLERANCES["elementwise"][torch.float32][0] * 10
    if not torch.allclose(chosen, ref["weights"].double(), rtol=rtol, atol=1e-6):
        problems.append("the selected experts are not the top-k by probability")
    return problems


def _moe_cases(quick):
    # layout "n": the expert weights N-fastest (same shape and values, N the unit-stride dimension), as LMDeploy's
    # CUDA backend lays them out
    if quick:
        return [dict(T=3, H=16, I=8, E=4, topk=2, renorm=False), dict(T=5, H=24, I=16, E=8, topk=3, renorm=True),
                dict(T=6, H=40, I=24, E=4, topk=2, renorm=True, layout="n")]
    return [dict(T=1, H=1024, I=512, E=8, topk=2, renorm=False), dict(T=37, H=512, I=352, E=16, topk=4, renorm=True),
            dict(T=129, H=256, I=96, E=64, topk=8, renorm=True), dict(T=512, H=2048, I=768, E=32, topk=8,
                                                                     renorm=True),
            dict(T=64, H=4096, I=1024, E=8, topk=2, renorm=False), dict(T=7, H=136, I=40, E=5, topk=5, renorm=False),
            dict(T=300, H=1024, I=352, E=8, topk=2, renorm=True, layout="n"),
            dict(T=9, H=200, I=72, E=16, topk=4, renorm=False, layout="n")]


def _moe_build(p, dtype, rnd):
    T, H, I, E, topk = p["T"], p["H"], p["I"], p["E"], p["topk"]
    scores = torch.softmax(rnd.normal(T, E), dim=-1)
    weights, ids = torch.topk(scores, topk, dim=-1)
    gate_up = rnd.normal(E, 2 * I, H, dtype=dtype, scale=H ** -0.5)
    down = rnd.normal(E, H, I, dtype=dtype, scale=I ** -0.5)
    if p.get("layout") == "n":
        gate_up, down = n_fastest(gate_up), n_fastest(down)
    return {"x": rnd.normal(T, H, dtype=dtype), "gate_up": gate_up, "down": down, "weights": weights.float(),
            "ids": ids.to(torch.int32 if T % 2 else torch.int64), "topk": topk, "renorm": p["renorm"]}


def _moe_run(x):
    return {"out": ops.fused_moe(x["x"], x["gate_up"], x["down"], x["weights"], x["ids"], x["topk"], x["renorm"],
                                 None)}


SPECS: dict[str, OpSpec] = {
    "moe_gating_topk_softmax": OpSpec("elementwise", _gating_cases, _gating_build, _gating_run, _gating_check),
    "fused_moe": OpSpec("matmul", _moe_cases, _moe_build, _moe_run),
}
