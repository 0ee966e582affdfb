"""Fixtures for the LMDeploy adapter tests: tiny models built offline, dlinfer's patch applied and reverted."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # lmdeploy_harness.py, lmdeploy_worker_probe.py


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(arch)`` -> path of a tiny random-weight model directory (built once per session)."""
    from dlinfer.testing.tiny_models import build_tiny_model

    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = build_tiny_model(tmp_path_factory.mktemp(f"tiny_{arch}"), arch)
        return built[arch]

    return get


@pytest.fixture
def patched():
    """dlinfer's LMDeploy patch applied for one test, then reverted."""
    import dlinfer.framework.lmdeploy_ext as ext

    was_applied = ext.is_applied()
    ext.apply()
    yield ext
    if not was_applied:
        ext.revert()
