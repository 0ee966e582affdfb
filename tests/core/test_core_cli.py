"""The dlinfer command: info, check, demo/serve dispatch, exit codes."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import types

import pytest
import torch

from core_helpers import install_broken_plugin

from dlinfer import cli
from dlinfer.testing import conformance
from dlinfer.vendor import Vendor


@pytest.fixture(autouse=True)
def _restore_dlinfer_logger():
    """cli.main adds a stderr handler to the 'dlinfer' logger; keep it out of the other tests."""
    import logging

    logger = logging.getLogger("dlinfer")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dlinfer.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_python_dash_m_dlinfer_is_the_command():
    """``python -m dlinfer`` runs the same command as the console script (for a checkout on PYTHONPATH)."""
    done = subprocess.run([sys.executable, "-m", "dlinfer", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: dlinfer") and "check" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "dlinfer", "no-such-command"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "no-such-command" in bad.stderr


def test_console_script_is_declared():
    eps = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "dlinfer"]
    assert eps and eps[0].value == "dlinfer.cli:main"


def test_info(isolated_registry, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "python " in out and "devices: cpu" in out
    assert "reference" in out and "priority 0" in out
    for op in ("silu_and_mul", "paged_decode_attention", "fused_moe", "linear"):
        assert op in out
    assert "op x vendor on cpu" in out


def test_info_shows_refusals_na_and_load_errors(isolated_registry, capsys, monkeypatch):
    install_broken_plugin(monkeypatch, isolated_registry, "ghost", "ghost_chip:VENDOR",
                          ImportError("no module named ghost_chip"))
    isolated_registry.register_vendor(Vendor(
        name="partial", priority=5, devices=frozenset({"cpu"}), default_devices=frozenset({"cpu"}),
        ops={"silu_and_mul": lambda x: x}, available=lambda: "driver libpartial.so missing"))
    assert cli.main(["info", "--device", "cpu", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    silu_row = next(line for line in out.splitlines() if line.strip().startswith("silu_and_mul"))
    rms_row = next(line for line in out.splitlines() if line.strip().startswith("rms_norm "))
    assert "refuses" in silu_row and "n/a" in rms_row
    assert "partial: driver libpartial.so missing" in out
    assert "ghost" in out and "FAILED TO LOAD" in out and "ghost_chip" in out
    assert "bfloat16 call" in out


def test_check_reference_quick_json(tmp_path, capsys, isolated_registry, monkeypatch):
    monkeypatch.delenv("DLINFER_PRECOMPILE", raising=False)
    monkeypatch.delenv("DLINFER_AUTOTUNE", raising=False)
    path = tmp_path / "report.json"
    rc = cli.main(["check", "--vendor", "reference", "--device", "cpu", "--quick", "--json", str(path),
                   "--ops", "silu_and_mul,paged_decode_attention", "--seed", "5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    # progress: each op named before it runs (a stuck op is named), then its result
    n = len(conformance.SPECS["paged_decode_attention"].cases(True)) * len(conformance.DTYPES)
    start = lines.index(f"[2/2] paged_decode_attention: {n} cases ...")
    assert lines[start - 2:start] == ["[1/2] silu_and_mul: 6 cases ...", lines[start - 1]]
    assert lines[start - 1].startswith("[1/2] silu_and_mul: 6 cases, 6 pass")
    assert lines[start + 1].startswith(f"[2/2] paged_decode_attention: {n} cases, {n} pass")
    assert "note: serving warm-ups off for the check (DLINFER_PRECOMPILE=0, DLINFER_AUTOTUNE=0;" in out
    assert "worst rel err" in out and "OK:" in out
    data = json.loads(path.read_text())
    assert data["ok"] and data["seed"] == 5 and [o["op"] for o in data["ops"]] == ["silu_and_mul",
                                                                                    "paged_decode_attention"]


def test_check_shows_the_log_lines_of_a_warmup_it_is_asked_for(isolated_registry, capsys, monkeypatch):
    import logging

    logger = logging.getLogger("dlinfer")
    level = logger.level
    monkeypatch.delenv("DLINFER_AUTOTUNE", raising=False)
    monkeypatch.setenv("DLINFER_PRECOMPILE", "1")
    try:
        logger.setLevel(logging.WARNING)
        assert cli.main(["check", "--vendor", "reference", "--device", "cpu", "--quick", "--ops",
                         "silu_and_mul"]) == 0
        shown = logger.level
    finally:
        logger.setLevel(level)
    out = capsys.readouterr().out
    assert "(DLINFER_AUTOTUNE=0; set one to 1 to include it)" in out and shown == logging.INFO


def test_check_failure_exits_nonzero(isolated_registry, capsys):
    isolated_registry.register_vendor(Vendor(
        name="wrong", priority=-1, devices=frozenset({"cpu"}), default_devices=frozenset(),
        ops={"silu_and_mul": lambda x: x[..., : x.shape[-1] // 2] * 2}))
    assert cli.main(["check", "--vendor", "wrong", "--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "FAIL silu_and_mul" in out
    assert "n/a" in out  # the ops it does not provide


def test_check_bad_arguments(isolated_registry, capsys):
    assert cli.main(["check", "--vendor", "nope", "--quick"]) == 2
    assert "unknown vendor 'nope'" in capsys.readouterr().err
    assert cli.main(["check", "--vendor", "reference", "--quick", "--ops", "silu,rms"]) == 2
    assert "unknown op" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--bogus"])
    assert exc.value.code == 2


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().out


def test_demo_and_serve_dispatch(monkeypatch, capsys):
    seen = {}
    demo = types.ModuleType("dlinfer.framework.vllm_ext.demo")
    demo.main = lambda argv: seen.setdefault("demo", argv) and 0
    monkeypatch.setitem(sys.modules, "dlinfer.framework.vllm_ext.demo", demo)
    assert cli.main(["demo", "--model", "tiny", "-n", "3"]) == 0
    assert seen["demo"] == ["--model", "tiny", "-n", "3"]

    serve = types.ModuleType("dlinfer.framework.lmdeploy_ext.cli")
    serve.main = lambda argv: seen.setdefault("serve", argv) and 3
    monkeypatch.setitem(sys.modules, "dlinfer.framework.lmdeploy_ext.cli", serve)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())
    assert cli.main(["serve", "lmdeploy", "--tp", "2"]) == 3
    assert seen["serve"] == ["--tp", "2"]


def test_missing_module_and_engine_are_clear_errors(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dlinfer.framework.vllm_ext.demo", None)  # import raises ModuleNotFoundError
    assert cli.main(["demo"]) == 2
    assert "dlinfer demo: not available" in capsys.readouterr().err
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["serve", "lmdeploy"]) == 2
    assert "engine 'lmdeploy' is not installed" in capsys.readouterr().err
    assert cli.main(["serve", "sglang"]) == 2
    assert "one of lmdeploy" in capsys.readouterr().err


def test_subprocess_exit_codes():
    ok = run_cli("check", "--vendor", "reference", "--device", "cpu", "--quick", "--ops", "rms_norm")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK:" in ok.stdout
    bad = run_cli("check", "--vendor", "missing")
    assert bad.returncode == 2 and "unknown vendor" in bad.stderr


def test_check_with_nothing_tested_is_not_a_success(isolated_registry, capsys):
    isolated_registry.register_vendor(Vendor(
        name="elsewhere", priority=-1, devices=frozenset({"npu"}), default_devices=frozenset(),
        ops={"silu_and_mul": lambda x: x}))
    assert cli.main(["check", "--vendor", "elsewhere", "--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "does not run on device type 'cpu'" in out and "nothing was tested" in out


def test_check_unusable_device(capsys):
    assert cli.main(["check", "--vendor", "reference", "--device", "nosuchdevice", "--quick"]) == 2
    assert "is not usable here" in capsys.readouterr().err


def test_check_with_nothing_tested_does_not_say_ok(isolated_registry, capsys):
    isolated_registry.register_vendor(Vendor(
        name="elsewhere", priority=-1, devices=frozenset({"npu"}), default_devices=frozenset(),
        ops={"silu_and_mul": lambda x: x}))
    assert cli.main(["check", "--vendor", "elsewhere", "--device", "cpu", "--quick", "--ops", "silu_and_mul"]) == 1
    out = capsys.readouterr().out
    assert "\nOK:" not in out and "NOTHING TESTED: 0 passed" in out


def test_check_triton_on_cpu_without_interpreter_says_what_to_do():
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = run_cli("check", "--vendor", "triton", "--device", "cpu", "--quick", "--ops", "silu_and_mul", env=env)
    if "unknown vendor" in res.stderr:
        pytest.skip("triton is not installed here")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "NOTHING TESTED" in res.stdout and "set TRITON_INTERPRET=1" in res.stdout
    assert "\nOK:" not in res.stdout


@pytest.mark.parametrize("where, why", [("missing/report.json", "does not exist"), ("", "is a folder")])
def test_check_json_path_is_checked_before_the_run(tmp_path, capsys, where, why):
    path = str(tmp_path / where) if where else str(tmp_path)
    assert cli.main(["check", "--vendor", "reference", "--device", "cpu", "--quick", "--json", path]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dlinfer check: --json {path}: ") and why in err[0]
    assert "passed" not in captured.out  # refused before any case ran


def test_info_into_a_closed_pipe_is_one_line_and_nonzero():
    proc = subprocess.Popen([sys.executable, "-m", "dlinfer.cli", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.read(10)  # like `| head -c 10`: read a little, then go away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "dlinfer info: output closed early (broken pipe); stopped"


def test_serve_lmdeploy_with_a_missing_model_path_is_one_line(tmp_path, capsys):
    pytest.importorskip("lmdeploy")
    missing = str(tmp_path / "no-such-model")
    assert cli.main(["serve", "lmdeploy", "api_server", missing, "--tp", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dlinfer serve lmdeploy: model path {missing} does not exist"]
    assert cli.main(["serve", "lmdeploy", "chat", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_serve_lmdeploy_model_path_rules():
    from dlinfer.framework.lmdeploy_ext.cli import lmdeploy_argv, model_path_problem

    assert model_path_problem(lmdeploy_argv(["api_server", "/no/such/model"])) == \
        "model path /no/such/model does not exist"
    assert model_path_problem(lmdeploy_argv(["api_server", "org/model"])) is None  # a hub id: LMDeploy resolves it
    assert model_path_problem(lmdeploy_argv(["proxy", "--server-port", "1"])) is None
