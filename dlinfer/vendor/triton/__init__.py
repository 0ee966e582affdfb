"""The ``triton`` vendor: dlinfer's fast path on NVIDIA GPUs, written in Triton.

Each op family lives in its own module, which exports ``OPS`` (op name -> implementation with the signature
of ``torch.ops.dlinfer.<op>``) and optionally ``CAPABILITIES`` (op name -> ``Capabilities``). Under
``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (slowly: for conformance tests only), and the vendor
then accepts CPU tensors when forced, but is never the automatic choice on the CPU.
"""

from __future__ import annotations

import importlib
import logging

from dlinfer import settings
from dlinfer.vendor.registry import Vendor

logger = logging.getLogger("dlinfer")

INTERPRET = settings.flag("TRITON_INTERPRET")

_MODULES = ("activation", "norm", "rotary", "kv_cache", "attention_decode", "attention_prefill", "moe", "linear",
            "fused_rotary_kv", "quant")


def _collect():
    ops, caps = {}, {}
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return ops, caps, f"triton is not installed ({exc})"
    for name in _MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        ops.update(getattr(module, "OPS", {}))
        caps.update(getattr(module, "CAPABILITIES", {}))
    return ops, caps, None


_ops, _caps, _missing = _collect()


def _available() -> str | None:
    return _missing


VENDOR = Vendor(
    name="triton",
    priority=100,
    devices=frozenset({"cuda", "cpu"} if INTERPRET else {"cuda"}),
    default_devices=frozenset({"cuda"}),
    ops=_ops,
    capabilities=_caps,
    available=_available,
    description="Triton kernels for NVIDIA GPUs (CPU under TRITON_INTERPRET=1)",
)
