"""Zero-code activation: the ``DLINFER_LMDEPLOY`` start-up hook and the ``dlinfer serve lmdeploy`` wrapper."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("lmdeploy", reason="LMDeploy is not installed (scripts/setup_lmdeploy.sh installs it)")

from dlinfer.framework.lmdeploy_ext import cli, install  # noqa: E402

pytestmark = pytest.mark.lmdeploy

# Prints: torch imported at start-up?, hook finder installed?, then (only with "import") applied? and backend.
PROBE = ("import site, sys; site.addsitedir(sys.argv[1]); torch_early = 'torch' in sys.modules; "
         "finder = any(type(f).__name__ == '_ApplyAfterLmdeploy' for f in sys.meta_path); print(torch_early, finder)\n"
         "if sys.argv[2] == 'import':\n"
         "    import lmdeploy; import dlinfer.framework.lmdeploy_ext as ext\n"
         "    from lmdeploy.pytorch.backends import get_backend\n"
         "    print(ext.is_applied(), get_backend().__name__)")


def _probe(site_dir, value, import_lmdeploy=False):
    env = {k: v for k, v in os.environ.items() if k != "DLINFER_LMDEPLOY"}
    if value is not None:
        env["DLINFER_LMDEPLOY"] = value
    done = subprocess.run([sys.executable, "-c", PROBE, str(site_dir), "import" if import_lmdeploy else "-"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split(), done.stderr


def test_start_up_hook_honours_the_environment(tmp_path):
    files = install.install_hook(tmp_path)
    assert {p.name for p in files} == {install.PTH_NAME, f"{install.MODULE_NAME}.py"}
    assert "installed" in install.hook_status(tmp_path)

    on, _ = _probe(tmp_path, "1", import_lmdeploy=True)
    assert on == ["False", "True", "True", "DlinferCudaOpsBackend"], "no torch at start-up, then applied on import"
    off, _ = _probe(tmp_path, None, import_lmdeploy=True)
    assert off == ["False", "False", "False", "CudaOpsBackend"], "off by default"
    zero, _ = _probe(tmp_path, "0")
    assert zero == ["False", "False"]
    bad, err = _probe(tmp_path, "maybe")
    assert bad == ["False", "False"] and "DLINFER_LMDEPLOY='maybe'" in err

    removed = install.uninstall_hook(tmp_path)
    assert len(removed) == 2 and "not installed" in install.hook_status(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        install.install_hook(tmp_path / "missing")


def test_hook_enabled_values():
    from dlinfer.framework.lmdeploy_ext.hook import enabled

    assert enabled({"DLINFER_LMDEPLOY": "1"}) and enabled({"DLINFER_LMDEPLOY": " On "})
    assert not enabled({}) and not enabled({"DLINFER_LMDEPLOY": "off"})
    with pytest.raises(ValueError, match="DLINFER_LMDEPLOY"):
        enabled({"DLINFER_LMDEPLOY": "2"})


def test_wrapper_argument_forwarding():
    assert cli.lmdeploy_argv(["api_server", "M", "--tp", "2"]) == \
        ["serve", "api_server", "M", "--tp", "2", "--backend", "pytorch"]
    assert cli.lmdeploy_argv(["serve", "api_server", "M", "--backend", "pytorch"]) == \
        ["serve", "api_server", "M", "--backend", "pytorch"]
    assert cli.lmdeploy_argv(["chat", "M"]) == ["chat", "M", "--backend", "pytorch"]
    assert cli.lmdeploy_argv(["proxy", "--server-port", "9"]) == ["serve", "proxy", "--server-port", "9"]
    for bad in ([], ["api_server", "M", "--backend", "turbomind"], ["api_server", "M", "--backend=turbomind"],
                ["api_server", "M", "--backend"]):
        with pytest.raises(ValueError):
            cli.lmdeploy_argv(bad)


def _model_dir(tmp_path) -> str:
    """A local model folder as the wrapper wants one (it refuses a missing path or one without config.json before
    LMDeploy runs)."""
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


def test_wrapper_runs_lmdeploy_with_dlinfer_applied(monkeypatch, tmp_path):
    import dlinfer.framework.lmdeploy_ext as ext
    import lmdeploy.cli.entrypoint as entrypoint

    model = _model_dir(tmp_path)

    monkeypatch.setenv("DLINFER_LMDEPLOY", "0")
    was = ext.is_applied()
    seen = {}

    def fake_run():
        seen["argv"] = list(sys.argv)
        seen["applied"] = ext.is_applied()
        raise SystemExit(0)

    monkeypatch.setattr(entrypoint, "run", fake_run)
    try:
        assert cli.main(["api_server", model, "--tp", "2", "--server-port", "23333"]) == 0
        assert seen == {"argv": ["lmdeploy", "serve", "api_server", model, "--tp", "2", "--server-port",
                                 "23333", "--backend", "pytorch"], "applied": True}
        assert os.environ["DLINFER_LMDEPLOY"] == "1", "spawned processes must inherit the switch"
        assert cli.main(["api_server", model, "--backend", "turbomind"]) == 2
        monkeypatch.undo()
        monkeypatch.setenv("DLINFER_LMDEPLOY", "0")  # restored after the test
        # LMDeploy's real parser: --help exits 0 after the patch is applied
        assert cli.main(["api_server", "--help"]) == 0
    finally:
        if not was:
            ext.revert()


def test_module_entry_point_installs_and_reports(tmp_path, capsys):
    from dlinfer.framework.lmdeploy_ext.__main__ import main

    assert main(["install-hook", str(tmp_path)]) == 0
    assert main(["hook-status", str(tmp_path)]) == 0 and "installed in" in capsys.readouterr().out
    assert main(["uninstall-hook", str(tmp_path)]) == 0 and "removed" in capsys.readouterr().out
    assert main(["install-hook", str(tmp_path / "nope")]) == 2 and "does not exist" in capsys.readouterr().err
    assert main(["bogus"]) == 2


def test_wrapper_reports_a_refusal_cleanly(monkeypatch, capsys, tmp_path):
    import dlinfer.framework.lmdeploy_ext as ext
    import lmdeploy.cli.entrypoint as entrypoint
    from dlinfer.errors import NotSupportedError

    def refusing_run():
        raise NotSupportedError("LMDeploy on dlinfer cannot serve this setup: sliding-window attention")

    monkeypatch.setenv("DLINFER_LMDEPLOY", "0")
    monkeypatch.setattr(entrypoint, "run", refusing_run)
    was = ext.is_applied()
    try:
        assert cli.main(["api_server", _model_dir(tmp_path)]) == 1
        assert "sliding-window attention" in capsys.readouterr().err
    finally:
        if not was:
            ext.revert()
