#!/usr/bin/env bash
# Create (or reuse) the main development venv: torch 2.13.0 (CPU build), triton, test deps, dlinfer editable,
# LMDeploy 0.18.0 (no deps). The example third-party vendor is installed by its own tests, not here:
# installed, it would serve some CPU ops in every other test. Usage: scripts/setup_env.sh [VENV]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0 triton==3.6.0
"${pip[@]}" -e "$root[test]"
if [ -f "$root/scripts/setup_lmdeploy.sh" ]; then bash "$root/scripts/setup_lmdeploy.sh" "$venv"; fi
echo "dlinfer: environment ready at $venv"
