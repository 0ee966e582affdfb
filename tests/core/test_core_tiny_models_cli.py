"""``python -m dlinfer.testing.tiny_models``: a real CLI (help, build, clear errors), never a silent no-op."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dlinfer.testing import tiny_models


def test_help_describes_the_cli():
    proc = subprocess.run([sys.executable, "-m", "dlinfer.testing.tiny_models", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    assert "usage: python -m dlinfer.testing.tiny_models" in proc.stdout
    assert "--arch" in proc.stdout and "--set" in proc.stdout


def test_no_arguments_is_an_error_not_a_silent_success():
    proc = subprocess.run([sys.executable, "-m", "dlinfer.testing.tiny_models"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "path" in proc.stderr


def test_builds_a_model_with_overrides(tmp_path, capsys):
    out = tmp_path / "m"
    assert tiny_models.main([str(out), "--arch", "qwen3", "--seed", "3", "--set", "num_hidden_layers=1",
                             "--set", "hidden_size=64", "--set", "head_dim=16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 64 and config["model_type"] == "qwen3"
    assert json.loads((out / "dlinfer_tiny_model.json").read_text())["seed"] == 3
    assert (out / "model.safetensors").stat().st_size > 0 and (out / "tokenizer.json").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--arch", "gpt9"], "invalid choice"),
    (["--set", "num_hidden_layers"], "FIELD=VALUE"),
    (["--set", "vocab_size=10"], "vocab_size"),
])
def test_bad_arguments_exit_2_naming_the_problem(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        tiny_models.main([str(tmp_path / "m"), *argv])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
