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

Two more tools for the question "does the GPU run what the interpreter checked?":

* :func:`gpu_loops`: kernels that pick ``while`` loops for the interpreter (``WHILE_LOOP``) run the ``for`` loops a
  GPU compiles instead, so the interpreter checks the GPU's loop code too.
* ``bounds_checked(record=True)`` keeps each launch (:class:`LaunchRecord`: its arguments, the bytes of its
  tensors, the bytes each program touched), and :func:`emulate_ptx` runs a program of the kernel's compiled PTX
  (compiled with :meth:`LaunchRecord.signature`, the specialization Triton's CUDA launcher would use) thread by
  thread on that data, integer and address arithmetic only: the compiled code must touch the same bytes, and
  nothing outside the launch's tensors.
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
    record: "LaunchRecord | None" = None
    options: dict = dataclasses.field(default_factory=dict)

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
    record: bool = False  # keep LaunchRecords (arguments and the bytes each program touched) in ``records``
    records: list = dataclasses.field(default_factory=list)
    accesses: int = 0
    kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    launches: list[str] = dataclasses.field(default_factory=list)
    violations: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class LaunchRecord:
    """One launch seen by ``bounds_checked(record=True)``: what a compiled kernel needs to be replayed on the same
    data (:func:`emulate_ptx`), and the bytes each program touched under the interpreter.

    ``args``: argument name -> ``("tensor", storage index, byte offset of its pointer in the storage)`` or
    ``("value", v)``; ``storages``: each storage's bytes at launch; ``touched[program][kind]``: the set of
    ``(storage index, byte offset)`` its active lanes read (``"load"``) or wrote (``"store"``)."""

    kernel: str
    module: str  # where the @triton.jit kernel is defined
    arg_names: list
    constexprs: list
    args: dict
    storages: list
    options: dict
    touched: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, executor, launch: "_Launch", args_hst, kwargs_hst) -> "LaunchRecord":
        import ctypes

        starts = {}
        storages = []
        for r in launch.regions:
            if (r.start, r.end) not in starts:
                starts[(r.start, r.end)] = len(storages)
                storages.append(ctypes.string_at(r.start, r.end - r.start))
        args = {}
        for name, value in list(zip(executor.arg_names, args_hst)) + list(kwargs_hst.items()):
            region = next((r for r in launch.regions if r.name == name), None)
            args[name] = (("tensor", starts[(region.start, region.end)], region.pointer - region.start, value)
                          if region is not None else ("value", value))
        return cls(launch.kernel, executor.fn.__globals__["__name__"], list(executor.arg_names),
                   list(executor.constexprs), args, storages, dict(launch.options))

    def touch(self, kind, grid, storage_ids, offsets, size) -> None:
        kind = "store" if kind == "store" else "load"
        seen = self.touched.setdefault(grid, {}).setdefault(kind, set())
        for sid, off in zip(storage_ids.tolist(), offsets.tolist()):
            seen.update((sid, off + b) for b in range(size))

    def signature(self) -> tuple[dict, dict, list]:
        """``(signature, constexprs, divisible)`` as Triton's CUDA launcher specializes this launch: integers equal
        to 1 become constants, integers and pointers divisible by 16 (a pointer: its offset in a storage, storages
        being 256-byte aligned on a GPU) are marked so."""
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend

        signature, constexprs, divisible = {}, {}, []
        for name in self.arg_names:
            kind, *rest = self.args[name]
            value = rest[-1]
            if name in self.constexprs:
                signature[name], constexprs[name] = "constexpr", value
                continue
            ty, spec = native_specialize_impl(CUDABackend, value, False, True, True)[:2]
            if kind == "tensor":
                spec = "D" if rest[1] % 16 == 0 else ""
            if ty == "constexpr":
                signature[name], constexprs[name] = "constexpr", spec
                continue
            signature[name] = ty
            if spec == "D":
                divisible.append(name)
        return signature, constexprs, divisible


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
    if launch.record is not None and ok.all():
        launch.record.touch(kind, launch.grid, launch.storage_ids[inside.argmax(axis=1)],
                            lanes - launch.starts[inside.argmax(axis=1)], size)
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
                if _active().record:
                    launch.record = LaunchRecord.of(self, launch, args_hst, kwargs_hst)
                    _active().records.append(launch.record)
            return args_hst, kwargs_hst

        def call(self, *args, **kwargs):
            log = _active()
            if log is None:
                return executor_call(self, *args, **kwargs)
            outer = _launch()
            _local.launch = _Launch(getattr(self.fn, "__name__", str(self.fn)))
            _local.launch.options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
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
def bounds_checked(raise_on_violation: bool = True, int32_overflow: bool = False, one_storage: bool = True,
                   record: bool = False):
    """Check every memory access of the kernels the interpreter runs inside the block (see the module docstring);
    yields a :class:`BoundsLog` (with ``record``, its ``records`` keep each launch: :class:`LaunchRecord`)."""
    _install()
    log = BoundsLog(raise_on_violation=raise_on_violation, int32_overflow=int32_overflow, one_storage=one_storage,
                    record=record)
    stack = getattr(_local, "logs", None)
    if stack is None:
        stack = _local.logs = []
    stack.append(log)
    try:
        yield log
    finally:
        stack.pop()


