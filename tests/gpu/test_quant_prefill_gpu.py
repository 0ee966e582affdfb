"""Quantized paged prefill on the GPU, one process per config: the quick matrix's 4-bit case (d 24, dv 16, GQA 4,
packed cache, stacked scales) and its neighbours, each with the default launch and with the config fields
that change the kernel's tiles, so a failure names what it depends on (head padding, 4 bits, GQA packing,
tile sizes, pipelining, warps, split-KV, the value head size). The first H200 run failed the 4-bit case in fp16/bf16
(rel err 5e-2) and crashed it with ``splits=3`` (illegal memory access); Triton's interpreter passes all of these
with the CPU and the GPU tiles. An H100 run of this probe traced it to 16-wide value tiles under 32-wide key tiles
(every dv-16 shape, unquantized ones included, failed wherever a tile had 64+ query rows and 64+ keys; the dv-32
shapes passed under every config): the kernels now pad such value tiles to 32 (``attention_prefill.MIN_BLOCK_DV``),
which this probe verifies on the next GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

_RUN = r'''
import json, sys, torch
from dlinfer.testing.conformance.inputs import Rand
from dlinfer.testing.conformance.runner import run_case
from dlinfer.testing.conformance.cases import SPECS
from dlinfer.vendor import registry
dtype, dev, spec = getattr(torch, sys.argv[2]), torch.device("cuda"), SPECS["paged_prefill_attention"]
for p in json.loads(sys.argv[1]):
    name = p.pop("name")
    p["seqs"] = tuple(tuple(s) for s in p["seqs"])
    r = run_case("triton", "paged_prefill_attention", p, dtype, dev, 7)
    detail = r.detail[:300]
    if r.status == "fail":  # where the error lies: largest |error| per query token, per head, per value column
        outs = []
        for vendor in ("reference", "triton"):
            with registry.forced(vendor, "paged_prefill_attention"):
                outs.append(spec.run(spec.build(p, dtype, Rand(7, dev)))["out"].float())
        err = (outs[1] - outs[0]).abs()
        detail += " | by token " + " ".join(f"{v:.2f}" for v in err.amax((1, 2)).tolist())
        detail += " | by head " + " ".join(f"{v:.2f}" for v in err.amax((0, 2)).tolist())
        detail += " | by column " + " ".join(f"{v:.2f}" for v in err.amax((0, 1)).tolist())
    print("RESULT", json.dumps([name, r.status, r.rel_err, r.max_abs, detail]), flush=True)
'''

_FAILED = dict(seqs=[[16, 2], [3, 3]], hq=4, hk=1, d=24, dv=16, block=16, layout="packed", causal=True,
               out="given", quant=4, form="stacked")
SHAPES = {
    "quick-4bit": {},
    "float-d24": dict(quant=0, form=None),  # head padding without quantization
    "4bit-d32": dict(d=32),  # no head padding
    "8bit-d24": dict(quant=8),
    "4bit-mha": dict(hq=4, hk=4),  # no GQA packing
    "4bit-separate-pair": dict(layout="separate", form="pair"),
    "4bit-page64": dict(block=64),  # a 64-key tile inside one page
    "float-d64": dict(quant=0, form=None, d=64, dv=64),  # a real small head size, unpadded
    "float-dv32": dict(quant=0, form=None, dv=32),  # the failing cases all had 16-wide values
    "4bit-dv32": dict(dv=32),
}
# the default tiles for heads <= 64 are 128 x 64 with 4 warps and 3 stages: the smaller tiles, no software
# pipelining, 8 warps (two warp groups) tell which of them a failure needs
CONFIGS = ["", "block_n=32", "block_m=64,block_n=32", "pack_gqa=0", "splits=3", "num_stages=1", "num_warps=8",
           "splits=3,num_stages=1", "splits=3,block_m=64,block_n=32"]


def _params(shape: str) -> dict:
    params = {k: v for k, v in {**_FAILED, **SHAPES[shape], "name": shape}.items() if v is not None}
    if not params.get("quant"):
        params.pop("quant", None)
        params.pop("form", None)
    return params


def _run(shapes: list[str], dtype: str, config: str) -> dict:
    """``{shape: [status, rel_err, max_abs, detail]}``; a process that dies (an illegal memory access kills its
    CUDA context) reports its remaining shapes as ``crash`` with its last output."""
    env = dict(os.environ, DLINFER_TRITON_PREFILL=config, PYTHONPATH=os.getcwd())
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _RUN, json.dumps([_params(s) for s in shapes]), dtype], env=env,
                          capture_output=True, text=True, timeout=300)
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            name, *rest = json.loads(line[7:])
            results[name] = rest
    for shape in shapes:
        results.setdefault(shape, ["crash", None, None, (done.stderr or done.stdout)[-400:]])
    return results


@pytest.mark.parametrize("config", CONFIGS)
def test_quantized_paged_prefill_variants(config):
    """fp16, every shape under one config; the message lists them all."""
    if not torch.cuda.is_available():
        pytest.skip("GPU test")
    shapes = sorted(SHAPES)
    results = _run(shapes, "float16", config)
    # an illegal memory access leaves every later case of the process an error: those again, a process each
    for shape in [s for s, r in results.items() if r[0] in ("crash", "error")]:
        results.update(_run([shape], "float16", config))
    table = "; ".join(f"{s}: {r[0]} rel {r[1]} max abs {r[2]} {r[3] if r[0] != 'pass' else ''}".strip()
                      for s, r in results.items())
    print(f"[{config or 'default'}] {table}")
    assert all(r[0] == "pass" for r in results.values()), f"[{config or 'default'}] {table}"
