"""Which vendor serves an op on a device, and why the others don't.

A vendor is a :class:`Vendor` record: a name, a priority, the device types it can run on and those it is the
automatic choice for, a table ``op name -> implementation`` and a declarative :class:`Capabilities` record per op.
Vendors come from two places: the in-tree ones (``reference``, ``triton``) and third-party packages that
declare an entry point in the group ``dlinfer.vendors`` pointing at a ``Vendor`` (or a zero-argument callable
returning one).

Selection, per op and per call (cached on the call's metadata, never on tensor values, so it is safe under
CUDA-graph capture):

1. A forced vendor (``DLINFER_VENDOR_<OP>=name`` for one op, ``DLINFER_VENDOR=name`` for all, or
   :func:`set_override`) that provides the op serves it or the call fails with every reason. A forced vendor
   that does not provide the op at all does not apply to that op.
2. Otherwise the highest-priority vendor that is the automatic choice for the input's device type and can
   serve the call. If the best candidate refuses, the next one is tried, ending at ``reference``; the fallback
   is logged once per (op, reason).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from dlinfer.errors import NotSupportedError

logger = logging.getLogger("dlinfer")

ENTRY_POINT_GROUP = "dlinfer.vendors"
ANY_DEVICE = "*"


@dataclasses.dataclass(frozen=True)
class Call:
    """What a dispatcher knows about one call: tensor metadata only, never tensor values.

    ``head_size``/``head_size_v``/``block_size`` are 0 when the op has no such notion. ``features`` names what
    the call needs beyond the plain op (``"kv_quant"``, ``"non_causal"``, ``"strided_cache"``, ...).
    """

    op: str
    device_type: str
    dtype: torch.dtype
    head_size: int = 0
    head_size_v: int = 0
    block_size: int = 0
    features: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a vendor's implementation of one op can serve. ``None`` means any."""

    dtypes: frozenset[torch.dtype] | None = None
    head_sizes: frozenset[int] | None = None
    block_sizes: frozenset[int] | None = None
    features: frozenset[str] = frozenset()

    def reasons(self, call: Call) -> list[str]:
        out = []
        if self.dtypes is not None and call.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
            out.append(f"dtype {str(call.dtype).replace('torch.', '')} not supported (supports {names})")
        if self.head_sizes is not None:
            for what, size in (("head size", call.head_size), ("value head size", call.head_size_v)):
                if size and size not in self.head_sizes:
                    out.append(f"{what} {size} not supported (supports {sorted(self.head_sizes)})")
        if self.block_sizes is not None and call.block_size and call.block_size not in self.block_sizes:
            out.append(f"block size {call.block_size} not supported (supports {sorted(self.block_sizes)})")
        for feature in sorted(call.features - self.features):
            out.append(f"feature '{feature}' not supported")
        return out


@dataclasses.dataclass(frozen=True)
class Vendor:
    """A vendor: a table of op implementations plus what they support.

    Args:
        name: short lowercase name, used by ``DLINFER_VENDOR``.
        priority: higher wins among vendors that are the automatic choice for a device.
        devices: device types the vendor can run on (``"cuda"``, ``"npu"``, ``"cpu"``; ``"*"`` for any).
        default_devices: device types for which the vendor is an automatic choice (a subset of ``devices``).
        ops: op name -> implementation with the signature of ``torch.ops.dlinfer.<op>`` (see ``dlinfer.ops``).
        capabilities: op name -> :class:`Capabilities`; ops missing here support everything.
        extra_reasons: optional hook ``(call) -> list[str]`` for refusals the record cannot express.
        available: optional hook ``() -> str | None`` returning why the vendor cannot run at all here.
    """

    name: str
    priority: int
    devices: frozenset[str]
    default_devices: frozenset[str]
    ops: Mapping[str, Callable[..., Any]]
    capabilities: Mapping[str, Capabilities] = dataclasses.field(default_factory=dict)
    extra_reasons: Callable[[Call], list[str]] | None = None
    available: Callable[[], str | None] | None = None
    description: str = ""

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").isalnum() or self.name.lower() != self.name:
            raise ValueError(f"vendor name must be lowercase alphanumeric/underscore, got {self.name!r}")
        if not isinstance(self.priority, int):
            raise TypeError(f"vendor {self.name}: priority must be an int, got {type(self.priority).__name__}")
        object.__setattr__(self, "devices", frozenset(self.devices))
        object.__setattr__(self, "default_devices", frozenset(self.default_devices))
        if not self.default_devices <= self.devices and ANY_DEVICE not in self.devices:
            raise ValueError(f"vendor {self.name}: default_devices must be a subset of devices")
        unknown = set(self.capabilities) - set(self.ops)
        if unknown:
            raise ValueError(f"vendor {self.name}: capabilities for ops it does not provide: {sorted(unknown)}")

    def provides(self, op: str) -> bool:
        return op in self.ops

    def runs_on(self, device_type: str) -> bool:
        return ANY_DEVICE in self.devices or device_type in self.devices

    def is_default_for(self, device_type: str) -> bool:
        return ANY_DEVICE in self.default_devices or device_type in self.default_devices

    def not_supported_reasons(self, call: Call) -> list[str]:
        """Why this vendor cannot serve ``call``, in words; empty when it can."""
        if not self.provides(call.op):
            return [f"does not provide {call.op}"]
        reasons = []
        if self.available is not None:
            why = self.available()
            if why:
                reasons.append(why)
        if not self.runs_on(call.device_type):
            reasons.append(f"does not run on device type '{call.device_type}' (runs on {sorted(self.devices)})")
        caps = self.capabilities.get(call.op)
        if caps is not None:
            reasons.extend(caps.reasons(call))
        if self.extra_reasons is not None:
            reasons.extend(self.extra_reasons(call))
        return reasons


