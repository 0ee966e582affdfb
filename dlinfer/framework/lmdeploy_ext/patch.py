"""Route LMDeploy's PyTorch engine on CUDA to dlinfer, in this process and in every worker it spawns.

Three groups of patches, all undone by :func:`revert`:

1. ``lmdeploy.pytorch.backends.selector._get_backend``: device type ``cuda`` gets
   :class:`~dlinfer.framework.lmdeploy_ext.backend.DlinferCudaOpsBackend`. Every ``get_backend()`` call in
   LMDeploy goes through that module function, so this one patch routes the model build, the step context, the
   cache layout and the graph runner.
2. Spawned processes import LMDeploy afresh, so the two places LMDeploy spawns engine processes run their
   target through an entry point of this module that re-applies these patches first:
   ``mp_executor.ExecutorProc.start`` (tensor-parallel workers, :func:`_spawned_entry`) and
   ``mp_engine.zmq_engine.ZMQMPEngine._mp_proc`` (the engine process of ``lmdeploy serve api_server``,
   :func:`_mp_engine_entry`).
   LMDeploy also runs its environment checks (``EngineChecker.handle``) in a process it spawns whenever the
   device is CUDA; ``EngineChecker.handle`` is replaced by the same logic with that process running
   :func:`_spawned_entry`, so its ``DistChecker`` sees dlinfer's backend (which keeps tensor parallelism on the
   ``mp`` executor) instead of stock CUDA's (which asks for ray).
3. ``lmdeploy.pytorch.engine.engine.Engine.from_pretrained`` (the entry of ``lmdeploy.pipeline`` and
   ``lmdeploy serve``, in the calling process, before any engine process starts) and
   ``lmdeploy.pytorch.engine.engine.build_executor`` (every engine, in the process that builds it): the setup is
   checked (``support.check_supported``) and refused with a message naming every unsupported feature.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger("dlinfer")

TESTED_LMDEPLOY = "0.18"

_lock = threading.RLock()
_originals: dict[str, object] = {}


def is_applied() -> bool:
    """Whether this process routes LMDeploy's CUDA backend to dlinfer."""
    return bool(_originals)


def _dlinfer_get_backend():
    from lmdeploy.pytorch.devices import get_device_manager

    if get_device_manager().current_context().device_type == "cuda":
        from dlinfer.framework.lmdeploy_ext.backend import DlinferCudaOpsBackend

        return DlinferCudaOpsBackend
    return _originals["selector._get_backend"]()


def _spawned_entry(target, *args, **kwargs):
    """A process LMDeploy spawns (a tensor-parallel worker, the environment checks): apply dlinfer's patches,
    then run LMDeploy's ``target``."""
    apply()
    return target(*args, **kwargs)


def _patched_start(self, **kwargs):
    """``ExecutorProc.start`` with the worker run through :func:`_spawned_entry` (same process settings)."""
    if self._proc is not None:
        raise RuntimeError(f"ExecutorProc-{self.proc_id} was already started")
    proc = self.mp_ctx.Process(target=_spawned_entry, args=(self._main_loop,), kwargs=kwargs,
                               name=f"ExecutorProc-{self.proc_id}", daemon=True)
    proc.start()
    self._proc = proc


def _mp_engine_entry(*args, **kwargs):
    """LMDeploy's ZMQ engine process (``lmdeploy serve api_server``): apply dlinfer's patches, then run it."""
    apply()
    return _originals["zmq_engine.ZMQMPEngine._mp_proc"](*args, **kwargs)


def _checked_engine_handle(self):
    """``EngineChecker.handle`` of LMDeploy 0.18 with the spawned check process entering through
    :func:`_spawned_entry`. LMDeploy keeps CUDA out of the caller by running the checks in a fresh ``spawn``
    process on CUDA (unless the caller is itself a daemon process); a fresh process has LMDeploy unpatched."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from lmdeploy.pytorch import envs

    if not envs.enable_check_env:
        return None
    if mp.current_process().daemon or self.engine_config.device_type != "cuda":
        return self._handle_impl()
    with ProcessPoolExecutor(mp_context=mp.get_context("spawn")) as executor:
        try:
            executor.submit(_spawned_entry, self._handle_impl).result()
        except SystemExit:
            raise SystemExit(1) from None  # a check failed; it logged why (as LMDeploy's own handle does)
        except BaseException as exc:  # noqa: BLE001 - LMDeploy reports any other failure the same way
            self.log_and_exit(exc, mod_name="Engine")
    return None


def _read_hf_config(model_path, trust_remote_code: bool):
    """The model's Hugging Face config, or None when it cannot be read here (LMDeploy reports that itself)."""
    try:
        from lmdeploy.archs import get_model_arch

        return get_model_arch(model_path, trust_remote_code=trust_remote_code)[1]
    except Exception as exc:  # noqa: BLE001
        logger.debug("dlinfer: could not read the model config of %s for the support check: %s", model_path, exc)
        return None


