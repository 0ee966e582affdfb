"""A stand-in for LMDeploy's tensor-parallel worker: reports, from the spawned process, which backend it gets."""

from __future__ import annotations

import json

from lmdeploy.pytorch.engine.executor.mp_executor import ExecutorProc


class ProbeProc(ExecutorProc):
    def _main_loop(self, out_path: str):
        import dlinfer.framework.lmdeploy_ext as ext
        from lmdeploy.pytorch.backends import get_backend

        with open(out_path, "w") as f:
            json.dump({"applied": ext.is_applied(), "backend": get_backend().__name__}, f)
