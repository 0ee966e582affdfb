"""The ``triton`` vendor: dlinfer's fast path on NVIDIA GPUs (runs on CPU tensors under TRITON_INTERPRET=1)."""

import os

from dlinfer.vendor.registry import Vendor

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

VENDOR = Vendor(
    name="triton",
    priority=100,
    devices=frozenset({"cuda", "cpu"} if _INTERPRET else {"cuda"}),
    default_devices=frozenset({"cuda"}),
    ops={},
    description="Triton kernels for NVIDIA GPUs",
)