def _checked_from_pretrained(cls, pretrained_model_name_or_path, engine_config=None, speculative_config=None,
                             trust_remote_code=False, **kwargs):
    from dlinfer.framework.lmdeploy_ext.support import check_engine_config

    path = pretrained_model_name_or_path
    hf_config = _read_hf_config(path, trust_remote_code) if os.path.isdir(str(path)) else None
    check_engine_config(hf_config, engine_config, speculative_config)
    original = _originals["engine.Engine.from_pretrained"].__func__
    return original(cls, pretrained_model_name_or_path, engine_config=engine_config,
                    speculative_config=speculative_config, trust_remote_code=trust_remote_code, **kwargs)


def _checked_build_executor(model_path, *args, **kwargs):
    from dlinfer.framework.lmdeploy_ext.support import check_supported

    hf_config = _read_hf_config(model_path, bool(kwargs.get("trust_remote_code", False)))
    names = ("cache_config", "backend_config", "dist_config", "misc_config", "adapters")
    settings = {name: kwargs.get(name) for name in names}
    for name, value in zip(names, args):
        settings[name] = value
    check_supported(hf_config, specdecode_config=kwargs.get("specdecode_config"), dtype=kwargs.get("dtype"),
                    **settings)
    return _originals["engine.build_executor"](model_path, *args, **kwargs)


def apply() -> None:
    """Route LMDeploy's CUDA device to dlinfer in this process and its ``mp`` workers. Idempotent."""
    with _lock:
        if _originals:
            return
        import lmdeploy.pytorch.backends.selector as selector
        import lmdeploy.pytorch.engine.engine as engine_module
        import lmdeploy.pytorch.engine.engine_checker as engine_checker
        import lmdeploy.pytorch.engine.executor.mp_executor as mp_executor
        import lmdeploy.pytorch.engine.mp_engine.zmq_engine as zmq_engine

        import lmdeploy

        import dlinfer  # noqa: F401  (registers the ops before LMDeploy's dlinfer kernels import them)

        if not str(lmdeploy.__version__).startswith(TESTED_LMDEPLOY):
            logger.warning("dlinfer: LMDeploy %s is installed; dlinfer's LMDeploy adapter is tested with %s.x",
                           lmdeploy.__version__, TESTED_LMDEPLOY)

        _originals["selector._get_backend"] = selector._get_backend
        _originals["mp_executor.ExecutorProc.start"] = mp_executor.ExecutorProc.start
        _originals["engine.build_executor"] = engine_module.build_executor
        _originals["zmq_engine.ZMQMPEngine._mp_proc"] = zmq_engine.ZMQMPEngine._mp_proc
        _originals["engine.Engine.from_pretrained"] = engine_module.Engine.__dict__["from_pretrained"]
        _originals["engine_checker.EngineChecker.handle"] = engine_checker.EngineChecker.handle
        selector._get_backend = _dlinfer_get_backend
        engine_checker.EngineChecker.handle = _checked_engine_handle
        mp_executor.ExecutorProc.start = _patched_start
        engine_module.build_executor = _checked_build_executor
        zmq_engine.ZMQMPEngine._mp_proc = staticmethod(_mp_engine_entry)
        engine_module.Engine.from_pretrained = classmethod(_checked_from_pretrained)
        logger.info("dlinfer: LMDeploy's PyTorch engine on CUDA now runs through dlinfer (pid %d)", os.getpid())


def revert() -> None:
    """Undo :func:`apply` in this process (workers already started keep their patches)."""
    with _lock:
        if not _originals:
            return
        import lmdeploy.pytorch.backends.selector as selector
        import lmdeploy.pytorch.engine.engine as engine_module
        import lmdeploy.pytorch.engine.engine_checker as engine_checker
        import lmdeploy.pytorch.engine.executor.mp_executor as mp_executor
        import lmdeploy.pytorch.engine.mp_engine.zmq_engine as zmq_engine

        selector._get_backend = _originals.pop("selector._get_backend")
        engine_checker.EngineChecker.handle = _originals.pop("engine_checker.EngineChecker.handle")
        mp_executor.ExecutorProc.start = _originals.pop("mp_executor.ExecutorProc.start")
        engine_module.build_executor = _originals.pop("engine.build_executor")
        zmq_engine.ZMQMPEngine._mp_proc = staticmethod(_originals.pop("zmq_engine.ZMQMPEngine._mp_proc"))
        engine_module.Engine.from_pretrained = _originals.pop("engine.Engine.from_pretrained")
        _originals.clear()
