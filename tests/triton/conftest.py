"""Run the Triton vendor's kernels on CPU tensors through Triton's interpreter (set before triton is imported)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dlinfer.vendor  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":  # bf16 arithmetic as on a GPU (the interpreter's is wrong)
    from interp_bf16 import install  # noqa: E402

    install()


@pytest.fixture(autouse=True)
def _clear_vendor_overrides():
    yield
    dlinfer.vendor.clear_overrides()
