#!/usr/bin/env bash
# Create (or reuse) the main development venv: torch 2.13.0 (CPU build), triton, test deps, dlinfer editable,
# LMDeploy 0.18.0 (no deps) and the example third-party vendor. Usage: scripts/setup_env.sh [VENV]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0 triton==3.6.0
"${pip[@]}" -e "$root[test]"
if [ -f "$root/scripts/setup_lmdeploy.sh" ]; then bash "$root/scripts/setup_lmdeploy.sh" "$venv"; fi
if [ -d "$root/examples/dlinfer-vendor-example" ]; then
  "${pip[@]}" --no-deps --no-build-isolation -e "$root/examples/dlinfer-vendor-example"
fi
echo "dlinfer: environment ready at $venv"
