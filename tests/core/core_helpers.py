"""Helpers shared by the core tests (imported by name: the tests directory is not a package)."""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = float(ref.norm())
    num = float((out - ref).norm())
    return num / denom if denom else num


# Relative-norm tolerance of a low-precision result against float64 math.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class _BrokenEntryPoint:
    def __init__(self, name: str, value: str, exc: Exception):
        self.name, self.value, self._exc = name, value, exc

    def load(self):
        raise self._exc


def install_broken_plugin(monkeypatch, registry, name: str, value: str, exc: Exception) -> None:
    """Rediscover vendors as if the only installed ``dlinfer.vendors`` entry point were one that fails to load."""
    import importlib.metadata

    ep = _BrokenEntryPoint(name, value, exc)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [ep] if group == "dlinfer.vendors" else [])
    registry.rediscover()
