"""``dlinfer serve lmdeploy ...``: any ``lmdeploy`` command line, with the PyTorch engine running on dlinfer.

    dlinfer serve lmdeploy api_server MODEL --tp 2          # = lmdeploy serve api_server MODEL --backend pytorch --tp 2
    dlinfer serve lmdeploy chat MODEL                        # = lmdeploy chat MODEL --backend pytorch

Arguments are LMDeploy's own and are forwarded unchanged, except that ``--backend pytorch`` is added when no
backend is given (dlinfer serves LMDeploy's PyTorch engine only; ``--backend turbomind`` is refused). A first
argument that is not an ``lmdeploy`` command is taken as a ``serve`` subcommand (``api_server``, ``proxy``...).

Also runnable as ``python -m dlinfer.framework.lmdeploy_ext serve ...``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

#: Top-level ``lmdeploy`` commands (0.18); anything else is a ``serve`` subcommand.
LMDEPLOY_COMMANDS = frozenset({"serve", "chat", "lite", "check_env"})
_BACKEND_COMMANDS = frozenset({"api_server", "chat"})

USAGE = ("usage: dlinfer serve lmdeploy <lmdeploy command line>\n"
         "  e.g. dlinfer serve lmdeploy api_server MODEL --tp 2\n"
         "       dlinfer serve lmdeploy chat MODEL")


def lmdeploy_argv(argv: Sequence[str]) -> list[str]:
    """The ``lmdeploy`` argument list that ``dlinfer serve lmdeploy ARGV`` runs. Raises ``ValueError``."""
    args = [str(a) for a in argv]
    if not args:
        raise ValueError("no lmdeploy command given")
    if args[0] in ("-h", "--help"):
        return ["serve", "--help"]
    if args[0] not in LMDEPLOY_COMMANDS:
        args = ["serve"] + args
    subcommand = args[1] if args[0] == "serve" and len(args) > 1 else args[0]
    backend = None
    for i, arg in enumerate(args):
        if arg == "--backend":
            if i + 1 >= len(args):
                raise ValueError("--backend needs a value")
            backend = args[i + 1]
        elif arg.startswith("--backend="):
            backend = arg.split("=", 1)[1]
    if backend is not None and backend != "pytorch":
        raise ValueError(f"--backend {backend}: dlinfer serves LMDeploy's PyTorch engine only "
                         "(use --backend pytorch, or run plain lmdeploy for TurboMind)")
    if backend is None and subcommand in _BACKEND_COMMANDS:
        args += ["--backend", "pytorch"]
    return args


def model_path_problem(args: Sequence[str]) -> str | None:
    """Why the model argument of an ``lmdeploy`` command line (as :func:`lmdeploy_argv` returns it) cannot be
    served, or None. A local path (absolute, ``./``, ``../``, ``~``) must exist; anything else may be a hub id,
    which LMDeploy resolves itself."""
    if args and args[0] == "serve":
        rest = list(args[2:]) if len(args) > 1 and args[1] in _BACKEND_COMMANDS else []
    elif args and args[0] == "chat":
        rest = list(args[1:])
    else:
        return None
    model = next((a for a in rest if not a.startswith("-")), None)
    if model is None:
        return None
    local = model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or model in (".", "..")
    path = os.path.expanduser(model)
    if local and not os.path.exists(path):
        return f"model path {model} does not exist"
    if local and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        return f"model path {model} has no config.json (not a Hugging Face model folder)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run an ``lmdeploy`` command line on dlinfer; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = lmdeploy_argv(argv)
    except ValueError as exc:
        print(f"dlinfer serve lmdeploy: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    problem = model_path_problem(args)
    if problem:
        print(f"dlinfer serve lmdeploy: {problem}", file=sys.stderr)
        return 2
    try:
        from lmdeploy.cli.entrypoint import run
    except ImportError as exc:
        print(f"dlinfer serve lmdeploy: LMDeploy is not importable ({exc}); install it with "
              "scripts/setup_lmdeploy.sh (see README)", file=sys.stderr)
        return 1

    from dlinfer.errors import NotSupportedError
    from dlinfer.framework.lmdeploy_ext import ENV_VAR, apply

    # Processes LMDeploy spawns are patched by their entry points; the variable also reaches any that the
    # start-up hook (if installed) sees.
    os.environ[ENV_VAR] = "1"
    apply()
    saved = sys.argv
    sys.argv = ["lmdeploy"] + args
    try:
        run()
    except NotSupportedError as exc:
        print(f"dlinfer serve lmdeploy: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0