@contextlib.contextmanager
def gpu_loops():
    """Run the kernels' GPU loop form under the interpreter: launches whose ``WHILE_LOOP`` compile-time argument
    picks ``while`` loops for the interpreter (its ``range()`` refuses runtime bounds: numpy 2 will not turn its
    one-element scalars into ints) get ``WHILE_LOOP=False``, the ``for`` loops a GPU compiles; while the block is
    active, ``range()`` and ``tl.range()`` in kernel code take runtime bounds and, as on a GPU, yield the induction
    variable as a Triton scalar (int32, int64 when a bound is). Yields the list of the kernels so switched (one
    entry per launch)."""
    import builtins

    import triton.language as tl
    from triton.runtime import interpreter as interp

    _install()  # the bounds checker's patches first, so that restoring these leaves them in place
    executor_call, patch_core = interp.GridExecutor.__call__, interp._patch_lang_core
    switched: list[str] = []

    def scalar_range(*bounds, **options):  # options: tl.range's num_stages, warp_specialize, ... (no effect)
        values, dtype = [], tl.int32
        for b in bounds:
            if isinstance(b, tl.constexpr):
                b = b.value
            if isinstance(b, tl.tensor):
                dtype = tl.int64 if b.dtype == tl.int64 else dtype
                b = np.asarray(b.handle.data).reshape(-1)[0]
            values.append(int(b))
        np_dtype = np.int64 if dtype == tl.int64 else np.int32
        for v in builtins.range(*values):
            yield tl.tensor(interp.TensorHandle(np.array([v], dtype=np_dtype), dtype), dtype)

    def call(self, *args, **kwargs):
        if kwargs.get("WHILE_LOOP"):
            kwargs = {**kwargs, "WHILE_LOOP": False}
            switched.append(getattr(self.fn, "__name__", str(self.fn)))
        module = self.fn.__globals__
        had, old = "range" in module, module.get("range")
        module["range"] = scalar_range
        try:
            return executor_call(self, *args, **kwargs)
        finally:
            if had:
                module["range"] = old
            else:
                del module["range"]

    def patch_lang_core(lang, scope):
        patch_core(lang, scope)
        scope.set_attr(lang, "range", scalar_range)

    interp.GridExecutor.__call__, interp._patch_lang_core = call, patch_lang_core
    try:
        yield switched
    finally:
        interp.GridExecutor.__call__, interp._patch_lang_core = executor_call, patch_core


# ---------------------------------------------------------------------------------------------------------------
# The same question for compiled code: which bytes does the PTX a GPU runs touch?
#
# A small emulator of the integer part of PTX: each thread of one program runs alone through the kernel's
# straight-line code and loops (integer, predicate and address arithmetic, parameter and global loads from the
# recorded storages); floating-point work, shared memory, warp shuffles and tensor-core instructions produce unknown
# values, which must never reach an address or a load's predicate (that raises). A branch on an unknown (float)
# predicate is not taken: in Triton's PTX those guard the slow paths of exp2/log2, which compute no address.

_PTX_MASK = {8: 0xFF, 16: 0xFFFF, 32: 0xFFFFFFFF, 64: (1 << 64) - 1}
_PTX_FLOAT = ("f16", "f32", "f64", "bf16", "f16x2", "bf16x2")
_PTX_OPAQUE = ("bar", "fence", "wgmma", "stmatrix", "ldmatrix", "shfl", "ex2", "fma", "rcp", "lg2", "sqrt",
               "griddepcontrol", "membar", "atom", "red", "cp", "mbarrier", "tcgen05", "elect")


