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
# (shared/DESIGN.md section 3). The TurboMind extension (~363 MB) is never loaded by the PyTorch engine and is
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
PY="$VENV/bin/python"
if [[ ! -x "$PY" ]]; then
    echo "setup_lmdeploy.sh: no python at $PY (pass the venv directory as the first argument)" >&2
    exit 2
fi

TORCH_BEFORE="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)"

"$PY" -m pip install -q --no-deps "lmdeploy==0.18.0"
"$PY" -m pip install -q tqdm numpy pydantic "transformers==5.17.0" mmengine-lite psutil requests pybase64 \
    pillow pyzmq shortuuid "apache-tvm-ffi==0.1.11"
"$PY" -m pip install -q --no-deps "xgrammar==0.2.8"
if [[ "$SERVE" == 1 ]]; then
    "$PY" -m pip install -q fastapi uvicorn openai partial_json_parser
fi

# The TurboMind extension and its bundled libraries: never loaded by the PyTorch engine.
SITE="$("$PY" -c 'import os, lmdeploy; print(os.path.dirname(lmdeploy.__file__))' 2>/dev/null || true)"
if [[ -z "$SITE" ]]; then
    SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/lmdeploy"
fi
find "$SITE" -maxdepth 3 \( -name '_turbomind*.so' -o -name 'turbomind*.so' \) -print -delete || true

TORCH_AFTER="$("$PY" -c 'import torch; print(torch.__version__)')"
if [[ "$TORCH_BEFORE" != "$TORCH_AFTER" ]]; then
    echo "setup_lmdeploy.sh: torch changed from $TORCH_BEFORE to $TORCH_AFTER; reinstall the torch you had" >&2
    exit 1
fi
"$PY" -c 'import lmdeploy, lmdeploy.pytorch.models.patch; print("lmdeploy", lmdeploy.__version__, "ready with torch", __import__("torch").__version__)'
if [[ "$SERVE" == 1 ]]; then
    "$PY" -c 'import lmdeploy.serve.openai.api_server; print("lmdeploy serve api_server: importable")'
fi
