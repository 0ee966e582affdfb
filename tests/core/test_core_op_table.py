"""The op table is the single source: the custom ops, the public functions, the vendors, the conformance kit,
README and ``dlinfer info`` all agree with it; vendors are checked against it at registration and per result."""

from __future__ import annotations

import pathlib

import pytest
import torch
from core_helpers import install_broken_plugin

import dlinfer.ops as ops
from dlinfer import cli
from dlinfer.errors import VendorContractError
from dlinfer.ops import table
from dlinfer.testing.conformance import SPECS
from dlinfer.vendor import Vendor

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("d", table.TABLE, ids=lambda d: d.name)
def test_custom_op_schema_is_the_table_entry(d):
    schema = getattr(torch.ops.dlinfer, d.name).default._schema
    assert tuple(a.name for a in schema.arguments) == d.args
    written = tuple(a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write)
    assert written == d.mutates
    assert (len(schema.returns) == 0) == (d.returns is None)


@pytest.mark.parametrize("d", table.TABLE, ids=lambda d: d.name)
def test_public_function_and_its_docstring_exist(d):
    fn = getattr(ops, d.name)
    assert fn.__doc__ and len(fn.__doc__.strip()) > 40


def test_op_lists_are_the_table():
    names = tuple(d.name for d in table.TABLE)
    assert ops.CORE_OPS + ops.EXTRA_OPS == names
    assert set(SPECS) == set(names)  # every op has conformance cases, and no case tests a ghost op


def test_every_in_tree_vendor_agrees_with_the_table(isolated_registry):
    reference = isolated_registry.get_vendor("reference")
    assert set(reference.ops) == set(table.OPS)  # the oracle vendor serves every op
    for vendor in isolated_registry.vendors().values():
        for op, fn in vendor.ops.items():
            table.check_vendor_function(vendor.name, op, fn)


def test_readme_op_table_is_the_table():
    assert table.markdown_table() in (ROOT / "README.md").read_text()


def test_info_lists_every_op(isolated_registry, capsys):
    assert cli.main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for d in table.TABLE:
        assert d.name in out


# ---------------------------------------------------------------------------------- vendor checks
def test_registration_refuses_a_wrong_signature_naming_op_and_mismatch():
    with pytest.raises(TypeError, match=r"vendor bad: rms_norm implementation .*rms_norm\(hidden_states, weight, "
                                        r"epsilon\)"):
        Vendor(name="bad", priority=1, devices={"cpu"}, default_devices=set(),
               ops={"rms_norm": lambda hidden_states, weight: hidden_states})
    with pytest.raises(ValueError, match="'rms_nrom', which is not an op of the contract"):
        Vendor(name="bad", priority=1, devices={"cpu"}, default_devices=set(), ops={"rms_nrom": lambda *a: None})


def test_a_vendor_result_of_the_wrong_count_is_caught_naming_vendor_and_op(isolated_registry):
    """A third-party add_rms_norm returning one tensor used to surface far away ("too many values to unpack")."""
    one = Vendor(name="one_output", priority=50, devices={"cpu"}, default_devices={"cpu"},
                 ops={"add_rms_norm": lambda h, r, w, eps: h + r})
    isolated_registry.register_vendor(one)
    h = torch.randn(3, 8)
    with pytest.raises(VendorContractError, match="vendor 'one_output', op add_rms_norm: returned Tensor where the op "
                                                  "declares 2"):
        ops.add_rms_norm(h, torch.randn(3, 8), torch.ones(8))


@pytest.mark.parametrize("bad, match", [
    (lambda x: x, r"output 0 is float32 \[4, 8\], the op declares float32 \[4, 4\]"),
    (lambda x: x[..., :4].half(), r"output 0 is float16 \[4, 4\], the op declares float32 \[4, 4\]"),
    (lambda x: None, "returned NoneType where the op declares 1"),
])
def test_a_vendor_result_of_the_wrong_shape_or_dtype_is_caught(isolated_registry, bad, match):
    isolated_registry.register_vendor(Vendor(name="wrong", priority=50, devices={"cpu"}, default_devices={"cpu"},
                                             ops={"silu_and_mul": bad}))
    with pytest.raises(VendorContractError, match="vendor 'wrong', op silu_and_mul: " + match):
        ops.silu_and_mul(torch.randn(4, 8))


def test_an_in_place_op_must_return_none(isolated_registry):
    isolated_registry.register_vendor(Vendor(name="chatty", priority=50, devices={"cpu"}, default_devices={"cpu"},
                                             ops={"apply_rotary_pos_emb": lambda q, k, c, s: (q, k)}))
    q, k = torch.randn(2, 2, 8), torch.randn(2, 1, 8)
    with pytest.raises(VendorContractError, match="vendor 'chatty', op apply_rotary_pos_emb: returned tuple"):
        ops.apply_rotary_pos_emb(q, k, torch.randn(2, 8), torch.randn(2, 8))


def test_changelog_counts_the_ops_info_lists():
    words = {11: "eleven", 12: "twelve", 13: "thirteen", 14: "fourteen", 15: "fifteen", 16: "sixteen",
             17: "seventeen", 18: "eighteen", 19: "nineteen", 20: "twenty"}
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"{words[len(table.TABLE)]} ops (the {words[len(table.TABLE)]} rows of `dlinfer info`)" in changelog


def test_info_aligns_a_broken_plugin_row_with_the_vendor_rows(isolated_registry, capsys, monkeypatch):
    install_broken_plugin(monkeypatch, isolated_registry, "dlinfer_vendor_broken_chip", "broken_chip_dlinfer:VENDOR",
                          ImportError("libbroken.so: cannot open shared object file"))
    assert cli.main(["info", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    vendor_row = next(line for line in lines if line.startswith("  reference "))
    broken_row = next(line for line in lines if "FAILED TO LOAD" in line)
    assert vendor_row.index("priority") == broken_row.index("FAILED TO LOAD")


def test_public_docs_and_errors_name_block_offsets():
    """One public name: the argument is ``block_offsets`` (LMDeploy's); only the vendor contract says block_table."""
    kc = torch.zeros(2, 4, 1, 8)
    with pytest.raises(ValueError, match="^block_offsets must have 2 dimensions"):
        ops.paged_decode_attention(torch.zeros(1, 2, 8), kc, kc.clone(), torch.zeros(1, dtype=torch.int32), 4, None,
                                   torch.tensor([1]), 4, 2, 1)
    for name in ("paged_decode_attention", "paged_prefill_attention"):
        doc = getattr(ops, name).__doc__
        assert "block_offsets" in doc and "block_table" not in doc
