"""Shared fixtures of the core tests."""

from __future__ import annotations

import os

import pytest
import torch

from dlinfer.vendor import registry


IN_TREE = ("reference", "triton")


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registry state (vendors, overrides, caches, warnings given) restored after the test; no env overrides; only
    the in-tree vendors registered during the test (whatever plugins this environment has installed)."""
    for key in list(os.environ):
        if key.startswith("DLINFER_VENDOR"):
            monkeypatch.delenv(key)
    with registry.pinned(*(name for name in IN_TREE if name in registry.vendors())):
        yield registry
