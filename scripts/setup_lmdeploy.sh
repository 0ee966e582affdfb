#!/usr/bin/env bash
# Install LMDeploy 0.18.0 next to dlinfer in an existing virtual environment, without letting pip touch torch.
#
#   scripts/setup_lmdeploy.sh [VENV] [--serve]     (default VENV: /opt/venv-main)
#
# --serve also installs what `lmdeploy serve api_server` imports (fastapi, uvicorn, openai, partial_json_parser,
# with their dependencies; none of them depends on torch).
#
# LMDeploy 0.18.0 caps torch at 2.12.1; dlinfer's test venv runs torch 2.13, the GPU image torch 2.11. So
# LMDeploy is installed with --no-deps and the modules its PyTorch engine imports are installed by name
# (listed in LMDEPLOY_DEPS below). The TurboMind extension (~363 MB) is never loaded by the PyTorch engine and is
# deleted. Re-running is harmless.
set -euo pipefail

VENV=/opt/venv-main
SERVE=0
for arg in "$@"; do
    case "$arg" in
        --serve) SERVE=1 ;;
        -*) echo "setup_lmdeploy.sh: unknown option $arg" >&2; exit 2 ;;
        *) VENV="$arg" ;;
    esac
done
source "$(dirname "${BASH_SOURCE[0]}")/_pip.sh"
# The modules LMDeploy's PyTorch engine imports (none of them depends on torch), and what its API server adds.
LMDEPLOY_DEPS='tqdm numpy pydantic transformers==5.17.0 mmengine-lite psutil requests pybase64 pillow pyzmq shortuuid apache-tvm-ffi==0.1.11'
SERVE_DEPS='fastapi uvicorn openai partial_json_parser'
PY="$VENV/bin/python"
if dry_run; then
    pip_install "$VENV" --no-deps "lmdeploy==0.18.0"
    pip_install "$VENV" $LMDEPLOY_DEPS
    pip_install "$VENV" --no-deps "xgrammar==0.2.8"
    [[ "$SERVE" == 1 ]] && pip_install "$VENV" $SERVE_DEPS
    exit 0
fi
if [[ ! -x "$PY" ]]; then
    echo "setup_lmdeploy.sh: no python at $PY (pass the venv directory as the first argument)" >&2
    exit 2
fi
echo "[setup_lmdeploy] LMDeploy 0.18.0 without its dependencies, then the modules its PyTorch engine imports (about a minute)"

TORCH_BEFORE="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)"

# pip checks the whole venv after each install and complains that lmdeploy wants torch<=2.12.1 and more: that
# is expected here (its dependencies are chosen by hand above), so the complaint is not shown. pip_install
# shows pip's output only when it fails.
pip_install "$VENV" --no-deps "lmdeploy==0.18.0"
pip_install "$VENV" $LMDEPLOY_DEPS
pip_install "$VENV" --no-deps "xgrammar==0.2.8"
if [[ "$SERVE" == 1 ]]; then
    pip_install "$VENV" $SERVE_DEPS
fi

# The TurboMind extension and its bundled libraries: never loaded by the PyTorch engine.
SITE="$("$PY" -c 'import os, lmdeploy; print(os.path.dirname(lmdeploy.__file__))' 2>/dev/null || true)"
if [[ -z "$SITE" ]]; then
    SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/lmdeploy"
fi
find "$SITE" -maxdepth 3 \( -name '_turbomind*.so' -o -name 'turbomind*.so' \) -delete || true

TORCH_AFTER="$("$PY" -c 'import torch; print(torch.__version__)')"
if [[ "$TORCH_BEFORE" != "$TORCH_AFTER" ]]; then
    echo "setup_lmdeploy.sh: torch changed from $TORCH_BEFORE to $TORCH_AFTER; reinstall the torch you had" >&2
    exit 1
fi
"$PY" -c 'import lmdeploy, lmdeploy.pytorch.models.patch; print("[setup_lmdeploy] ready: lmdeploy", lmdeploy.__version__, "with torch", __import__("torch").__version__)'
if [[ "$SERVE" == 1 ]]; then
    "$PY" -c 'import lmdeploy.serve.openai.api_server; print("lmdeploy serve api_server: importable")'
fi
