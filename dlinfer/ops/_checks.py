"""Argument checks shared by the op wrappers.

Two kinds: metadata checks (shapes, dtypes, devices, counts) run on every call, on the host, from tensor
metadata only; value checks (slot ids, expert ids, lengths vs. the block table) read tensor contents, which on
an accelerator means a host sync: they always run for CPU tensors and, on accelerators, only when
``DLINFER_CHECK=1`` and no CUDA graph is being captured. Every violation is a ``ValueError`` (``TypeError`` for
a wrong Python type) that names the argument and says what was expected.
"""

from __future__ import annotations

import torch

from dlinfer import settings

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor(name: str, value, *, ndim: int | tuple[int, ...] | None = None, dtypes=None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            noun = "dimension" if allowed == (1,) else "dimensions"
            raise ValueError(f"{name} must have {want} {noun}, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in ({', '.join(_dt(d) for d in dtypes)}), got {_dt(value.dtype)}")
    return value


def integer(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be an int, got a tensor of shape {tuple(value.shape)}")
        if value.dtype == torch.bool:
            raise TypeError(f"{name} must be an int, got a bool tensor")
        item = value.item()
        if isinstance(item, float) and not item.is_integer():
            raise ValueError(f"{name} must be an integer, got {item} (a non-integral value is never truncated)")
        value = int(item)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not value == value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def same_device(**tensors: torch.Tensor | None) -> None:
    items = [(k, t) for k, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; all must share a device")


def same_dtype(**tensors: torch.Tensor | None) -> None:
    items = [(k, t) for k, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise ValueError(
                f"{name} has dtype {_dt(t.dtype)} but {first_name} has {_dt(first.dtype)}; they must match"
            )


def dim_is(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] must equal {what} ({expected}), got shape {tuple(t.shape)}")


def last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 in its last dimension, got strides {t.stride()}")


def heads(num_q_heads: int, num_kv_heads: int) -> None:
    integer("num_q_heads", num_q_heads, minimum=1)
    integer("num_kv_heads", num_kv_heads, minimum=1)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")


def distinct(**tensors: torch.Tensor) -> None:
    """Arguments written in place must not be the same memory (a cheap check: same first element address), or
    one write would clobber the other (e.g. the same tensor as key and value cache loses the keys)."""
    if torch.compiler.is_compiling():  # traced: functionalization sees the aliasing, and data_ptr is not traceable
        return
    items = [(k, t) for k, t in tensors.items() if t is not None and t.numel() and not t.is_meta]
    for i, (name_a, a) in enumerate(items):
        for name_b, b in items[i + 1:]:
            if a.device == b.device and a.data_ptr() == b.data_ptr():
                raise ValueError(f"{name_a} and {name_b} are the same memory; they must be distinct tensors "
                                 "(one is written in place)")


#: Device types whose tensors live in host memory: value checks cost no sync there, so they (and the check of
#: each vendor result) always run. ``"cpu"``, or nothing: the benchmarks model an accelerator on the CPU by
#: emptying it (:func:`set_host_device_types`).
HOST_DEVICE_TYPES: frozenset[str] = frozenset({"cpu"})
_cpu_is_host = True


def set_host_device_types(types: frozenset[str]) -> None:
    """Replace :data:`HOST_DEVICE_TYPES` (``{"cpu"}`` or empty); the ops' cached vendor choices are dropped."""
    global HOST_DEVICE_TYPES, _cpu_is_host
    types = frozenset(types)
    if not types <= {"cpu"}:
        raise ValueError(f"host device types are 'cpu' or none, got {sorted(types)}")
    HOST_DEVICE_TYPES, _cpu_is_host = types, "cpu" in types
    from dlinfer.vendor.registry import REGISTRY

    REGISTRY.clear_selection_cache()


def values_checked(*tensors: torch.Tensor) -> bool:
    """Whether checks that read tensor values run for these tensors (see module doc)."""
    for t in tensors:
        if t is not None and not (_cpu_is_host and t.is_cpu):
            break
    else:
        return True
    if not settings.check_values():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def in_range(name: str, t: torch.Tensor, low: int, high: int, what: str, *, allow: int | None = None) -> None:
    """Every element in [low, high) (``allow`` is an extra permitted value, e.g. -1 for padding)."""
    if t.numel() == 0:
        return
    vals = t if allow is None else t[t != allow]
    if vals.numel() == 0:
        return
    lo, hi = int(vals.min()), int(vals.max())
    if lo < low or hi >= high:
        extra = f" or {allow}" if allow is not None else ""
        bad = lo if lo < low else hi
        raise ValueError(f"{name} must hold values in [{low}, {high}){extra} ({what}), found {bad}")
