"""Compile Triton kernels for an H100 (sm_90a), or another NVIDIA architecture, on this CPU, with the ptxas of the
triton wheel: the GPU code paths (pipelined loops, wgmma) that Triton's interpreter never runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def compile_for_sm90(script: str) -> None:
    """Run ``script`` (it compiles kernels for ``GPUTarget("cuda", 90, 32)`` and prints ``compiled``) in a fresh
    process without ``TRITON_INTERPRET``; skips when the triton wheel has no ptxas. The script may import
    :func:`compile_sm90` from this module (``from sm90 import compile_sm90``)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"no ptxas in the triton wheel ({ptxas})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__))]
                                        + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def compile_for(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int = 3,
                divisible: tuple[str, ...] = (), arch: int = 90):
    """Compile the ``@triton.jit`` function ``fn`` for NVIDIA ``sm_<arch>`` (80, 89, 90, 100: the triton wheel
    carries ptxas for each; in a :func:`compile_for_sm90` script): ``types`` maps argument names to Triton types
    (``"*bf16"``, ``"fp32"``; default ``"i32"``), ``constexprs`` the compile-time ones. Pointers, ``stride*``
    arguments and those named in ``divisible`` are marked divisible by 16, as the launcher specializes them for
    aligned tensors and sizes. Returns Triton's compiled kernel (``metadata.shared``, ``asm``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
        if name not in constexprs and (sig[name].startswith("*") or name.startswith("stride") or name in divisible):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_sm90(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int = 3,
                 divisible: tuple[str, ...] = ()) -> tuple[int, str]:
    """:func:`compile_for` sm_90; returns (shared memory bytes, the TTGIR text)."""
    kernel = compile_for(fn, types, constexprs, num_warps, num_stages, divisible)
    return kernel.metadata.shared, kernel.asm["ttgir"]
