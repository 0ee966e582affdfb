"""The ``reference`` vendor: every op in plain, readable PyTorch, on any device, in float32 arithmetic.

It is the oracle every other vendor is checked against and the fallback when nothing faster can serve a call.
"""

import importlib

from dlinfer.ops.table import TABLE
from dlinfer.vendor.registry import ANY_DEVICE, Capabilities, Vendor

# Every op of the table, from this package's module of the op's family (``reference/<family>.py``).
_OPS = {d.name: getattr(importlib.import_module(f"{__name__}.{d.family}"), d.name) for d in TABLE}

VENDOR = Vendor(
    name="reference",
    priority=0,
    devices=frozenset({ANY_DEVICE}),
    default_devices=frozenset({ANY_DEVICE}),
    ops=_OPS,
    capabilities={d.name: Capabilities(features=d.features) for d in TABLE if d.features},
    description="pure PyTorch, any device; the correctness oracle",
)
