"""The ``triton`` vendor: dlinfer's fast path on NVIDIA GPUs, written in Triton.

Each op family lives in its own module, which exports ``OPS`` (op name -> implementation with the signature
of ``torch.ops.dlinfer.<op>``), optionally ``CAPABILITIES`` (op name -> ``Capabilities``) and ``extra_reasons``
(``Call`` -> why the module cannot serve it, for what a record cannot say, e.g. per device) and ``weight_layout``
(``(op, device, dtype)`` -> the weight layout its kernels serve fastest there, or None). Under
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
    ops, caps, refusals, layouts = {}, {}, [], []
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return ops, caps, refusals, layouts, f"triton is not installed ({exc})"
    for name in _MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        ops.update(getattr(module, "OPS", {}))
        caps.update(getattr(module, "CAPABILITIES", {}))
        if hasattr(module, "extra_reasons"):
            refusals.append(module.extra_reasons)
        if hasattr(module, "weight_layout"):
            layouts.append(module.weight_layout)
    return ops, caps, refusals, layouts, None


_ops, _caps, _refusals, _layouts, _missing = _collect()


def _available() -> str | None:
    return _missing


def _extra_reasons(call) -> list[str]:
    """The modules' ``extra_reasons(call)`` hooks: refusals a capabilities record cannot express (selection only,
    cached per call key by the registry)."""
    return [why for hook in _refusals for why in hook(call)]


def _weight_layout(op, device, dtype) -> str | None:
    """The first answer of the modules' ``weight_layout`` hooks."""
    for hook in _layouts:
        layout = hook(op, device, dtype)
        if layout is not None:
            return layout
    return None


VENDOR = Vendor(
    name="triton",
    priority=100,
    devices=frozenset({"cuda", "cpu"} if INTERPRET else {"cuda"}),
    default_devices=frozenset({"cuda"}),
    ops=_ops,
    capabilities=_caps,
    extra_reasons=_extra_reasons if _refusals else None,
    available=_available,
    description="Triton kernels for NVIDIA GPUs (CPU under TRITON_INTERPRET=1)",
    weight_layout=_weight_layout if _layouts else None,
)
