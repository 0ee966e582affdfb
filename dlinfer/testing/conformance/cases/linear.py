"""Linear (matmul + bias) cases."""

from __future__ import annotations

import dlinfer.ops as ops
from dlinfer.testing.conformance.spec import OpSpec


def _linear_cases(quick):
    if quick:
        return [dict(shape=(3, 16), N=24, bias=True), dict(shape=(2, 3, 17), N=5, bias=False)]
    return [dict(shape=(1, 4096), N=4096, bias=False), dict(shape=(257, 4096), N=6144, bias=True),
            dict(shape=(2, 33, 1000), N=129, bias=True), dict(shape=(1024, 2048), N=512, bias=False)]


def _linear_build(p, dtype, rnd):
    k = p["shape"][-1]
    return {"x": rnd.normal(*p["shape"], dtype=dtype), "w": rnd.normal(p["N"], k, dtype=dtype, scale=k ** -0.5),
            "b": rnd.normal(p["N"], dtype=dtype) if p["bias"] else None}


SPECS: dict[str, OpSpec] = {
    "linear": OpSpec("matmul", _linear_cases, _linear_build,
                     lambda x: {"out": ops.linear(x["x"], x["w"], x["b"])}),
}
