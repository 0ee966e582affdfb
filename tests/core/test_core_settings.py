"""One settings module: every variable dlinfer reads is declared there, parsed one way, and documented in README."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import dlinfer.ops as ops
from dlinfer import settings
from dlinfer.framework.lmdeploy_ext import hook

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("raw, want", [("1", True), ("true", True), ("ON", True), (" yes ", True), ("0", False),
                                       ("false", False), ("off", False), ("No", False), ("", False), (None, False)])
def test_one_boolean_parser(raw, want):
    assert settings.parse_bool("DLINFER_CHECK", raw, False) is want


def test_check_false_turns_checks_off(monkeypatch):
    """``DLINFER_CHECK=false`` used to turn the checks ON (any value but 0 did)."""
    monkeypatch.setenv("DLINFER_CHECK", "false")
    assert settings.check_values() is False
    monkeypatch.setenv("DLINFER_CHECK", "true")
    assert settings.check_values() is True


def test_unknown_value_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("DLINFER_CHECK", "maybe")
    with pytest.raises(ValueError, match="DLINFER_CHECK='maybe'"):
        settings.check_values()
    monkeypatch.setenv("DLINFER_VLLM", "nope")
    from dlinfer.framework import vllm_ext

    with pytest.raises(ValueError, match="DLINFER_VLLM='nope'"):
        vllm_ext.enabled()


def test_a_bad_check_value_reaches_the_op_caller(monkeypatch):
    """On an accelerator the op consults DLINFER_CHECK; on the CPU checks always run (no parse needed)."""
    monkeypatch.setenv("DLINFER_CHECK", "2")
    x = torch.randn(2, 4)
    assert ops.silu_and_mul(x).shape == (2, 2)  # CPU: value checks run regardless


def test_the_lmdeploy_hook_parses_like_the_settings():
    """The start-up hook must stay self-contained (no dlinfer import), so it keeps its own copy: the same words."""
    assert set(hook._TRUE) == set(settings.TRUE) and set(hook._FALSE) - {""} == set(settings.FALSE)


def test_every_variable_read_in_the_package_is_declared():
    declared = {v.name for v in settings.VARIABLES}
    found = set()
    for path in (ROOT / "dlinfer").rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r"\b((?:DLINFER|TRITON)_[A-Z0-9_]+)\b", text))
    found = {("DLINFER_VENDOR_<OP>" if n.startswith("DLINFER_VENDOR_") else n) for n in found}
    # names that are not environment variables: dlinfer's own constants and the vLLM plugin's tables
    not_env = {"DLINFER_OPS", "TRITON_INTERPRET_SKIP"}
    assert found - not_env <= declared, sorted(found - not_env - declared)


def test_readme_table_is_the_settings_table():
    readme = (ROOT / "README.md").read_text()
    assert settings.markdown_table() in readme, (
        "README's environment-variable table differs from dlinfer.settings; paste the output of "
        "`python -c 'import dlinfer.settings as s; print(s.markdown_table())'`")