_lock = threading.RLock()
_vendors: dict[str, Vendor] = {}
_load_errors: dict[str, str] = {}
_discovered = False
_discovering = False
_overrides: dict[str | None, str | None] = {}
# Call's fields as a plain tuple -> (vendor, implementation). Keyed by the tuple, not the Call, so that the
# per-call path of every op (implementation_for) never builds a Call.
_selection_cache: dict[tuple, tuple[Vendor, Callable[..., Any]]] = {}
_CALL_FIELDS = tuple(f.name for f in dataclasses.fields(Call))
_logged_fallbacks: set[tuple[str, str, str]] = set()


def clear_selection_cache() -> None:
    """Forget cached vendor choices (the next call of each op selects again, e.g. after env changes)."""
    _selection_cache.clear()


def _env_key(op: str | None) -> str:
    return "DLINFER_VENDOR" if op is None else f"DLINFER_VENDOR_{op.upper()}"


def register_vendor(vendor: Vendor, *, replace: bool = False) -> None:
    """Register a vendor (in-tree or from a plugin). Re-registering a name needs ``replace=True``."""
    if not isinstance(vendor, Vendor):
        raise TypeError(f"register_vendor expects a dlinfer.vendor.Vendor, got {type(vendor).__name__}")
    with _lock:
        if vendor.name in _vendors and not replace and _vendors[vendor.name] is not vendor:
            raise ValueError(f"a vendor named {vendor.name!r} is already registered")
        _vendors[vendor.name] = vendor
        clear_selection_cache()


def unregister_vendor(name: str) -> None:
    with _lock:
        _vendors.pop(name, None)
        clear_selection_cache()


def _discover() -> None:
    """Register in-tree vendors and load entry-point vendors once. Broken plugins are logged and skipped.

    A plugin may use the registry while it is imported (e.g. to reuse the reference implementations): that
    re-entrant call, in the same thread, sees the vendors registered so far and does not restart discovery.
    Other threads wait on the lock until discovery is complete.
    """
    global _discovered, _discovering
    if _discovered:
        return
    with _lock:
        if _discovered or _discovering:
            return
        _discovering = True
        try:
            from dlinfer.vendor import reference

            register_vendor(reference.VENDOR, replace=True)
            try:
                from dlinfer.vendor import triton as triton_vendor

                register_vendor(triton_vendor.VENDOR, replace=True)
            except Exception as exc:  # noqa: BLE001 - an in-tree optional vendor must never break import
                _load_errors["triton"] = f"{type(exc).__name__}: {exc}"
                logger.debug("dlinfer: triton vendor unavailable: %s", exc)
            _load_entry_points()
        finally:
            _discovering = False
            _discovered = True


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # noqa: BLE001
        logger.warning("dlinfer: could not read entry points: %s", exc)
        return
    for ep in eps:
        try:
            obj = ep.load()
            vendor = obj() if callable(obj) and not isinstance(obj, Vendor) else obj
            if not isinstance(vendor, Vendor):
                raise TypeError(f"entry point must give a dlinfer.vendor.Vendor, got {type(vendor).__name__}")
            if vendor.name in _vendors:
                raise ValueError(f"vendor name {vendor.name!r} is already taken")
            register_vendor(vendor)
            logger.debug("dlinfer: loaded vendor %s from %s", vendor.name, ep.value)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must never break `import dlinfer`
            _load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
            logger.warning("dlinfer: skipped vendor plugin %r (%s): %s: %s", ep.name, ep.value,
                           type(exc).__name__, exc)


def vendors() -> dict[str, Vendor]:
    """All registered vendors by name."""
    _discover()
    return dict(_vendors)


def load_errors() -> dict[str, str]:
    """Vendor plugins that failed to load, with the reason."""
    _discover()
    return dict(_load_errors)


def get_vendor(name: str) -> Vendor:
    _discover()
    try:
        return _vendors[name]
    except KeyError:
        known = ", ".join(sorted(_vendors)) or "none"
        extra = f" (failed to load: {_load_errors[name]})" if name in _load_errors else ""
        raise ValueError(f"unknown vendor {name!r}{extra}; registered vendors: {known}") from None


