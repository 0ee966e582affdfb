"""The one place ops hand a call to a vendor.

Every public op calls :func:`run` with its ``torch.library`` custom op and that op's plain implementation.
In eager mode on plain tensors the implementation is called directly: the custom op adds ~15–70 µs of
dispatcher overhead per call (more for ops that mutate inputs) and nothing else in eager mode. Under
``torch.compile``, ``torch.export``/FX tracing, fake or meta tensors, tensor subclasses or any active dispatch mode the
custom op runs, so tracers see one opaque op with its fake implementation. Both paths select the vendor the
same way (:func:`implementation`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dlinfer.ops.table import check_result
from dlinfer.settings import check_values
from dlinfer.vendor.registry import Call, implementation_for, select

_key = Call.make_key
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack


def implementation(
    op: str,
    ref: torch.Tensor,
    *,
    head_size: int = 0,
    head_size_v: int = 0,
    block_size: int = 0,
    features: frozenset[str] = frozenset(),
) -> Callable[..., Any]:
    """The implementation serving this call, chosen from metadata only (device, dtype, sizes, features).

    On CPU tensors, and elsewhere with ``DLINFER_CHECK=1``, the implementation comes wrapped so that its result is
    checked against the op table's declaration (count, shapes, dtypes), naming the vendor and op on a mismatch.
    """
    key = _key(op, ref.device.type, ref.dtype, head_size, head_size_v, block_size, features)
    impl = implementation_for(key)
    if ref.device.type == "cpu" or check_values():
        return _checked(key, impl)
    return impl


_checked_cache: dict[tuple, tuple[Callable[..., Any], Callable[..., Any]]] = {}


def _checked(key: tuple, impl: Callable[..., Any]) -> Callable[..., Any]:
    hit = _checked_cache.get(key)
    if hit is not None and hit[0] is impl:
        return hit[1]
    vendor = select(Call(*key))[0].name
    op = key[0]

    def checked(*args: Any) -> Any:
        result = impl(*args)
        check_result(vendor, op, args, result)
        return result

    _checked_cache[key] = (impl, checked)
    return checked


def run(op: Callable[..., Any], impl: Callable[..., Any], *args: Any) -> Any:
    """Call ``impl`` directly in plain eager mode, else the custom op ``op`` (see the module doc)."""
    first = args[0]
    if type(first) is torch.Tensor and not first.is_meta and not _is_compiling() and not _dispatch_modes():
        return impl(*args)
    return op(*args)
