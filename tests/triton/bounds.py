"""Bounds checking for Triton's interpreter (``TRITON_INTERPRET=1``): every memory access a kernel makes must land
inside a tensor that was passed to its launch.

The interpreter reads and writes raw process memory: an out-of-range lane of a ``tl.load`` returns whatever lies
there (usually silently, and if the garbage is later masked out of the result the test still passes), where the
same kernel on a GPU reads another buffer or faults (``an illegal memory access was encountered``). While
:func:`bounds_checked` is active, each ``tl.load`` / ``tl.store`` / atomic the interpreter executes (pointer,
block-pointer and tensor-descriptor forms: they all reach the builder's ``create_masked_load`` /
``create_masked_store`` / ``create_atomic_*``) checks every lane whose mask is on (every lane without a mask): its
bytes ``[address, address + element size)`` must lie inside the storage of one tensor argument of the launch
(``untyped_storage().data_ptr()`` .. ``+ nbytes()``; views, tuples of tensors and tensor descriptors count by
their whole storage, so legitimately aliased views and reads past a view into its own buffer are never flagged).
A violation raises :class:`OutOfBounds` naming the kernel, the program id, the access, the tensor argument
nearest to the bad address, and the offending lanes with their offsets from that argument's pointer.

An out-of-range lane may land inside a neighbouring tensor of the same launch (the allocator packs small tensors
together), where the test above cannot see it; but one access of a kernel never reads two tensors legitimately
(every lane's pointer comes from one pointer argument), so ``one_storage=True`` (the default) also reports an
access whose lanes fall in the storages of two different arguments.

``int32_overflow=True`` also checks the signed 32-bit integer ``+``, ``-`` and ``*`` the kernel computes (every
lane: masks are not known there): a result that wraps around raises, since offsets computed in int32 for a large
tensor wrap the same way on a GPU and may land inside another buffer.

Usage::

    with bounds_checked() as log:   # raises at the first violation
        run_the_op(...)
    assert log.accesses > 0

    with bounds_checked(raise_on_violation=False) as log:   # records them all
        ...
    assert not log.violations, log.violations

Only this process's interpreter is patched, and only while a ``bounds_checked`` block is active (the patches are
installed once and are no-ops otherwise).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading

import numpy as np

MAX_LANES_SHOWN = 8


class OutOfBounds(AssertionError):
    """A kernel under :func:`bounds_checked` touched memory outside every tensor argument of its launch."""


@dataclasses.dataclass(frozen=True)
class _Region:
    name: str  # argument name (with the index inside a tuple: "kv_scales[1]")
    start: int  # storage start address
    end: int  # storage end address (exclusive)
    pointer: int  # the argument's own data_ptr (a view's offset into the storage)
    element_size: int


@dataclasses.dataclass
class _Launch:
    kernel: str
    grid: tuple | None = None
    regions: tuple[_Region, ...] = ()
    starts: np.ndarray | None = None
    ends: np.ndarray | None = None
    storage_ids: np.ndarray | None = None

    def set_regions(self, regions: list[_Region]) -> None:
        self.regions = tuple(regions)
        self.starts = np.array([r.start for r in regions], dtype=np.uint64)
        self.ends = np.array([r.end for r in regions], dtype=np.uint64)
        ids: dict[tuple[int, int], int] = {}
        self.storage_ids = np.array([ids.setdefault((r.start, r.end), len(ids)) for r in regions], dtype=np.int64)


@dataclasses.dataclass
class BoundsLog:
    """What a :func:`bounds_checked` block saw: ``accesses`` (memory operations checked; ``kinds`` counts them by
    kind: load, store, atomic_rmw, atomic_cas), ``launches`` (kernel
    launches, by name), ``violations`` (messages; only filled when not raising)."""

    raise_on_violation: bool = True
    int32_overflow: bool = False
    one_storage: bool = True
    accesses: int = 0
    kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    launches: list[str] = dataclasses.field(default_factory=list)
    violations: list[str] = dataclasses.field(default_factory=list)


_local = threading.local()
_install_lock = threading.Lock()
_installed = False


def _active() -> BoundsLog | None:
    stack = getattr(_local, "logs", None)
    return stack[-1] if stack else None


def _launch() -> _Launch | None:
    return getattr(_local, "launch", None)


def _regions_of(name: str, arg, out: list[_Region]) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(arg, (tuple, list)):
        for i, item in enumerate(arg):
            _regions_of(f"{name}[{i}]", item, out)
    elif isinstance(arg, TensorDescriptor):
        _regions_of(f"{name}.base", arg.base, out)
    elif hasattr(arg, "untyped_storage") and hasattr(arg, "data_ptr"):
        storage = arg.untyped_storage()
        start = storage.data_ptr()
        out.append(_Region(name, start, start + storage.nbytes(), arg.data_ptr(), arg.element_size()))


def _describe(region: _Region, address: int) -> str:
    delta = address - region.pointer
    where = ("before its storage" if address < region.start else
             "past its storage's end" if address >= region.end else "inside its storage")
    elems = f"{delta // region.element_size} elements" if delta % region.element_size == 0 else f"{delta} bytes"
    return f"{region.name}{'+' if delta >= 0 else ''}{elems} ({where}; storage {region.end - region.start} bytes)"


def _nearest(launch: _Launch, address: int) -> _Region | None:
    best, best_dist = None, None
    for r in launch.regions:
        dist = r.start - address if address < r.start else max(0, address - r.end + 1)
        if best_dist is None or dist < best_dist:
            best, best_dist = r, dist
    return best


def _report(log: BoundsLog, message: str) -> None:
    if log.raise_on_violation:
        raise OutOfBounds(message)
    log.violations.append(message)


def _check(kind: str, ptrs, mask, dtype_tt) -> None:
    log, launch = _active(), _launch()
    if log is None or launch is None:
        return
    log.accesses += 1
    log.kinds[kind] += 1
    addresses = np.asarray(ptrs.data).astype(np.uint64, copy=False)
    on = np.ones(addresses.shape, dtype=bool) if mask is None else np.broadcast_to(
        np.asarray(mask.data).astype(bool), addresses.shape)
    size = max(1, dtype_tt.primitive_bitwidth // 8)
    if not on.any():
        return
    lanes = addresses[on]
    if launch.starts is None or not len(launch.starts):
        inside = np.zeros((lanes.size, 0), dtype=bool)
    else:
        last = lanes + np.uint64(size)
        inside = ((lanes[:, None] >= launch.starts[None, :]) & (last[:, None] <= launch.ends[None, :])
                  & (last[:, None] > lanes[:, None]))
    ok = inside.any(axis=1)
    if ok.all():
        if log.one_storage and inside.shape[1] > 1:
            # every lane of one access comes from one pointer argument: lanes in two different storages mean
            # that one of them ran out of its tensor into a neighbouring one
            storage = launch.storage_ids[inside.argmax(axis=1)]
            if (storage != storage[0]).any():
                names = sorted({launch.regions[int(i)].name for i in np.unique(inside.argmax(axis=1))})
                _report(log, f"{launch.kernel}{launch.grid}: one {kind} of {dtype_tt} spans the storages of "
                             f"{names} (a lane ran out of its tensor into another one; "
                             "bounds_checked(one_storage=False) allows it)")
        return
    bad_index = np.argwhere(on)[~ok]
    bad_addr = lanes[~ok]
    first = int(bad_addr[0])
    region = _nearest(launch, first)
    shown = []
    for idx, addr in list(zip(bad_index, bad_addr))[:MAX_LANES_SHOWN]:
        near = _nearest(launch, int(addr))
        shown.append(f"lane {tuple(int(i) for i in idx)}: " + (_describe(near, int(addr)) if near else hex(int(addr))))
    nearest = f"nearest argument {region.name!r}" if region else "no tensor arguments"
    message = (f"{launch.kernel}{launch.grid}: {kind} of {dtype_tt} out of bounds in {int((~ok).sum())} of "
               f"{int(on.sum())} active lanes (block {tuple(addresses.shape)}); {nearest}; " + "; ".join(shown))
    _report(log, message)


def _check_int32(op: str, lhs, rhs, result) -> None:
    log, launch = _active(), _launch()
    if log is None or launch is None or not log.int32_overflow:
        return
    if np.asarray(result.data).dtype != np.int32:
        return
    wide = {"add": np.add, "sub": np.subtract, "mul": np.multiply}[op](
        np.asarray(lhs.data).astype(np.int64), np.asarray(rhs.data).astype(np.int64))
    wrapped = wide != np.asarray(result.data).astype(np.int64)
    if wrapped.any():
        idx = np.argwhere(np.broadcast_to(wrapped, np.shape(wide)))[:MAX_LANES_SHOWN]
        values = np.broadcast_to(wide, np.shape(wide))
        lanes = "; ".join(f"lane {tuple(int(i) for i in ix)}: {int(values[tuple(ix)])}" for ix in idx)
        _report(log, f"{launch.kernel}{launch.grid}: int32 {op} wraps around in {int(wrapped.sum())} lanes "
                     f"(exact results {lanes})")


def _install() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        from triton.runtime import interpreter as interp
        from triton.runtime.errors import InterpreterError

        builder = interp.InterpreterBuilder
        set_grid_idx = builder.set_grid_idx
        executor_call, init_args = interp.GridExecutor.__call__, interp.GridExecutor._init_args_hst

        def checked(kind, original, ptr_at, mask_at):
            """``original`` (a builder method) preceded by the check of its pointers (positional argument
            ``ptr_at``) under its mask (``mask_at``; None: every lane)."""
            def patched(self, *args, **kwargs):
                ptrs = args[ptr_at]
                _check(kind, ptrs, None if mask_at is None else args[mask_at], ptrs.get_element_ty())
                return original(self, *args, **kwargs)
            return patched

        def set_grid(self, x, y, z):
            launch = _launch()
            if launch is not None:
                launch.grid = (x, y, z)
            return set_grid_idx(self, x, y, z)

        def init_args_hst(self, args_dev, kwargs):
            args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
            launch = _launch()
            if launch is not None:
                regions: list[_Region] = []
                for name, arg in zip(self.arg_names, args_hst):
                    _regions_of(name, arg, regions)
                for name, arg in kwargs_hst.items():
                    _regions_of(name, arg, regions)
                launch.set_regions(regions)
            return args_hst, kwargs_hst

        def call(self, *args, **kwargs):
            log = _active()
            if log is None:
                return executor_call(self, *args, **kwargs)
            outer = _launch()
            _local.launch = _Launch(getattr(self.fn, "__name__", str(self.fn)))
            log.launches.append(_local.launch.kernel)
            try:
                return executor_call(self, *args, **kwargs)
            except InterpreterError as exc:  # the interpreter wraps what the kernel raised (once per @jit call level)
                cause = exc.__cause__
                while isinstance(cause, InterpreterError):
                    cause = cause.__cause__
                if isinstance(cause, OutOfBounds):
                    raise OutOfBounds(str(cause)) from None
                raise
            finally:
                _local.launch = outer

        def int_op(op, original):
            def patched(self, lhs, rhs):
                result = original(self, lhs, rhs)
                _check_int32(op, lhs, rhs, result)
                return result
            return patched

        builder.create_masked_load = checked("load", builder.create_masked_load, 0, 1)  # (ptrs, mask, other, ...)
        builder.create_masked_store = checked("store", builder.create_masked_store, 0, 2)  # (ptrs, value, mask, ...)
        builder.create_atomic_rmw = checked("atomic_rmw", builder.create_atomic_rmw, 1, 3)  # (op, ptr, val, mask..)
        builder.create_atomic_cas = checked("atomic_cas", builder.create_atomic_cas, 0, None)  # (ptr, cmp, val, ..)
        builder.set_grid_idx = set_grid
        builder.create_add = int_op("add", builder.create_add)
        builder.create_sub = int_op("sub", builder.create_sub)
        builder.create_mul = int_op("mul", builder.create_mul)
        interp.GridExecutor.__call__, interp.GridExecutor._init_args_hst = call, init_args_hst
        _installed = True


@contextlib.contextmanager
def bounds_checked(raise_on_violation: bool = True, int32_overflow: bool = False, one_storage: bool = True):
    """Check every memory access of the kernels the interpreter runs inside the block (see the module docstring);
    yields a :class:`BoundsLog`."""
    _install()
    log = BoundsLog(raise_on_violation=raise_on_violation, int32_overflow=int32_overflow, one_storage=one_storage)
    stack = getattr(_local, "logs", None)
    if stack is None:
        stack = _local.logs = []
    stack.append(log)
    try:
        yield log
    finally:
        stack.pop()
