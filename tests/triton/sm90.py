"""Compile Triton kernels for an H100 (sm_90a) on this CPU, with the ptxas of the triton wheel: the GPU code paths
(pipelined loops, wgmma) that Triton's interpreter never runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def compile_for_sm90(script: str) -> None:
    """Run ``script`` (it compiles kernels for ``GPUTarget("cuda", 90, 32)`` and prints ``compiled``) in a fresh
    process without ``TRITON_INTERPRET``; skips when the triton wheel has no ptxas."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"no ptxas in the triton wheel ({ptxas})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
