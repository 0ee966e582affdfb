"""``python -m dlinfer.framework.lmdeploy_ext install-hook | uninstall-hook | hook-status | serve ...``."""

from __future__ import annotations

import sys

from dlinfer.framework.lmdeploy_ext import install


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except ValueError as exc:
        print(f"python -m dlinfer.framework.lmdeploy_ext: {exc}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        from dlinfer.framework.lmdeploy_ext.cli import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["install-hook"]:
        paths = install.install_hook(argv[1] if len(argv) > 1 else None)
        print("installed: " + ", ".join(str(p) for p in paths))
        print(f"LMDeploy now runs on dlinfer in processes started with {install.ENV_VAR}=1")
        return 0
    if argv[:1] == ["uninstall-hook"]:
        removed = install.uninstall_hook(argv[1] if len(argv) > 1 else None)
        print("removed: " + (", ".join(str(p) for p in removed) or "nothing (no hook installed)"))
        return 0
    if argv[:1] == ["hook-status"]:
        print(install.hook_status(argv[1] if len(argv) > 1 else None))
        return 0
    print("usage: python -m dlinfer.framework.lmdeploy_ext "
          "{install-hook [SITE_DIR] | uninstall-hook [SITE_DIR] | hook-status [SITE_DIR] | serve LMDEPLOY_ARGS...}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
