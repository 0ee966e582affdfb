"""GPU-only tests: skipped without CUDA; run on the GPU machine by ``benchmarks/gpu_suite.py --only check,graphs``.

Run them in their own pytest process (``python -m pytest tests/gpu``): ``tests/triton/conftest.py`` turns on
Triton's interpreter for its process, and these tests need compiled kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

import dlinfer.vendor
from dlinfer.vendor import registry

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    if torch.cuda.is_available() and not _INTERPRET:
        return
    why = ("no CUDA device" if not torch.cuda.is_available()
           else "TRITON_INTERPRET is set in this process; run tests/gpu in a pytest process of its own")
    skip = pytest.mark.skip(reason=f"GPU test: {why}")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture
def triton_vendor():
    """Force the triton vendor for every op it provides; restore the overrides afterwards."""
    vendor = registry.vendors().get("triton")
    if vendor is None:
        pytest.fail(f"the triton vendor did not load: {registry.load_errors().get('triton')}")
    dlinfer.vendor.set_override("triton")
    yield vendor
    dlinfer.vendor.clear_overrides()

