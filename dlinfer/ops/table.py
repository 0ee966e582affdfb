"""The op table: every op of the contract declared once.

Each :class:`OpDef` gives an op's name, kind, the vendor signature (the arguments of ``torch.ops.dlinfer.<name>``,
in order, and which of them it writes in place), what it returns (count, shapes and dtypes, as a function of its
arguments), the call features a call of it can carry, the module of the ``reference`` vendor that implements it,
and a one-line summary. From this table:

* :func:`define` creates the ``torch.library`` custom op and its fake implementation (``ops/<family>.py`` writes
  only the selection logic and the public, LMDeploy-shaped wrapper);
* ``dlinfer.ops.CORE_OPS`` / ``EXTRA_OPS``, the ``reference`` vendor's op table, ``dlinfer info`` and the
  conformance kit list the ops;
* :func:`check_vendor_function` checks a vendor's implementation against the signature when the vendor is
  registered, and :func:`check_result` checks what it returned (CPU always, elsewhere with ``DLINFER_CHECK=1``).

Adding an op: one entry here, the custom op's selection function and public wrapper in ``ops/<family>.py``, the
reference implementation in ``vendor/reference/<family>.py``, and its conformance cases.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

from dlinfer.errors import VendorContractError

Meta = tuple[tuple[int, ...], torch.dtype]

KINDS = ("elementwise", "attention", "paged", "moe", "matmul")


@dataclasses.dataclass(frozen=True)
class OpDef:
    """One op of the contract (see the module doc)."""

    name: str
    kind: str
    args: tuple[str, ...]
    summary: str
    family: str
    mutates: tuple[str, ...] = ()
    returns: Callable[..., tuple[Meta, ...]] | None = None  # None: the op returns None (it writes in place)
    returns_doc: str = "None"
    features: frozenset[str] = frozenset()
    core: bool = True  # LMDeploy's contract; False: a fusion beyond it that a vendor may serve
    # trailing args a vendor receives only when a call needs them (the paged attention ops' quantized-cache
    # arguments, passed only with quant_bits != 0): a vendor that serves no such call may leave them out
    optional_args: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"op {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        unknown = set(self.mutates) - set(self.args)
        if unknown:
            raise ValueError(f"op {self.name}: mutates arguments it does not take: {sorted(unknown)}")
        if self.optional_args and self.args[len(self.args) - len(self.optional_args):] != self.optional_args:
            raise ValueError(f"op {self.name}: optional_args must be the last arguments")

    @property
    def required_args(self) -> tuple[str, ...]:
        """The arguments every call passes (``args`` without the trailing ``optional_args``)."""
        return self.args[:len(self.args) - len(self.optional_args)]

    @property
    def signature(self) -> str:
        optional = f"[, {', '.join(self.optional_args)}]" if self.optional_args else ""
        return f"{self.name}({', '.join(self.required_args)}{optional})"

    def fake(self, *args: Any) -> Any:
        """The fake implementation: empty outputs of the declared shapes and dtypes (``None`` for in-place ops)."""
        if self.returns is None:
            return None
        ref = args[0]
        outs = tuple(ref.new_empty(shape, dtype=dtype) for shape, dtype in self.returns(*args))
        return outs[0] if len(outs) == 1 else outs


def _same_as_first(x: torch.Tensor, *_: Any) -> tuple[Meta, ...]:
    return ((tuple(x.shape), x.dtype),)


#: Every call feature, and what in a call asks for it (named in refusals, so the user knows which argument to change).
FEATURES = {
    "kv_quant": "quant_bits != 0: a quantized (uint8, 8- or 4-bit) KV cache",
    "kv_quant4": "quant_bits == 4: a 4-bit KV cache (two values per byte; with kv_quant)",
    "non_causal": "attn_mask=[]: non-causal attention",
    "strided_cache": "a strided (packed or head-major) key/value cache view",
}

_CACHE_FEATURES = frozenset({"strided_cache", "kv_quant", "kv_quant4"})
#: Features a vendor serves only where its capabilities name them (a vendor without a capabilities record for an
#: op serves every other call of it): a quantized cache needs kernels written for it.
OPT_IN_FEATURES = frozenset({"kv_quant", "kv_quant4"})
# the paged attention ops' quantized-cache arguments: kv_scales = [k, v], kv_zeros = [k, v] (each
# [num_blocks, block_size, Hk]) and quant_bits (8 / 4), passed to a vendor only when quant_bits != 0
_KV_QUANT_ARGS = ("kv_scales", "kv_zeros", "quant_bits")

TABLE: tuple[OpDef, ...] = (
    OpDef("silu_and_mul", "elementwise", ("x",), "silu(x[..., :d]) * x[..., d:]", "activation",
          returns=lambda x: ((tuple(x.shape[:-1]) + (x.shape[-1] // 2,), x.dtype),),
          returns_doc="`[..., d]`, x's dtype"),
    OpDef("rms_norm", "elementwise", ("hidden_states", "weight", "epsilon"), "RMS normalization over the last dim",
          "norm", returns=_same_as_first, returns_doc="hidden_states' shape and dtype"),
    OpDef("add_rms_norm", "elementwise", ("hidden_states", "residual", "weight", "epsilon"),
          "residual add, then RMS norm: (normed, sum)", "norm",
          returns=lambda h, *_: ((tuple(h.shape), h.dtype), (tuple(h.shape), h.dtype)),
          returns_doc="(normed, sum), both hidden_states' shape and dtype"),
    OpDef("apply_rotary_pos_emb", "elementwise", ("query", "key", "cos", "sin"),
          "rotary position embedding of query and key, in place", "rotary", mutates=("query", "key")),
    OpDef("fill_kv_cache", "paged",
          ("key", "value", "key_cache", "value_cache", "kv_start_indices", "k_scales_zeros", "v_scales_zeros",
           "quant_bits"),
          "write new keys/values into the paged cache at their slots (quantizing them into a uint8 cache)",
          "kv_cache", mutates=("key_cache", "value_cache", "k_scales_zeros", "v_scales_zeros"),
          features=_CACHE_FEATURES),
    OpDef("prefill_attention", "attention",
          ("query", "key", "value", "cu_seqlens_q", "cu_seqlens_kv", "max_q_seq_len", "softmax_scale", "causal",
           "attn_output"),
          "varlen attention over new tokens ([B+1] start offsets)", "attention", mutates=("attn_output",),
          features=frozenset({"non_causal"})),
    OpDef("paged_prefill_attention", "paged",
          ("query", "key_cache", "value_cache", "block_table", "cu_seqlens_q", "kv_seqlens", "max_q_seq_len",
           "max_kv_seq_len", "softmax_scale", "causal", "attn_output", "kv_scales", "kv_zeros", "quant_bits"),
          "chunked prefill: new queries over history + themselves in the paged cache", "attention",
          mutates=("attn_output",), features=frozenset({"non_causal"}) | _CACHE_FEATURES,
          optional_args=_KV_QUANT_ARGS),
    OpDef("paged_decode_attention", "paged",
          ("query", "key_cache", "value_cache", "block_table", "kv_seqlens", "max_kv_seq_len", "softmax_scale",
           "attn_output", "kv_scales", "kv_zeros", "quant_bits"),
          "decode: one query token per sequence over its paged cache", "attention", mutates=("attn_output",),
          features=_CACHE_FEATURES, optional_args=_KV_QUANT_ARGS),
    OpDef("moe_gating_topk_softmax", "moe", ("router_logits", "topk"),
          "top-k of the router's softmax: (float32 weights, int64 expert ids)", "moe",
          returns=lambda logits, topk: (((logits.shape[0], topk), torch.float32),
                                        ((logits.shape[0], topk), torch.int64)),
          returns_doc="(float32 `[T, topk]`, int64 `[T, topk]`)"),
    OpDef("fused_moe", "moe",
          ("hidden_states", "gate_up_weights", "down_weights", "topk_weights", "topk_ids", "renormalize"),
          "the routed experts' gated MLP, weighted and summed", "moe", returns=_same_as_first,
          returns_doc="hidden_states' shape and dtype"),
    OpDef("linear", "matmul", ("x", "weight", "bias"), "x @ weight.T + bias", "linear",
          returns=lambda x, w, b: ((tuple(x.shape[:-1]) + (w.shape[0],), x.dtype),),
          returns_doc="`[..., out]`, x's dtype"),
    # quantized linear family (AWQ W4A16, SmoothQuant-style W8A8)
    OpDef("weight_quant_matmul", "matmul", ("x", "qweight", "scale", "offset", "bias", "group_size"),
          "AWQ W4A16: x @ dequant(qweight) + bias (4-bit packed, per-group scales and zeros)", "quant",
          returns=lambda x, qw, *_: (((x.shape[0], qw.shape[1] * 8), x.dtype),),
          returns_doc="`[M, N]`, x's dtype"),
    OpDef("dynamic_quant", "matmul", ("x", "quant_dtype", "quant_granularity"),
          "per-token symmetric int8 quantization: (q, scale)", "quant",
          returns=lambda x, qd, _: ((tuple(x.shape), qd), (tuple(x.shape[:-1]) + (1,), torch.float32)),
          returns_doc="(int8 x's shape, float32 `[..., 1]`)"),
    OpDef("linear_w8a8", "matmul",
          ("a", "b", "rms_scale", "linear_scale", "out_dtype", "quant_dtype", "bias"),
          "int8 GEMM, per-token and per-channel scales in the epilogue", "quant",
          returns=lambda a, b, _s, _l, out_dtype, *_: ((tuple(a.shape[:-1]) + (b.shape[0],), out_dtype),),
          returns_doc="`[..., N]`, out_dtype"),
    OpDef("linear_w8a8_static", "matmul",
          ("x", "weight", "input_scale", "input_offset", "deq_scale", "out_dtype", "quant_dtype", "quant_bias"),
          "static W8A8: per-tensor activation quant, int8 GEMM, dequant scale", "quant",
          returns=lambda x, w, _s, _o, _d, out_dtype, *_: ((tuple(x.shape[:-1]) + (w.shape[0],), out_dtype),),
          returns_doc="`[..., N]`, out_dtype"),
    OpDef("rms_norm_w8a8", "matmul", ("hidden_states", "weight", "epsilon", "quant_dtype"),
          "RMS norm fused with per-token int8 quantization: (q, scale)", "quant",
          returns=lambda h, _w, _e, qd: ((tuple(h.shape), qd), (tuple(h.shape[:-1]) + (1,), torch.float32)),
          returns_doc="(int8 hidden_states' shape, float32 `[..., 1]`)"),
    OpDef("add_rms_norm_w8a8", "matmul", ("hidden_states", "residual", "weight", "epsilon", "quant_dtype"),
          "residual add, RMS norm, per-token int8 quantization: (q, scale, sum)", "quant",
          returns=lambda h, _r, _w, _e, qd: ((tuple(h.shape), qd), (tuple(h.shape[:-1]) + (1,), torch.float32),
                                             (tuple(h.shape), h.dtype)),
          returns_doc="(int8, float32 `[..., 1]`, the sum in hidden_states' dtype)"),
    OpDef("fused_moe_w8a8", "moe",
          ("hidden_states", "gate_up_weights", "gate_up_scales", "down_weights", "down_scales", "topk_weights",
           "topk_ids", "renormalize"),
          "W8A8 experts: per-token int8 activations, int8 expert weights with per-channel scales", "quant",
          returns=_same_as_first, returns_doc="hidden_states' shape and dtype"),
    OpDef("apply_rotary_pos_emb_fill_kv_cache", "paged",
          ("query", "key", "value", "key_cache", "value_cache", "cos", "sin", "kv_start_indices"),
          "rotary embedding of query/key and the cache write, fused", "rotary",
          mutates=("query", "key", "key_cache", "value_cache"), features=_CACHE_FEATURES, core=False),
)

OPS: dict[str, OpDef] = {d.name: d for d in TABLE}


def get(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; the contract's ops: {', '.join(OPS)}") from None


def define(name: str, impl: Callable[..., Any]):
    """The custom op ``torch.ops.dlinfer.<name>`` from its selection function ``impl`` (whose parameters must be
    the table's arguments) with the table's mutated arguments and fake implementation."""
    d = get(name)
    params = tuple(inspect.signature(impl).parameters)
    if params != d.args:
        raise TypeError(f"{name}: the custom op's function takes {params}, the op table declares {d.args}")
    op = torch.library.custom_op(f"dlinfer::{name}", impl, mutates_args=d.mutates)
    op.register_fake(d.fake)
    return op


def check_vendor_function(vendor: str, name: str, fn: Callable[..., Any]) -> None:
    """At registration: ``fn`` can be called the way the contract calls ``name`` (positionally, every argument)."""
    if name not in OPS:
        raise ValueError(f"vendor {vendor}: provides {name!r}, which is not an op of the contract "
                         f"({', '.join(OPS)})")
    if not callable(fn):
        raise TypeError(f"vendor {vendor}: the implementation of {name} is not callable ({type(fn).__name__})")
    d = OPS[name]
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: cannot check here, the result check remains
        return
    try:
        try:
            sig.bind(*d.args)
        except TypeError:
            if not d.optional_args:
                raise
            sig.bind(*d.required_args)  # a vendor that serves no call needing the optional arguments
    except TypeError as exc:
        raise TypeError(f"vendor {vendor}: {name} implementation {getattr(fn, '__qualname__', fn)}{sig} cannot be "
                        f"called as the contract calls it, {d.signature}: {exc}") from None


def check_result(vendor: str, name: str, args: tuple, result: Any) -> None:
    """What a vendor returned against the op's declaration: count, shapes and dtypes (``None`` for in-place ops).
    Raises :class:`dlinfer.errors.VendorContractError` naming the vendor and the op."""
    d = OPS[name]
    if d.returns is None:
        if result is not None:
            raise VendorContractError(f"vendor {vendor!r}, op {name}: returned {type(result).__name__}; the op "
                                      "writes its outputs in place and returns None")
        return
    want = d.returns(*args)
    got = (result,) if len(want) == 1 and isinstance(result, torch.Tensor) else result
    if not isinstance(got, (tuple, list)) or len(got) != len(want):
        count = len(got) if isinstance(got, (tuple, list)) else type(result).__name__
        raise VendorContractError(f"vendor {vendor!r}, op {name}: returned {count} where the op declares "
                                  f"{len(want)} tensor(s)")
    for i, (out, (shape, dtype)) in enumerate(zip(got, want)):
        if not isinstance(out, torch.Tensor):
            raise VendorContractError(f"vendor {vendor!r}, op {name}: output {i} is {type(out).__name__}, "
                                      "not a tensor")
        if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
            raise VendorContractError(
                f"vendor {vendor!r}, op {name}: output {i} is {str(out.dtype).replace('torch.', '')} "
                f"{list(out.shape)}, the op declares {str(dtype).replace('torch.', '')} {list(shape)}")


def markdown_table() -> str:
    """The vendor contract as a table (README's "Ops" section is this output; a test keeps them equal)."""
    rows = ["| Op | Kind | Vendor signature | Writes in place | Returns |", "| --- | --- | --- | --- | --- |"]
    for d in TABLE:
        writes = ", ".join(f"`{a}`" for a in d.mutates) or "-"
        returns = d.returns_doc if d.returns is not None else "None"
        extra = "" if d.core else " (fusion, optional)"
        rows.append(f"| `{d.name}`{extra} | {d.kind} | `{d.signature}` | {writes} | {returns} |")
    return "\n".join(rows)


__all__ = ["FEATURES", "KINDS", "OPS", "OPT_IN_FEATURES", "TABLE", "OpDef", "check_result", "check_vendor_function", "define", "get",
           "markdown_table"]
