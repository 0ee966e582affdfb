"""Install / remove the start-up hook that honours ``DLINFER_LMDEPLOY=1`` (see ``hook.py``)."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

ENV_VAR = "DLINFER_LMDEPLOY"
PTH_NAME = "dlinfer-lmdeploy.pth"
MODULE_NAME = "_dlinfer_lmdeploy_hook"
PTH_LINE = f"import {MODULE_NAME}\n"


def site_dir(path: str | Path | None = None) -> Path:
    """The site-packages folder the hook goes to: ``path``, else this interpreter's purelib."""
    target = Path(path) if path is not None else Path(sysconfig.get_paths()["purelib"])
    if not target.is_dir():
        raise ValueError(f"site directory {target} does not exist")
    return target


def install_hook(path: str | Path | None = None) -> list[Path]:
    """Write ``dlinfer-lmdeploy.pth`` and ``_dlinfer_lmdeploy_hook.py`` into ``site_dir(path)``."""
    target = site_dir(path)
    module = target / f"{MODULE_NAME}.py"
    shutil.copyfile(Path(__file__).with_name("hook.py"), module)
    pth = target / PTH_NAME
    pth.write_text(PTH_LINE)
    return [pth, module]


def uninstall_hook(path: str | Path | None = None) -> list[Path]:
    """Remove the hook files; returns those removed."""
    target = site_dir(path)
    removed = []
    for p in (target / PTH_NAME, target / f"{MODULE_NAME}.py"):
        if p.exists():
            p.unlink()
            removed.append(p)
    return removed


def hook_status(path: str | Path | None = None) -> str:
    target = site_dir(path)
    pth, module = target / PTH_NAME, target / f"{MODULE_NAME}.py"
    if not pth.exists() or not module.exists():
        return f"not installed in {target}"
    current = module.read_text() == Path(__file__).with_name("hook.py").read_text()
    return (f"installed in {target}" + ("" if current else " (an older copy: run install-hook again)")
            + f"; active in processes started with {ENV_VAR}=1")
