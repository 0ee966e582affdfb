"""An example third-party dlinfer vendor.

It serves two ops of the contract, ``silu_and_mul`` and ``rms_norm``, in plain PyTorch on CPU tensors, and
declares that it handles float32 and bfloat16 only. Everything else is left to the other vendors: an op a
vendor does not provide is served as if it were not there (``dlinfer info``/``dlinfer check`` show "n/a"), and
a call it refuses (a float16 tensor) falls back to ``reference`` with a warning giving the reason, or, when
the vendor is forced with ``DLINFER_VENDOR=example``, raises ``NotSupportedError`` saying why.

Implementations take the arguments of ``torch.ops.dlinfer.<op>`` in the order of the op table
(``dlinfer.ops.table.OPS[name].signature``), after dlinfer has checked them. ``Vendor(...)`` checks each function
against that signature, and dlinfer checks what it returns (CPU tensors always, elsewhere with
``DLINFER_CHECK=1``).
"""

from __future__ import annotations

import collections

import torch

from dlinfer.vendor import Capabilities, Vendor

# How many times each op ran here (tests use it to prove which vendor served a call).
CALLS: collections.Counter = collections.Counter()


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    CALLS["silu_and_mul"] += 1
    half = x.shape[-1] // 2
    gate = x[..., :half].float()
    up = x[..., half:].float()
    return (gate * torch.sigmoid(gate) * up).to(x.dtype)


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    CALLS["rms_norm"] += 1
    x = hidden_states.float()
    inv_rms = (x.square().mean(dim=-1, keepdim=True) + epsilon).rsqrt()
    return (x * inv_rms * weight.float()).to(hidden_states.dtype)


_CAPS = Capabilities(dtypes=frozenset({torch.float32, torch.bfloat16}))

VENDOR = Vendor(
    name="example",
    priority=10,  # above reference (0): the automatic choice on the CPU for what it serves
    devices=frozenset({"cpu"}),
    default_devices=frozenset({"cpu"}),
    ops={"silu_and_mul": silu_and_mul, "rms_norm": rms_norm},
    capabilities={"silu_and_mul": _CAPS, "rms_norm": _CAPS},
    description="example third-party vendor (examples/dlinfer-vendor-example): 2 ops in torch, CPU",
)
