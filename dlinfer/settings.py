"""Every environment variable dlinfer reads: its meaning, default and when it is read, and one parser.

Booleans accept ``1/true/yes/on`` and ``0/false/no/off`` (any case; empty or unset means the default); any other
value is a ``ValueError`` naming the variable. README's table of variables is :func:`markdown_table`'s output (a
test keeps them equal).

This module imports nothing heavy (no torch): the LMDeploy start-up hook and the vLLM plugin read it early.
"""

from __future__ import annotations

import dataclasses
import os

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Variable:
    name: str
    kind: str  # "bool", "auto" (a boolean or `auto`), "vendor", "list", "spec"
    default: str
    meaning: str
    read: str  # when it is read


VARIABLES: tuple[Variable, ...] = (
    Variable("DLINFER_CHECK", "bool", "0",
             "also run the checks that read tensor values (slot ids, lengths, block ids) and check each vendor "
             "result's count, shapes and dtypes on accelerators (a host sync per op); on CPU tensors they always run",
             "at every op call"),
    Variable("DLINFER_VENDOR", "vendor", "",
             "force one vendor for every op it provides (e.g. `reference`)", "when an op's vendor is selected"),
    Variable("DLINFER_VENDOR_<OP>", "vendor", "",
             "force one vendor for one op (e.g. `DLINFER_VENDOR_PAGED_DECODE_ATTENTION=reference`); beats "
             "`DLINFER_VENDOR`", "when an op's vendor is selected"),
    Variable("DLINFER_LMDEPLOY", "bool", "0",
             "route LMDeploy's PyTorch engine through dlinfer (needs the start-up hook: "
             "`python -m dlinfer.framework.lmdeploy_ext install-hook`)", "at Python start-up"),
    Variable("DLINFER_VLLM", "bool", "1", "`0` turns the vLLM plugin off", "when vLLM loads its plugins"),
    Variable("DLINFER_VLLM_DISABLE", "list", "",
             "comma-separated parts of the vLLM plugin to leave to vLLM (`attention`, `rms_norm`, ..., `all`)",
             "when vLLM loads its plugins"),
    Variable("DLINFER_TRITON_PREFILL", "spec", "",
             "launch-parameter overrides of the Triton prefill attention kernels (`block_n=128,pack_gqa=0`; `tma=0` "
             "turns off the TMA kernels Hopper runs by default for head size 128 (prefill from 2048 query rows, paged "
             "prefill from 2M query-key pairs where a page holds whole 64-key tiles), `tma=1` asks for them on any "
             "call, `tma_split=1` runs split grids on them too); `sdpa=1` serves uniform-length "
             "prefill batches on CUDA from torch's cuDNN SDPA, assuming no padding rows after the last sequence "
             "(`DLINFER_CHECK=1` verifies it; off: cuDNN builds a plan, 50-650 ms, at every new length)",
             "when a kernel configuration is first built"),
    Variable("DLINFER_TRITON_DECODE", "spec", "",
             "launch-parameter overrides of the Triton decode attention kernel (`block_n=64,num_warps=4`)",
             "when a kernel configuration is first built"),
    Variable("DLINFER_TRITON_AWQ", "spec", "",
             "launch-parameter overrides of the Triton AWQ W4A16 GEMM (`block_n=256,split_k=4`; split_k=0: by rule)",
             "when a kernel configuration is first built"),
    Variable("DLINFER_TRITON_W8A8", "spec", "",
             "launch-parameter overrides of the Triton int8 W8A8 GEMM (`block_m=128,block_n=256,num_stages=3`)",
             "when a kernel configuration is first built"),
    Variable("DLINFER_AUTOTUNE", "bool", "1",
             "`0` turns off the fused-MoE autotune on first use (cards without a shipped table then use the generic "
             "tiers)", "at the first fused_moe call of a shape bucket"),
    Variable("DLINFER_MOE_HOT_STREAM", "bool", "1",
             "`0` runs fused MoE's hot-expert GEMMs (skewed routing) after the others on the caller's stream instead "
             "of beside them on a second, higher-priority stream",
             "at each fused_moe call"),
    Variable("DLINFER_MOE_WS", "bool", "0",
             "`1` lets a fused-MoE config's `WS` field turn on Triton's warp specialization on the GPU (Hopper, "
             "Triton 3.6; experimental: its persistent loop hung an H100 at one shape, so no table or autotune "
             "uses it and a config asking for it runs without it unless this is set)",
             "at each fused_moe call"),
    Variable("DLINFER_LMDEPLOY_MOE_N_FASTEST", "auto", "auto",
             "`1` lays LMDeploy's bf16/fp16 expert weights out N-fastest at load, as stock LMDeploy does on CUDA, "
             "`0` keeps them K-fastest; `auto` asks the vendor serving `fused_moe` which layout its kernels serve "
             "faster on the card (the Triton vendor: N-fastest where the card's table has N-fastest entries, "
             "`dlinfer info` says which; `fused_moe` reads either layout in place)",
             "when LMDeploy loads a MoE model's expert weights"),
    Variable("DLINFER_LMDEPLOY_FUSE_ROTARY", "bool", "1",
             "`0` keeps LMDeploy's rotary embedding and KV-cache write as two ops; by default the rotary embedding "
             "of an attention layer is deferred to it and runs fused with the write of the keys and values into the "
             "cache (`apply_rotary_pos_emb_fill_kv_cache`: one op and launch fewer per layer; unquantized caches)",
             "when LMDeploy builds a model's layers"),
    Variable("DLINFER_PRECOMPILE", "bool", "1",
             "`0` turns off compiling every kernel variant of a shape's token buckets at its first eager call "
             "(fused MoE: `fused_moe`, `fused_moe_w8a8`; the quantized dense GEMMs: `weight_quant_matmul`, "
             "`linear_w8a8`, `linear_w8a8_static`), smallest first within 120 s per shape (else they compile one "
             "by one as batch sizes change while serving); `dlinfer check` sets `0` unless told otherwise",
             "at the first call of a shape"),
    Variable("DLINFER_CACHE_DIR", "spec", "",
             "directory of dlinfer's caches (tuned kernel configs under `tuning/`); default "
             "`$XDG_CACHE_HOME/dlinfer`, else `~/.cache/dlinfer`", "when a tuning cache is read or written"),
    Variable("TRITON_INTERPRET", "bool", "0",
             "Triton's interpreter: the `triton` vendor then runs on CPU tensors (slowly; for tests)",
             "when the `triton` vendor is imported"),
)