class _Unknown(Exception):
    pass


def _bits(t: str) -> int:
    digits = "".join(ch for ch in t if ch.isdigit())
    return int(digits) if digits else 32


def _signed(v: int, w: int) -> int:
    v &= _PTX_MASK[w]
    return v - (1 << w) if v >> (w - 1) & 1 else v


def _split_operands(text: str) -> list[str]:
    ops, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            ops.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return ops + ([cur.strip()] if cur.strip() else [])


def _parse_ptx(ptx: str):
    """``(instructions, labels, name, threads)`` of the only kernel in ``ptx``."""
    import re

    name = re.search(r"\.entry\s+(\w+)", ptx).group(1)
    threads = int(re.search(r"\.reqntid\s+(\d+)", ptx).group(1))
    body, labels = [], {}
    lines = ptx.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "{")
    for line in lines[start + 1:]:
        text = line.split("//")[0].strip()
        if not text or text[0] in "{}." or text.startswith("$L__func"):
            continue
        if text.endswith(":"):
            labels[text[:-1]] = len(body)
            continue
        body += [part.strip() for part in text.split(";") if part.strip()]
    parsed = []
    for ins in body:
        pred = None
        if ins.startswith("@"):
            pred, ins = ins.split(None, 1)
        opcode, _, rest = ins.partition(" ")
        parsed.append((pred, opcode, opcode.split("."), _split_operands(rest)))
    return parsed, labels, name, threads


class _Thread:
    def __init__(self, tid: int, program: tuple, params: dict, read):
        self.regs = {"%tid.x": tid, "%tid.y": 0, "%tid.z": 0, "%ctaid.x": program[0], "%ctaid.y": program[1],
                     "%ctaid.z": program[2], "%ntid.x": 0}
        self.params, self.read = params, read

    def get(self, op: str) -> int:
        if op.startswith("%"):
            v = self.regs.get(op)
            if v is None:
                raise _Unknown(op)
            return v
        if op[:2] in ("0f", "0d"):
            return int(op[2:], 16)
        if op in ("global_smem",):
            return 0
        return int(op, 0) & _PTX_MASK[64]

    def address(self, op: str) -> int:
        inner = op.strip()[1:-1].replace(" ", "")
        base, _, offset = inner.partition("+")
        value = self.params[base] if base in self.params else self.get(base)
        return value + (int(offset, 0) if offset else 0)

    def put(self, reg: str, value, w: int) -> None:
        self.regs[reg] = None if value is None else value & _PTX_MASK[w]


