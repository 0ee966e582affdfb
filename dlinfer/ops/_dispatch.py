"""The one place ops hand a call to a vendor.

Every public op checks its arguments and calls its ``torch.library`` custom op's plain implementation. In eager
mode on plain tensors (:func:`eager`) the implementation is called directly: the custom op adds ~15–70 µs of
dispatcher overhead per call (more for ops that mutate inputs) and nothing else in eager mode. Under
``torch.compile``, ``torch.export``/FX tracing, fake or meta tensors, tensor subclasses or any active dispatch mode the
custom op runs (:func:`run`), so tracers see one opaque op with its fake implementation. Both paths select the
vendor the same way (:func:`selector`).

The eager path is the per-call cost every layer of a model pays, so it is kept to a few dictionary lookups: each
op has a selector with its own cache, keyed by the cheapest description of the call (device, dtype, sizes,
features) and emptied by the registry whenever the choice could change (see ``Registry.site_cache``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dlinfer.ops import _checks
from dlinfer.ops.table import check_result
from dlinfer.settings import check_values
from dlinfer.vendor.registry import REGISTRY, Call

_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_Tensor = torch.Tensor

NO_FEATURES: frozenset[str] = frozenset()

Selector = Callable[..., Callable[..., Any]]


def eager(first: Any) -> bool:
    """Whether a call whose first tensor is ``first`` runs the implementation directly: a plain tensor with
    storage, no tracing or compiling, no dispatch mode (see the module doc)."""
    return type(first) is _Tensor and not first.is_meta and not _is_compiling() and not _dispatch_modes()


def run(op: Callable[..., Any], impl: Callable[..., Any], *args: Any) -> Any:
    """Call ``impl`` directly in plain eager mode, else the custom op ``op`` (see the module doc)."""
    if eager(args[0]):
        return impl(*args)
    return op(*args)


def selector(op: str) -> Selector:
    """The vendor selection of ``op``: ``select(ref, head_size=0, head_size_v=0, block_size=0,
    features=NO_FEATURES)`` returns the implementation serving a call whose reference tensor is ``ref``, chosen
    from metadata only (never tensor values, so it is safe under CUDA-graph capture).

    On host tensors (``_checks.HOST_DEVICE_TYPES``), and elsewhere with ``DLINFER_CHECK=1``, the implementation
    comes wrapped so that its result is checked against the op table's declaration (count, shapes, dtypes), naming
    the vendor and op on a mismatch.
    """
    cache = REGISTRY.site_cache()

    def select(ref: torch.Tensor, head_size: int = 0, head_size_v: int = 0, block_size: int = 0,
               features: frozenset[str] = NO_FEATURES) -> Callable[..., Any]:
        device = ref.device
        key = (device, ref.dtype, head_size, head_size_v, block_size, features)
        hit = cache.get(key)
        if hit is None:
            call = Call(op, device.type, ref.dtype, head_size, head_size_v, block_size, features)
            hit = REGISTRY.fill_site(cache, key, call, _entry(op, device.type))
        if hit[2] or check_values():
            return hit[1]
        return hit[0]

    return select


def dtype_selector(op: str) -> Callable[[torch.device, torch.dtype], Callable[..., Any]]:
    """:func:`selector` for an op whose calls carry no sizes or features (norms, activations, linear, MoE):
    ``select(device, dtype)``, for wrappers that already hold the reference tensor's device and dtype."""
    cache = REGISTRY.site_cache()

    def select(device: torch.device, dtype: torch.dtype) -> Callable[..., Any]:
        hit = cache.get((device, dtype))
        if hit is None:
            call = Call(op, device.type, dtype)
            hit = REGISTRY.fill_site(cache, (device, dtype), call, _entry(op, device.type))
        if hit[2] or check_values():
            return hit[1]
        return hit[0]

    return select


def _entry(op: str, device_type: str):
    """What a selector caches: ``(implementation, result-checked implementation, on a host device)``."""
    def make(vendor, impl):
        name = vendor.name

        def checked(*args: Any) -> Any:
            result = impl(*args)
            check_result(name, op, args, result)
            return result

        return impl, checked, device_type in _checks.HOST_DEVICE_TYPES
    return make


_selectors: dict[str, Selector] = {}


def implementation(
    op: str,
    ref: torch.Tensor,
    head_size: int = 0,
    head_size_v: int = 0,
    block_size: int = 0,
    features: frozenset[str] = NO_FEATURES,
) -> Callable[..., Any]:
    """The implementation serving this call (``selector(op)(ref, ...)``, one selector per op kept here): for ops
    that do not hold their own selector."""
    select = _selectors.get(op)
    if select is None:
        select = _selectors.setdefault(op, selector(op))
    return select(ref, head_size, head_size_v, block_size, features)
