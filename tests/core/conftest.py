"""Shared fixtures of the core tests."""

from __future__ import annotations

import os

import pytest
import torch

from dlinfer.vendor import registry


IN_TREE = ("reference", "triton")


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registry state (vendors, overrides, caches, logged fallbacks) restored after the test; no env overrides; only
    the in-tree vendors registered during the test."""
    for key in list(os.environ):
        if key.startswith("DLINFER_VENDOR"):
            monkeypatch.delenv(key)
    registry.vendors()  # discover before saving, so the saved state is complete
    with registry._lock:
        saved = (dict(registry._vendors), dict(registry._load_errors), registry._discovered,
                 dict(registry._overrides), set(registry._logged_fallbacks))
        # hermetic: only the in-tree vendors, whatever plugins this environment has installed
        for name in [n for n in registry._vendors if n not in IN_TREE]:
            del registry._vendors[name]
        registry.clear_selection_cache()
    yield registry
    with registry._lock:
        registry._vendors.clear()
        registry._vendors.update(saved[0])
        registry._load_errors.clear()
        registry._load_errors.update(saved[1])
        registry._discovered = saved[2]
        registry._overrides.clear()
        registry._overrides.update(saved[3])
        registry._logged_fallbacks.clear()
        registry._logged_fallbacks.update(saved[4])
        registry.clear_selection_cache()
