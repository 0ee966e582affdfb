"""The third-party plugin path end to end, with examples/dlinfer-vendor-example installed for real.

Both example packages (the working vendor and the broken one) are installed into a temporary directory the way
an installer lays them out: the package sources plus a ``<name>-<version>.dist-info`` with ``METADATA`` and the
``entry_points.txt`` generated from the package's own ``pyproject.toml``. Child processes get that directory on
``PYTHONPATH``, and dlinfer finds the vendors through ``importlib.metadata`` like any installed plugin. No build
backend or network is needed, and nothing is installed into the test environment, so no other test sees them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "dlinfer-vendor-example"


def _pyproject(path: Path) -> dict:
    """name, version, packages and dlinfer.vendors entry points of a pyproject.toml."""
    text = path.read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10: the few keys needed, by pattern
        section = text.split('[project.entry-points."dlinfer.vendors"]', 1)[1].split("\n[", 1)[0]
        return {"name": re.search(r'^name = "([^"]+)"', text, re.M).group(1),
                "version": re.search(r'^version = "([^"]+)"', text, re.M).group(1),
                "packages": re.findall(r'"([^"]+)"', re.search(r"^packages = \[(.*)\]", text, re.M).group(1)),
                "entry_points": dict(re.findall(r'^(\w+) = "([^"]+)"', section, re.M))}
    data = tomllib.loads(text)
    return {"name": data["project"]["name"], "version": data["project"]["version"],
            "packages": data["tool"]["setuptools"]["packages"],
            "entry_points": data["project"]["entry-points"]["dlinfer.vendors"]}


def install_into(site: Path, project_dir: Path) -> dict:
    meta = _pyproject(project_dir / "pyproject.toml")
    for package in meta["packages"]:
        shutil.copytree(project_dir / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    dist_info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    lines = ["[dlinfer.vendors]"] + [f"{k} = {v}" for k, v in meta["entry_points"].items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return meta


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """A directory that, on PYTHONPATH, makes both example packages installed. If this environment already has
    the working example installed (e.g. ``pip install -e examples/dlinfer-vendor-example``), that install is
    used and only the broken one is added."""
    site = tmp_path_factory.mktemp("vendor_example_site")
    if _installed("dlinfer-vendor-example"):
        eps = [ep for ep in importlib.metadata.entry_points(group="dlinfer.vendors") if ep.name == "example"]
        assert [ep.value for ep in eps] == ["dlinfer_vendor_example:VENDOR"], eps
    else:
        good = install_into(site, EXAMPLE)
        assert good["entry_points"] == {"example": "dlinfer_vendor_example:VENDOR"}
    if _installed("dlinfer-vendor-example-broken"):
        pytest.fail(f"dlinfer-vendor-example-broken is installed in {sys.executable}: every dlinfer import there "
                    "logs a skipped plugin. Uninstall it: pip uninstall -y dlinfer-vendor-example-broken")
    broken = install_into(site, EXAMPLE / "broken")
    assert broken["entry_points"] == {"example_broken": "dlinfer_vendor_example_broken:VENDOR"}
    return site


def run(site, code=None, args=None, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLINFER_VENDOR")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra_env or {})
    cmd = [sys.executable, "-c", textwrap.dedent(code)] if code else [sys.executable, "-m", "dlinfer.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


PROBE = """
    import json, logging, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import torch
    import dlinfer                      # must work although a broken plugin is installed
    import dlinfer.ops as ops
    import dlinfer_vendor_example as example
    from dlinfer.errors import NotSupportedError
    from dlinfer.vendor import registry

    out = {"vendors": sorted(registry.vendors()), "load_errors": registry.load_errors()}
    x = torch.randn(4, 16)
    ref = registry.get_vendor("reference").ops
    y = ops.silu_and_mul(x)
    out["silu_calls"] = example.CALLS["silu_and_mul"]
    out["silu_matches_reference"] = bool(torch.allclose(y, ref["silu_and_mul"](x), atol=1e-6))
    ops.rms_norm(x, torch.ones(16), 1e-6)
    out["rms_calls"] = example.CALLS["rms_norm"]
    try:
        ops.silu_and_mul(x.half())      # refused by its capabilities
        out["fp16_silu"] = "served"
    except NotSupportedError as exc:
        out["fp16_silu"] = str(exc)
    out["silu_calls_after_fp16"] = example.CALLS["silu_and_mul"]
    ops.add_rms_norm(x, x, torch.ones(16), 1e-6)   # not provided: reference
    try:
        ops.rms_norm(x.half(), torch.ones(16, dtype=torch.half), 1e-6)
        out["forced_fp16"] = "served"
    except NotSupportedError as exc:
        out["forced_fp16"] = str(exc)
    out["vendor_name"] = dlinfer.vendor.vendor_name
    print(json.dumps(out))
"""


def test_discovered_selected_and_broken_one_skipped(plugin_site):
    proc = run(plugin_site, PROBE)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "example" in out["vendors"] and "example_broken" not in out["vendors"]
    assert "libexamplechip.so.1" in out["load_errors"]["example_broken"]
    assert "skipped vendor plugin 'example_broken'" in proc.stderr and "ImportError" in proc.stderr
    # automatic selection on the CPU (priority 10 > reference)
    assert out["silu_calls"] == 1 and out["rms_calls"] == 1 and out["silu_matches_reference"]
    # float16 is refused: reference serves it, and the fallback is logged with the reason
    assert out["silu_calls_after_fp16"] == 1
    assert "falls back from vendor 'example' to 'reference'" in proc.stderr
    assert "dtype float16 not supported" in proc.stderr
    # not forced: a refusal falls back instead of raising
    assert out["forced_fp16"] == out["fp16_silu"] == "served"


def test_forced_example_vendor(plugin_site):
    proc = run(plugin_site, PROBE, extra_env={"DLINFER_VENDOR": "example"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["silu_calls"] == 1 and out["rms_calls"] == 1
    # forced: a call it cannot serve raises with the reason; ops it lacks are served as if nothing were forced
    assert "vendor 'example' (forced by DLINFER_VENDOR)" in out["forced_fp16"]
    assert "dtype float16 not supported" in out["forced_fp16"]
    assert "dtype float16 not supported" in out["fp16_silu"] and out["silu_calls_after_fp16"] == 1
    assert out["vendor_name"] == "reference"  # it does not provide paged_decode_attention


def test_dlinfer_check_passes_the_example(plugin_site, tmp_path):
    report_path = tmp_path / "example.json"
    proc = run(plugin_site, args=["check", "--vendor", "example", "--device", "cpu", "--quick", "--json",
                                  str(report_path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    status = {o["op"]: o["status"] for o in report["ops"]}
    assert status["silu_and_mul"] == status["rms_norm"] == "pass"
    assert {s for op, s in status.items() if op not in ("silu_and_mul", "rms_norm")} == {"n/a"}
    refused = [c for c in report["cases"] if c["status"] == "refused"]
    assert refused and all(c["dtype"] == "float16" for c in refused)
    assert "skipped vendor plugin 'example_broken'" in proc.stderr


def test_info_lists_the_plugins(plugin_site):
    proc = run(plugin_site, args=["info"])
    assert proc.returncode == 0, proc.stderr
    assert "example " in proc.stdout and "priority 10" in proc.stdout
    assert "example_broken FAILED TO LOAD" in proc.stdout
