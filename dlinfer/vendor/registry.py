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
   is warned about once per (op, vendor, reason).

:data:`REGISTRY` holds the state; tests use its public API (:meth:`Registry.forced`, :meth:`Registry.pinned`,
:meth:`Registry.snapshot` / :meth:`Registry.restore`), never its attributes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from dlinfer import settings
from dlinfer.errors import NotSupportedError, warn

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

    @staticmethod
    def make_key(op: str, device_type: str, dtype: torch.dtype, head_size: int = 0, head_size_v: int = 0,
                 block_size: int = 0, features: frozenset[str] = frozenset()) -> tuple:
        """The selection-cache key of the call with these fields (what :meth:`key` returns), without building a
        ``Call``: the per-call path of every op uses it."""
        return (op, device_type, dtype, head_size, head_size_v, block_size, features)

    def key(self) -> tuple:
        """This call's selection-cache key; ``Call(*call.key()) == call``."""
        return Call.make_key(self.op, self.device_type, self.dtype, self.head_size, self.head_size_v,
                             self.block_size, self.features)


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
        if call.features - self.features:
            from dlinfer.ops.table import FEATURES

            for feature in sorted(call.features - self.features):
                cause = FEATURES.get(feature)
                out.append(f"feature '{feature}' ({cause}) not supported" if cause else
                           f"feature '{feature}' not supported")
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
        capabilities: op name -> :class:`Capabilities`; ops missing here support everything except the opt-in
            features (``dlinfer.ops.table.OPT_IN_FEATURES``: a quantized KV cache), which a vendor serves only
            where its capabilities name them.
        extra_reasons: optional hook ``(call) -> list[str]`` for refusals the record cannot express.
        available: optional hook ``() -> str | None`` returning why the vendor cannot run at all here.
        weight_layout: optional hook ``(op, device, dtype) -> str | None``: the layout of ``op``'s weights that
            the vendor's implementation serves fastest on ``device`` (``"n_fastest"`` or ``"k_fastest"``; None: no
            preference). Engines lay weights out once, at load: see :meth:`Registry.preferred_weight_layout`.
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
    weight_layout: Callable[[str, torch.device, torch.dtype], str | None] | None = None

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
        from dlinfer.ops.table import check_vendor_function  # the op table (imports no vendor code)

        for op, fn in self.ops.items():
            check_vendor_function(self.name, op, fn)

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
        if caps is None:
            from dlinfer.ops.table import OPT_IN_FEATURES

            if call.features & OPT_IN_FEATURES:  # never implied by a missing record
                caps = Capabilities(features=call.features - OPT_IN_FEATURES)
        if caps is not None:
            reasons.extend(caps.reasons(call))
        if self.extra_reasons is not None:
            reasons.extend(self.extra_reasons(call))
        return reasons


class _Snapshot:
    """A registry's state at one moment (see :meth:`Registry.snapshot`); opaque, only for :meth:`Registry.restore`."""

    __slots__ = ("vendors", "load_errors", "discovered", "overrides", "warned")

    def __init__(self, vendors, load_errors, discovered, overrides, warned):
        self.vendors, self.load_errors, self.discovered = vendors, load_errors, discovered
        self.overrides, self.warned = overrides, warned