def set_override(name: str | None, op: str | None = None) -> None:
    """Force ``name`` for ``op`` (or all ops when ``op`` is None); ``name=None`` clears the override.

    Takes precedence over the ``DLINFER_VENDOR*`` environment variables.
    """
    if name is not None:
        get_vendor(name)
    with _lock:
        _overrides[op] = name
        clear_selection_cache()


def clear_overrides() -> None:
    with _lock:
        _overrides.clear()
        clear_selection_cache()


def forced_vendor(op: str) -> tuple[str | None, str]:
    """The vendor forced for ``op`` and where the force comes from (``""`` when none)."""
    for key in (op, None):
        if key in _overrides:
            if _overrides[key] is not None:
                return _overrides[key], "set_override" + (f"(op={op!r})" if key else "")
            continue
        env = os.environ.get(_env_key(key), "").strip()
        if env:
            return env, _env_key(key)
    return None, ""


def candidates(device_type: str) -> list[Vendor]:
    """Vendors that are an automatic choice for ``device_type``, best first."""
    _discover()
    found = [v for v in _vendors.values() if v.is_default_for(device_type)]
    return sorted(found, key=lambda v: (-v.priority, v.name))


def explain(call: Call) -> list[tuple[str, list[str]]]:
    """Every registered vendor and why it can't serve ``call`` (empty list: it can), best first."""
    _discover()
    ordered = sorted(_vendors.values(), key=lambda v: (-v.priority, v.name))
    return [(v.name, v.not_supported_reasons(call)) for v in ordered]


def select(call: Call) -> tuple[Vendor, Callable[..., Any]]:
    """The vendor and implementation serving ``call``. Cached per distinct call metadata."""
    key = tuple(getattr(call, name) for name in _CALL_FIELDS)
    hit = _selection_cache.get(key)
    if hit is not None:
        return hit
    with _lock:
        choice = _select_uncached(call)
        _selection_cache[key] = choice
        return choice


def selections() -> dict[Call, str]:
    """Every call metadata selected so far in this process and the vendor that serves it (what ran)."""
    with _lock:
        return {Call(*key): vendor.name for key, (vendor, _impl) in _selection_cache.items()}


def implementation_for(key: tuple) -> Callable[..., Any]:
    """``select(Call(*key))[1]`` for ``key`` = Call's fields as a tuple: the per-call path of every op."""
    hit = _selection_cache.get(key)
    if hit is None:
        hit = select(Call(*key))
    return hit[1]


def _select_uncached(call: Call) -> tuple[Vendor, Callable[..., Any]]:
    _discover()
    forced, source = forced_vendor(call.op)
    if forced is not None:
        vendor = get_vendor(forced)
        if vendor.provides(call.op):
            reasons = vendor.not_supported_reasons(call)
            if reasons:
                raise NotSupportedError(
                    f"{call.op}: vendor {vendor.name!r} (forced by {source}) cannot serve this call on "
                    f"{call.device_type} {str(call.dtype).replace('torch.', '')}: " + "; ".join(reasons))
            return vendor, vendor.ops[call.op]
        # A forced vendor that does not provide the op does not apply to it.
    refusals: list[tuple[str, list[str]]] = []
    for vendor in candidates(call.device_type):
        if not vendor.provides(call.op):
            continue
        reasons = vendor.not_supported_reasons(call)
        if not reasons:
            if refusals:
                _log_fallback(call, vendor.name, refusals)
            return vendor, vendor.ops[call.op]
        refusals.append((vendor.name, reasons))
    detail = " | ".join(f"{name}: {'; '.join(r)}" for name, r in refusals) or "no vendor provides it"
    raise NotSupportedError(
        f"{call.op}: no vendor can serve this call on {call.device_type} "
        f"{str(call.dtype).replace('torch.', '')} — {detail}")


def _log_fallback(call: Call, chosen: str, refusals: Iterable[tuple[str, list[str]]]) -> None:
    for name, reasons in refusals:
        key = (call.op, name, "; ".join(reasons))
        if key in _logged_fallbacks:
            continue
        _logged_fallbacks.add(key)
        logger.warning("dlinfer: %s falls back from vendor %r to %r: %s", call.op, name, chosen, "; ".join(reasons))


def default_device_type() -> str:
    """The device type dlinfer serves by default here: the first accelerator torch sees, else cpu."""
    for kind in ("cuda", "npu", "mlu", "musa", "xpu"):
        mod = getattr(torch, kind, None)
        try:
            if mod is not None and mod.is_available():
                return kind
        except Exception:  # noqa: BLE001
            continue
    return "cpu"


def vendor_for_device(device_type: str, op: str = "paged_decode_attention") -> str:
    """Name of the vendor that serves ``op`` on ``device_type`` by default (overrides included)."""
    forced, _ = forced_vendor(op)
    if forced is not None and forced in vendors() and _vendors[forced].provides(op):
        return forced
    for vendor in candidates(device_type):
        if vendor.provides(op) and (vendor.available is None or not vendor.available()):
            return vendor.name
    return "reference"
