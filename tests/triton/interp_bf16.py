"""bfloat16 arithmetic for Triton's interpreter (tests only).

Triton 3.6's interpreter keeps bfloat16 values as their raw ``uint16`` bits (numpy has no bfloat16) and runs
arithmetic on them as if they were integers: ``a * b`` of two bf16 blocks, a bf16 ``tl.dot`` or ``tl.fma`` give
garbage (a 16x16 bf16 dot is off by ~1e10), and it truncates float32 -> bfloat16 casts. Loads, stores, bitcasts,
upcasts and ``tl.where`` are right. On a
GPU each bf16 operation is exact in float32 and rounded to bfloat16 once (round to nearest even), and a bf16 dot
accumulates in float32; :func:`install` makes the interpreter do exactly that, so that the Triton kernels' bf16
paths can be checked on a CPU. It patches ``InterpreterBuilder`` in this process only (the tests' conftest calls it).
"""

from __future__ import annotations

import numpy as np

_INSTALLED = False


def to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (``uint16``) -> float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values -> bfloat16 bits, rounded to nearest, ties to even; NaN stays NaN, infinities stay."""
    values = np.asarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if np.any(nan):
        rounded = np.where(nan, ((bits >> 16) | np.uint32(0x0040)).astype(np.uint16), rounded)
    return rounded


def install() -> None:
    """Patch Triton's interpreter so that bf16 arithmetic runs in float32 with one rounding per operation."""
    global _INSTALLED
    if _INSTALLED:
        return
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    handle = interp.TensorHandle
    bf16 = tl.bfloat16

    def is_bf16(h) -> bool:
        return getattr(h, "dtype", None) is not None and h.dtype.scalar == bf16

    def widen(h):
        return handle(to_f32(h.data), tl.float32) if is_bf16(h) else h

    def narrow(result, dtype):
        """A float32 result of an op on bf16 operands, back to bf16 (comparisons' booleans are kept)."""
        if dtype.scalar == bf16 and result.data.dtype == np.float32:
            return handle(to_bf16(result.data), bf16)
        return result

    binary_op, ternary_op, unary_op = builder.binary_op, builder.ternary_op, builder.unary_op
    cast_impl = builder.cast_impl
    create_fma, create_dot = builder.create_fma, builder.create_dot

    def patched_binary(self, lhs, rhs, op):
        if is_bf16(lhs) or is_bf16(rhs):
            return narrow(binary_op(self, widen(lhs), widen(rhs), op), lhs.dtype)
        return binary_op(self, lhs, rhs, op)

    def patched_ternary(self, lhs, rhs, other, op):
        if op is np.clip and (is_bf16(lhs) or is_bf16(rhs) or is_bf16(other)):
            return narrow(ternary_op(self, widen(lhs), widen(rhs), widen(other), op), other.dtype)
        return ternary_op(self, lhs, rhs, other, op)  # tl.where on bf16 bits moves bits: right as is

    def patched_unary(self, arg, op):
        if is_bf16(arg):
            return narrow(unary_op(self, widen(arg), op), arg.dtype)
        return unary_op(self, arg, op)

    def patched_fma(self, x, y, z):
        if is_bf16(x) or is_bf16(y) or is_bf16(z):  # one rounding of x * y + z, as a fused multiply-add
            wide = handle(widen(x).data.astype(np.float64) * widen(y).data + widen(z).data, tl.float64)
            return handle(to_bf16(wide.data.astype(np.float32)), bf16) if is_bf16(z) else \
                handle(wide.data.astype(np.float32), z.dtype.scalar)
        return create_fma(self, x, y, z)

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if is_bf16(a) or is_bf16(b):  # float32 products of the exact bf16 values, float32 accumulation
            return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def patched_cast(self, src, dst_type):
        """Conversions to/from bf16 through float32 values (the interpreter cast bf16 bits as integers between bf16
        and other types, and truncated float32 -> bf16); float32 -> bf16 rounds to nearest even, as the GPU."""
        src_bf16, dst_bf16 = src.dtype.scalar == bf16, dst_type.scalar == bf16
        if src_bf16 == dst_bf16:
            return cast_impl(self, src, dst_type)
        if dst_bf16:
            return handle(to_bf16(src.data.astype(np.float32)), bf16)
        return handle(to_f32(src.data).astype(interp._get_np_dtype(dst_type)), dst_type.scalar)

    builder.binary_op, builder.ternary_op, builder.unary_op = patched_binary, patched_ternary, patched_unary
    builder.cast_impl = patched_cast
    builder.create_fma, builder.create_dot = patched_fma, patched_dot
    _INSTALLED = True