def _float_compare(cmp: str, typ: str, a_bits: int, b_bits: int) -> int:
    def value(bits):
        if typ == "f32":
            return float(np.uint32(bits).view(np.float32))
        if typ == "f64":
            return float(np.uint64(bits).view(np.float64))
        if typ == "f16":
            return float(np.uint16(bits & 0xFFFF).view(np.float16))
        if typ == "bf16":
            return float(np.uint32((bits & 0xFFFF) << 16).view(np.float32))
        raise _Unknown(typ)

    a, b = value(a_bits), value(b_bits)
    unordered = a != a or b != b
    if cmp in ("nan", "num"):
        return int(unordered == (cmp == "nan"))
    base = cmp[:-1] if cmp.endswith("u") else cmp  # ltu, neu, ...: true when unordered; lt, ne, ...: false
    if unordered:
        return int(base != cmp)
    return int({"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b, "eq": a == b, "ne": a != b}[base])


def _register_bits(reg: str) -> int:
    return 64 if reg.startswith("%rd") else 16 if reg.startswith("%rs") else 32


def _step(t: _Thread, opcode, parts, ops, accesses) -> None:  # noqa: C901 - one branch per PTX opcode family
    base, typ = parts[0], parts[-1]
    if base in _PTX_OPAQUE or (any(p in _PTX_FLOAT for p in parts[1:])
                                and base not in ("ld", "st", "cvt", "mov", "setp", "selp")):
        if ops and ops[0].startswith("%"):
            t.regs[ops[0]] = None
        return
    if base == "ld":
        space, w = parts[1], _bits(typ)
        if space == "param":
            t.put(ops[0], t.params[ops[1].strip("[] ")], w)
        elif space == "global":
            address = t.address(ops[1])
            regs = [r.strip() for r in ops[0].strip("{} ").split(",")]
            for i, reg in enumerate(regs):
                t.put(reg, t.read(address + i * w // 8, w // 8), _register_bits(reg))
            accesses.append(("load", address, w // 8 * len(regs)))
        else:  # shared / local: not tracked
            for reg in ops[0].strip("{} ").split(","):
                t.regs[reg.strip()] = None
        return
    if base == "st":
        if parts[1] == "global":
            accesses.append(("store", t.address(ops[0]), _bits(typ) // 8 * len(ops[1].strip("{} ").split(","))))
        return
    if base == "mov":
        if typ == "pred":
            t.regs[ops[0]] = t.get(ops[1]) & 1
        elif ops[1].startswith("{"):  # a vector packed into one register, its first element in the low bits
            regs = [r.strip() for r in ops[1].strip("{} ").split(",")]
            width = _bits(typ) // len(regs)
            t.put(ops[0], sum((t.get(r) & _PTX_MASK[width]) << (i * width) for i, r in enumerate(regs)), _bits(typ))
        elif ops[0].startswith("{"):  # one register unpacked into a vector
            regs = [r.strip() for r in ops[0].strip("{} ").split(",")]
            width = _bits(typ) // len(regs)
            try:
                value = t.get(ops[1])
            except _Unknown:
                for r in regs:
                    t.regs[r] = None
                return
            for i, r in enumerate(regs):
                t.put(r, value >> (i * width), width)
        else:
            t.put(ops[0], t.get(ops[1]), _bits(typ))
        return
    if base == "cvt":
        dst, src = parts[-2], parts[-1]
        if dst in _PTX_FLOAT or src in _PTX_FLOAT:
            t.regs[ops[0]] = None
            return
        v = t.get(ops[1])
        v = _signed(v, _bits(src)) if src[0] == "s" else v & _PTX_MASK[_bits(src)]
        t.put(ops[0], v, _bits(dst))
        return
    if base == "setp":
        if typ in _PTX_FLOAT:  # decidable on loaded values (a combine's "lse != -inf"), unknown after float math
            t.regs[ops[0]] = _float_compare(parts[1], typ, t.get(ops[1]), t.get(ops[2]))
            return
        w = _bits(typ)
        a, b = t.get(ops[1]), t.get(ops[2])
        a, b = (_signed(a, w), _signed(b, w)) if typ[0] == "s" else (a & _PTX_MASK[w], b & _PTX_MASK[w])
        t.regs[ops[0]] = int({"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b, "eq": a == b, "ne": a != b,
                              "lo": a < b, "ls": a <= b, "hi": a > b, "hs": a >= b}[parts[1]])
        return
    if base == "selp":
        t.put(ops[0], t.get(ops[1]) if t.get(ops[3]) else t.get(ops[2]), _bits(typ))
        return
    if typ == "pred":
        a = t.get(ops[1])
        t.regs[ops[0]] = (1 - a) if base == "not" else {"and": a & t.get(ops[2]), "or": a | t.get(ops[2]),
                                                         "xor": a ^ t.get(ops[2])}[base]
        return
    w = _bits(typ)

    def value(op):
        return _signed(t.get(op), w) if typ[0] == "s" else t.get(op) & _PTX_MASK[w]

    if base in ("add", "sub", "and", "or", "xor", "min", "max"):
        a, b = value(ops[1]), value(ops[2])
        r = {"add": a + b, "sub": a - b, "and": a & b, "or": a | b, "xor": a ^ b, "min": min(a, b),
             "max": max(a, b)}[base]
        t.put(ops[0], max(r, 0) if "relu" in parts else r, w)
    elif base in ("neg", "not", "abs"):
        a = value(ops[1])
        t.put(ops[0], {"neg": -a, "not": ~a, "abs": abs(a)}[base], w)
    elif base in ("mul", "mad"):
        a, b = value(ops[1]), value(ops[2])
        wide = parts[1] == "wide"
        r = (a * b) >> w if parts[1] == "hi" else a * b
        if base == "mad":
            r += _signed(t.get(ops[3]), 2 * w if wide else w) if typ[0] == "s" else t.get(ops[3])
        t.put(ops[0], r, 2 * w if wide else w)
    elif base in ("shl", "shr"):
        a, n = value(ops[1]), t.get(ops[2]) & 0xFFFFFFFF
        r = a << n if base == "shl" else (a >> n if n < w else (-1 if a < 0 else 0))
        t.put(ops[0], r, w)
    elif base == "bfe":
        a, pos, n = t.get(ops[1]) & _PTX_MASK[w], t.get(ops[2]) & 0xFF, t.get(ops[3]) & 0xFF
        r = (a >> pos) & ((1 << n) - 1) if n else 0
        t.put(ops[0], r - (1 << n) if typ[0] == "s" and n and r >> (n - 1) & 1 else r, w)
    elif base in ("div", "rem"):
        a, b = value(ops[1]), value(ops[2])
        q = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
        t.put(ops[0], q if base == "div" else a - q * b, w)
    else:
        raise NotImplementedError(f"PTX emulator: {opcode}")


def emulate_ptx(ptx: str, record: LaunchRecord, program: tuple) -> dict:
    """Run program ``program`` (``(x, y, z)``) of the compiled kernel ``ptx`` (the PTX of ``record``'s kernel,
    compiled with ``record.signature()``) on ``record``'s data, thread by thread; returns ``{"load": set,
    "store": set}`` of ``(storage index, byte offset)`` it touches, as :attr:`LaunchRecord.touched` holds them.
    Raises :class:`OutOfBounds` for an access outside every storage of the launch (an illegal address)."""
    instructions, labels, name, threads = _parse_ptx(ptx)
    bases = [(i + 1) << 36 for i in range(len(record.storages))]  # 256-byte aligned, far apart
    params, index = {}, 0
    signature, _, _ = record.signature()
    for arg in record.arg_names:
        if signature[arg] == "constexpr":
            continue
        kind, *rest = record.args[arg]
        if kind == "tensor":
            value = bases[rest[0]] + rest[1]
        elif isinstance(rest[-1], float):
            value = int.from_bytes(np.float32(rest[-1]).tobytes(), "little")
        else:
            value = int(rest[-1]) & _PTX_MASK[64]
        params[f"{name}_param_{index}"] = value
        index += 1
    while f"{name}_param_{index}" in ptx:  # the scratch pointers Triton appends
        params[f"{name}_param_{index}"] = 0
        index += 1

    def where(address: int, size: int):
        sid = (address >> 36) - 1
        offset = address - bases[sid] if 0 <= sid < len(bases) else -1
        if not (0 <= sid < len(bases) and 0 <= offset and offset + size <= len(record.storages[sid])):
            raise OutOfBounds(f"{name}{program}: the compiled kernel touches {size} bytes at {address:#x}, outside "
                              "every tensor of the launch")
        return sid, offset

    def read(address: int, size: int) -> int:
        sid, offset = where(address, size)
        return int.from_bytes(record.storages[sid][offset:offset + size], "little")

    touched = {"load": set(), "store": set()}
    for tid in range(threads):
        t, pc, accesses = _Thread(tid, program, params, read), 0, []
        while pc < len(instructions):
            pred, opcode, parts, ops = instructions[pc]
            pc += 1
            if pred is not None:
                flag = t.regs.get(pred.lstrip("@!"))
                if flag is None:
                    if parts[0] in ("bra", "ret"):
                        continue
                    if parts[0] in ("ld", "st") and parts[1] == "global":
                        raise _Unknown(f"{name}: the predicate of '{opcode}' depends on a float")
                    if ops and ops[0].startswith("%"):
                        t.regs[ops[0]] = None
                    continue
                if bool(flag) == pred.startswith("@!"):
                    continue
            if parts[0] == "bra":
                pc = labels[ops[0]]
                continue
            if parts[0] == "ret":
                break
            try:
                _step(t, opcode, parts, ops, accesses)
            except _Unknown:
                if parts[0] in ("ld", "st") and parts[1] == "global":
                    raise
                if ops and ops[0].startswith("%"):
                    t.regs[ops[0]] = None
        for kind, address, size in accesses:
            sid, offset = where(address, size)
            touched[kind].update((sid, offset + b) for b in range(size))
    return touched
