#!/usr/bin/env bash
# Create (or reuse) the main development venv: torch 2.13.0 (the CPU build when PyTorch's CPU index is reachable),
# the Triton that torch 2.13 is built for, test deps, dlinfer editable, LMDeploy 0.18.0 (no deps). The example
# third-party vendor is installed by its own tests, not here: installed, it would serve some CPU ops in every
# other test.
#
#   bash scripts/setup_env.sh [VENV]          (default: .venv in the repository root)
#
# About 2 GB and 2-5 minutes the first time (most of it downloading torch), seconds when the venv is ready.
# DLINFER_PIP_DRY_RUN=1 installs nothing: it checks that each install line resolves from the public index alone.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
py=${PYTHON:-python3}
source "$root/scripts/_pip.sh"
start=$SECONDS
if dry_run; then
    echo "[setup_env] dry run: would the install lines of $venv resolve from the public index alone?"
else
    echo "[setup_env] $venv: torch 2.13 + Triton + test deps + dlinfer + LMDeploy 0.18 (2-5 min the first time)"
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
fi
# torch 2.13's Linux wheels on PyPI pin triton 3.7.x; the CPU build pins none. The range keeps Triton on the
# version torch 2.13 is built for either way (and accepts 3.6, the oldest the Triton vendor is tested with).
# shellcheck disable=SC2046
pip_install "$venv" $(torch_index_args) "torch==2.13.0" "triton>=3.6,<3.8"
pip_install "$venv" -e "$root[test]"
bash "$root/scripts/setup_lmdeploy.sh" "$venv"
if ! dry_run; then
    echo "[setup_env] ready in $((SECONDS - start)) s: $("$venv/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
fi
