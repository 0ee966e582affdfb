"""Start-up hook: with ``DLINFER_LMDEPLOY=1``, LMDeploy's PyTorch engine on CUDA runs on dlinfer, no code changed.

``python -m dlinfer.framework.lmdeploy_ext install-hook`` copies this file into site-packages as
``_dlinfer_lmdeploy_hook.py`` next to a ``dlinfer-lmdeploy.pth`` that imports it when Python starts. It is
self-contained on purpose: it imports neither torch nor dlinfer, and does nothing unless ``DLINFER_LMDEPLOY`` is
set to an enabling value (``1``, ``true``, ``yes``, ``on``). Then it waits for ``import lmdeploy`` to finish and
calls ``dlinfer.framework.lmdeploy_ext.apply()``. Spawned processes (LMDeploy's engine process and tensor-parallel
workers) inherit the environment, so they are routed too.
"""

import importlib.abc
import importlib.machinery
import os
import sys

ENV_VAR = "DLINFER_LMDEPLOY"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def enabled(environ=None) -> bool:
    """Whether ``DLINFER_LMDEPLOY`` asks for dlinfer; an unrecognised value is an error, not a silent no."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(_TRUE + _FALSE[1:])}")


class _ApplyAfterLmdeploy(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of ``lmdeploy`` so dlinfer's patches apply once it is imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "lmdeploy":
            return None
        spec = None
        for finder in list(sys.meta_path):  # whoever would have found lmdeploy (site-packages, editable installs)
            if isinstance(finder, _ApplyAfterLmdeploy) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            _remove_finder()
            _apply()

        spec.loader.exec_module = exec_module
        return spec


def _apply() -> None:
    try:
        from dlinfer.framework.lmdeploy_ext import apply
    except ImportError as exc:
        raise ImportError(f"{ENV_VAR}=1 asks for LMDeploy on dlinfer, but dlinfer is not importable ({exc}); "
                          f"unset {ENV_VAR} or remove dlinfer-lmdeploy.pth from site-packages") from exc
    apply()


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _ApplyAfterLmdeploy)]


def install() -> bool:
    """Arrange for ``apply()`` after ``import lmdeploy`` (or now, if it is already imported). Idempotent."""
    if "lmdeploy" in sys.modules:
        _apply()
        return True
    if not any(isinstance(f, _ApplyAfterLmdeploy) for f in sys.meta_path):
        sys.meta_path.insert(0, _ApplyAfterLmdeploy())
    return True


def _startup() -> None:
    try:
        if not enabled():
            return
    except ValueError as exc:
        sys.stderr.write(f"dlinfer: {exc}; dlinfer's LMDeploy hook stays off\n")
        return
    install()


_startup()