class Registry:
    """The vendors known to this process, the overrides, and the cached choice per call metadata.

    One instance, :data:`REGISTRY`, serves dlinfer; the module-level functions of this module are its methods.
    Every method is thread-safe: selection reads a dict without a lock on a cache hit and takes the lock to fill
    it; changing vendors or overrides clears the cache under the same lock.
    """

    def __init__(self, discover: bool = True):
        self._lock = threading.RLock()
        self._vendors: dict[str, Vendor] = {}
        self._load_errors: dict[str, str] = {}
        self._discovered = not discover
        self._discovering = False
        self._overrides: dict[str | None, str | None] = {}
        # Call.key() -> (vendor, implementation): the per-call path (implementation_for) never builds a Call.
        self._selection_cache: dict[tuple, tuple[Vendor, Callable[..., Any]]] = {}
        # The per-op caches of the eager call path (site_cache): cleared with the selection cache.
        self._site_caches: list[dict] = []
        self._warned: set[tuple[str, ...]] = set()

    # ---------------------------------------------------------------------------------- vendors
    def register_vendor(self, vendor: Vendor, *, replace: bool = False) -> None:
        """Register a vendor (in-tree or from a plugin). Re-registering a name needs ``replace=True``."""
        if not isinstance(vendor, Vendor):
            raise TypeError(f"register_vendor expects a dlinfer.vendor.Vendor, got {type(vendor).__name__}")
        with self._lock:
            if vendor.name in self._vendors and not replace and self._vendors[vendor.name] is not vendor:
                raise ValueError(f"a vendor named {vendor.name!r} is already registered")
            self._vendors[vendor.name] = vendor
            self._forget_selections()

    def unregister_vendor(self, name: str) -> None:
        with self._lock:
            self._vendors.pop(name, None)
            self._forget_selections()

    def vendors(self) -> dict[str, Vendor]:
        """All registered vendors by name."""
        self._discover()
        return dict(self._vendors)

    def load_errors(self) -> dict[str, str]:
        """Vendor plugins that failed to load, with the reason."""
        self._discover()
        return dict(self._load_errors)

    def get_vendor(self, name: str) -> Vendor:
        self._discover()
        try:
            return self._vendors[name]
        except KeyError:
            known = ", ".join(sorted(self._vendors)) or "none"
            extra = f" (failed to load: {self._load_errors[name]})" if name in self._load_errors else ""
            raise ValueError(f"unknown vendor {name!r}{extra}; registered vendors: {known}") from None

    def _discover(self) -> None:
        """Register in-tree vendors and load entry-point vendors once. Broken plugins are skipped with a warning.

        A plugin may use the registry while it is imported (e.g. to reuse the reference implementations): that
        re-entrant call, in the same thread, sees the vendors registered so far and does not restart discovery.
        Other threads wait on the lock until discovery is complete.
        """
        if self._discovered:
            return
        with self._lock:
            if self._discovered or self._discovering:
                return
            self._discovering = True
            try:
                from dlinfer.vendor import reference

                self.register_vendor(reference.VENDOR, replace=True)
                try:
                    from dlinfer.vendor import triton as triton_vendor

                    self.register_vendor(triton_vendor.VENDOR, replace=True)
                except Exception as exc:  # noqa: BLE001 - an in-tree optional vendor must never break import
                    self._load_errors["triton"] = f"{type(exc).__name__}: {exc}"
                    logger.debug("dlinfer: triton vendor unavailable: %s", exc)
                self._load_entry_points()
            finally:
                self._discovering = False
                self._discovered = True

    def _load_entry_points(self) -> None:
        from importlib.metadata import entry_points

        try:
            eps = entry_points(group=ENTRY_POINT_GROUP)
        except Exception as exc:  # noqa: BLE001
            self.warn_once(("entry_points",), f"dlinfer: could not read entry points: {exc}")
            return
        for ep in eps:
            try:
                obj = ep.load()
                vendor = obj() if callable(obj) and not isinstance(obj, Vendor) else obj
                if not isinstance(vendor, Vendor):
                    raise TypeError(f"entry point must give a dlinfer.vendor.Vendor, got {type(vendor).__name__}")
                if vendor.name in self._vendors:
                    raise ValueError(f"vendor name {vendor.name!r} is already taken")
                self.register_vendor(vendor)
                logger.debug("dlinfer: loaded vendor %s from %s", vendor.name, ep.value)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must never break `import dlinfer`
                self._load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                self.warn_once(("plugin", ep.name, ep.value),
                               f"dlinfer: skipped vendor plugin {ep.name!r} ({ep.value}): {type(exc).__name__}: {exc}")

    # -------------------------------------------------------------------------------- overrides
    def set_override(self, name: str | None, op: str | None = None) -> None:
        """Force ``name`` for ``op`` (or all ops when ``op`` is None); ``name=None`` clears the override.

        Takes precedence over the ``DLINFER_VENDOR*`` environment variables.
        """
        if name is not None:
            self.get_vendor(name)
        with self._lock:
            self._overrides[op] = name
            self._forget_selections()

    def clear_overrides(self) -> None:
        """Drop every override (and the cached choices: environment variables are read again)."""
        with self._lock:
            self._overrides.clear()
            self._forget_selections()

    @contextlib.contextmanager
    def forced(self, vendor: str | None, op: str | None = None) -> Iterator[None]:
        """Force ``vendor`` for ``op`` (all ops when None) inside the ``with`` block, then restore exactly the
        override that was there before (``vendor=None`` lifts an override for the block)."""
        if vendor is not None:
            self.get_vendor(vendor)
        with self._lock:
            had, previous = op in self._overrides, self._overrides.get(op)
            self._overrides[op] = vendor
            self._forget_selections()
        try:
            yield
        finally:
            with self._lock:
                if had:
                    self._overrides[op] = previous
                else:
                    self._overrides.pop(op, None)
                self._forget_selections()

    def forced_vendor(self, op: str) -> tuple[str | None, str]:
        """The vendor forced for ``op`` and where the force comes from (``""`` when none)."""
        overrides = self._overrides
        for key in (op, None):
            if key in overrides:
                if overrides[key] is not None:
                    return overrides[key], "set_override" + (f"(op={op!r})" if key else "")
                continue
            env = settings.vendor_override(key)
            if env:
                return env, settings.vendor_variable(key)
        return None, ""

    # --------------------------------------------------------------------------- state for tests
    def snapshot(self) -> _Snapshot:
        """Everything :meth:`restore` needs to put the registry back: vendors, load errors, overrides, the
        warnings already given. Discovery runs first, so the snapshot is complete."""
        self._discover()
        with self._lock:
            return _Snapshot(dict(self._vendors), dict(self._load_errors), self._discovered, dict(self._overrides),
                             set(self._warned))

    def restore(self, snap: _Snapshot) -> None:
        """Put back the state of ``snap`` (a :meth:`snapshot`); cached choices are dropped."""
        if not isinstance(snap, _Snapshot):
            raise TypeError(f"restore expects a Registry.snapshot(), got {type(snap).__name__}")
        with self._lock:
            self._vendors = dict(snap.vendors)
            self._load_errors = dict(snap.load_errors)
            self._discovered = snap.discovered
            self._overrides = dict(snap.overrides)
            self._warned = set(snap.warned)
            self._forget_selections()

    @contextlib.contextmanager
    def pinned(self, *names: str) -> Iterator[None]:
        """Only the vendors ``names`` are registered inside the block (whatever plugins are installed), then the
        previous state comes back: tests whose result depends on the vendor set pin it."""
        snap = self.snapshot()
        unknown = [n for n in names if n not in snap.vendors]
        if unknown:
            raise ValueError(f"pinned: unknown vendor(s) {unknown}; registered: {sorted(snap.vendors)}")
        with self._lock:
            self._vendors = {n: v for n, v in snap.vendors.items() if n in names}
            self._forget_selections()
        try:
            yield
        finally:
            self.restore(snap)

    def rediscover(self) -> None:
        """Forget every vendor and load error and run discovery again (in-tree vendors and entry points)."""
        with self._lock:
            self._vendors.clear()
            self._load_errors.clear()
            self._discovered = False
            self._forget_selections()
        self._discover()

    def clear_selection_cache(self) -> None:
        """Forget cached vendor choices (the next call of each op selects again, e.g. after env changes)."""
        with self._lock:
            self._forget_selections()

    def _forget_selections(self) -> None:
        """Under the lock: every cached choice goes, the per-op caches of the call path too."""
        self._selection_cache.clear()
        for cache in self._site_caches:
            cache.clear()

    def site_cache(self) -> dict:
        """A new, empty per-op cache for the eager call path of one op (``dlinfer.ops._dispatch``). It maps
        whatever key the op chooses (its cheapest description of the call's metadata) to what
        :meth:`fill_site` stored; the registry empties it, under its lock, whenever the choice could change
        (vendors registered or removed, overrides, pinned/restore, :meth:`clear_selection_cache`)."""
        cache: dict = {}
        with self._lock:
            self._site_caches.append(cache)
        return cache

    def fill_site(self, cache: dict, site_key: Any, call: Call,
                  make: Callable[[Vendor, Callable[..., Any]], Any]) -> Any:
        """Select for ``call`` and store ``make(vendor, implementation)`` in ``cache`` (a :meth:`site_cache`)
        under ``site_key``, all under the lock: an override changed meanwhile by another thread clears the
        cache after the entry is stored, never before, so no entry outlives the state it was chosen in."""
        with self._lock:
            vendor, impl = self.select(call)
            value = cache[site_key] = make(vendor, impl)
            return value

    # -------------------------------------------------------------------------------- selection
    def candidates(self, device_type: str) -> list[Vendor]:
        """Vendors that are an automatic choice for ``device_type``, best first."""
        self._discover()
        found = [v for v in self._vendors.values() if v.is_default_for(device_type)]
        return sorted(found, key=lambda v: (-v.priority, v.name))

    def explain(self, call: Call) -> list[tuple[str, list[str]]]:
        """Every registered vendor and why it can't serve ``call`` (empty list: it can), best first."""
        self._discover()
        ordered = sorted(self._vendors.values(), key=lambda v: (-v.priority, v.name))
        return [(v.name, v.not_supported_reasons(call)) for v in ordered]

    def select(self, call: Call) -> tuple[Vendor, Callable[..., Any]]:
        """The vendor and implementation serving ``call``. Cached per distinct call metadata."""
        key = call.key()
        hit = self._selection_cache.get(key)
        if hit is not None:
            return hit
        with self._lock:
            choice = self._select_uncached(call)
            self._selection_cache[key] = choice
            return choice

    def selections(self) -> dict[Call, str]:
        """Every call metadata selected so far in this process and the vendor that serves it (what ran)."""
        with self._lock:
            return {Call(*key): vendor.name for key, (vendor, _impl) in self._selection_cache.items()}

    def implementation_for(self, key: tuple) -> Callable[..., Any]:
        """``select(Call(*key))[1]`` for ``key`` = ``Call.key()``: the per-call path of every op."""
        hit = self._selection_cache.get(key)
        if hit is None:
            hit = self.select(Call(*key))
        return hit[1]

    def _select_uncached(self, call: Call) -> tuple[Vendor, Callable[..., Any]]:
        self._discover()
        forced, source = self.forced_vendor(call.op)
        if forced is not None:
            vendor = self.get_vendor(forced)
            if vendor.provides(call.op):
                reasons = vendor.not_supported_reasons(call)
                if reasons:
                    raise NotSupportedError(
                        f"{call.op}: vendor {vendor.name!r} (forced by {source}) cannot serve this call on "
                        f"{call.device_type} {str(call.dtype).replace('torch.', '')}: " + "; ".join(reasons))
                return vendor, vendor.ops[call.op]
            # A forced vendor that does not provide the op does not apply to it.
        refusals: list[tuple[str, list[str]]] = []
        for vendor in self.candidates(call.device_type):
            if not vendor.provides(call.op):
                continue
            reasons = vendor.not_supported_reasons(call)
            if not reasons:
                for name, why in refusals:
                    self.warn_once((call.op, name, "; ".join(why)),
                                   f"dlinfer: {call.op} falls back from vendor {name!r} to {vendor.name!r}: "
                                   + "; ".join(why))
                return vendor, vendor.ops[call.op]
            refusals.append((vendor.name, reasons))
        detail = " | ".join(f"{name}: {'; '.join(r)}" for name, r in refusals) or "no vendor provides it"
        raise NotSupportedError(
            f"{call.op}: no vendor can serve this call on {call.device_type} "
            f"{str(call.dtype).replace('torch.', '')} — {detail}")

    def preferred_weight_layout(self, op: str, device: torch.device | str, dtype: torch.dtype) -> str:
        """The layout in which an engine should store ``op``'s weights (``"k_fastest"``, the contract's documented
        layout, or ``"n_fastest"``) for calls on ``device`` in ``dtype``: what the vendor that serves such calls
        (overrides included) says its implementation serves fastest there, else ``"k_fastest"`` (also where no
        vendor serves such calls: the call itself then says why, not the engine's load). Every vendor must serve both
        layouts (the op contract takes a weight's strides); this only says which one is faster."""
        device = torch.device(device)
        try:
            vendor, _ = self.select(Call(op, device.type, dtype))
        except NotSupportedError:
            return "k_fastest"
        layout = vendor.weight_layout(op, device, dtype) if vendor.weight_layout is not None else None
        if layout not in (None, "k_fastest", "n_fastest"):
            raise ValueError(f"vendor {vendor.name}: weight_layout({op!r}) returned {layout!r} "
                             f"(expected 'k_fastest', 'n_fastest' or None)")
        return layout or "k_fastest"

    def vendor_for_device(self, device_type: str, op: str = "paged_decode_attention") -> str:
        """Name of the vendor that serves ``op`` on ``device_type`` by default (overrides included)."""
        forced, _ = self.forced_vendor(op)
        vendors = self.vendors()
        if forced is not None and forced in vendors and vendors[forced].provides(op):
            return forced
        for vendor in self.candidates(device_type):
            if vendor.provides(op) and (vendor.available is None or not vendor.available()):
                return vendor.name
        return "reference"

    # --------------------------------------------------------------------------------- warnings
    def warn_once(self, cause: tuple[str, ...], message: str) -> None:
        """A warning the user must see, once per ``cause`` in this process (see :func:`dlinfer.errors.warn`)."""
        with self._lock:
            if cause in self._warned:
                return
            self._warned.add(cause)
        warn(message)


#: The registry dlinfer uses.
REGISTRY = Registry()

register_vendor = REGISTRY.register_vendor
unregister_vendor = REGISTRY.unregister_vendor
vendors = REGISTRY.vendors
load_errors = REGISTRY.load_errors
get_vendor = REGISTRY.get_vendor
set_override = REGISTRY.set_override
clear_overrides = REGISTRY.clear_overrides
forced = REGISTRY.forced
forced_vendor = REGISTRY.forced_vendor
snapshot = REGISTRY.snapshot
restore = REGISTRY.restore
pinned = REGISTRY.pinned
rediscover = REGISTRY.rediscover
clear_selection_cache = REGISTRY.clear_selection_cache
candidates = REGISTRY.candidates
explain = REGISTRY.explain
select = REGISTRY.select
selections = REGISTRY.selections
implementation_for = REGISTRY.implementation_for
vendor_for_device = REGISTRY.vendor_for_device
preferred_weight_layout = REGISTRY.preferred_weight_layout


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