_BY_NAME = {v.name: v for v in VARIABLES}


def _variable(name: str) -> Variable:
    if name.startswith("DLINFER_VENDOR_"):
        return _BY_NAME["DLINFER_VENDOR_<OP>"]
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name} is not one of dlinfer's settings ({', '.join(_BY_NAME)})") from None


def parse_bool(name: str, raw: str | None, default: bool) -> bool:
    """The one boolean parser (see the module doc)."""
    value = "" if raw is None else raw.strip().lower()
    if not value:
        return default
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: expected one of {', '.join(TRUE + FALSE)} (or unset)")


_bool_memo: dict[tuple[str, object], bool] = {}

# ``os.environ.get`` encodes the name and decodes the value on every call (~1 µs); the mapping underneath
# (CPython's ``os.environ._data``, the encoded names and values that ``os.environ`` keeps up to date) answers in
# ~25 ns, and the op path reads DLINFER_CHECK on every call. Where it is missing, os.environ itself is read.
_environ_data = getattr(os.environ, "_data", None)
_encodekey = getattr(os.environ, "encodekey", None)
if not isinstance(_environ_data, dict) or _encodekey is None:
    _environ_data = None
_encoded: dict[str, object] = {}


def _raw(name: str):
    """The variable's current value in the environment, in whatever form is cheapest to read (only compared and
    memoized; :func:`flag` decodes it once per distinct value)."""
    if _environ_data is None:
        return os.environ.get(name)
    key = _encoded.get(name)
    if key is None:
        key = _encoded[name] = _encodekey(name)
    return _environ_data.get(key)


def flag(name: str) -> bool:
    """A boolean variable's current value (read from the environment now)."""
    raw = _raw(name)
    key = (name, raw)
    hit = _bool_memo.get(key)
    if hit is None:
        var = _variable(name)
        if var.kind != "bool":
            raise TypeError(f"{name} is not a boolean setting")
        hit = parse_bool(name, os.environ.get(name), var.default == "1")
        _bool_memo[key] = hit
    return hit


def tristate(name: str) -> bool | None:
    """An ``auto`` variable's current value: True / False for a boolean, None for ``auto`` (or unset with the
    default ``auto``); any other value is a ``ValueError`` naming the variable."""
    var = _variable(name)
    if var.kind != "auto":
        raise TypeError(f"{name} is not an auto/boolean setting")
    raw = os.environ.get(name)
    value = "" if raw is None else raw.strip().lower()
    if value == "auto" or not value and var.default == "auto":
        return None
    try:
        return parse_bool(name, raw, var.default == "1")
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected auto or one of {', '.join(TRUE + FALSE)} (or unset)") from None


def check_values() -> bool:
    """``DLINFER_CHECK``, read now (on accelerators, at every op call: one dict lookup, see :func:`_raw`)."""
    raw = _raw("DLINFER_CHECK") if _environ_data is None else _environ_data.get(_CHECK_KEY)
    if raw is None:
        return _CHECK_UNSET
    hit = _check_memo.get(raw)
    if hit is None:
        hit = _check_memo[raw] = flag("DLINFER_CHECK")  # a value that does not parse raises at every call
    return hit


_CHECK_KEY = None if _environ_data is None else _encodekey("DLINFER_CHECK")
_CHECK_UNSET = parse_bool("DLINFER_CHECK", None, _BY_NAME["DLINFER_CHECK"].default == "1")
_check_memo: dict[object, bool] = {}


def text(name: str) -> str:
    """A non-boolean variable's current value, stripped (``""`` when unset)."""
    _variable(name)
    return os.environ.get(name, "").strip()


def vendor_variable(op: str | None) -> str:
    """The variable forcing a vendor for ``op`` (all ops when None)."""
    return "DLINFER_VENDOR" if op is None else f"DLINFER_VENDOR_{op.upper()}"


def vendor_override(op: str | None) -> str:
    """The vendor name ``DLINFER_VENDOR[_<OP>]`` forces (``""`` when unset)."""
    return os.environ.get(vendor_variable(op), "").strip()


def markdown_table() -> str:
    """README's table of environment variables."""
    rows = ["| Variable | Default | Meaning | Read |", "| --- | --- | --- | --- |"]
    for v in VARIABLES:
        default = f"`{v.default}`" if v.default else "unset"
        rows.append(f"| `{v.name}` | {default} | {v.meaning} | {v.read} |")
    return "\n".join(rows)


__all__ = ["FALSE", "TRUE", "VARIABLES", "Variable", "check_values", "flag", "markdown_table", "parse_bool", "text",
           "tristate", "vendor_override", "vendor_variable"]
