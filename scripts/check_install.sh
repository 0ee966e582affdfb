#!/usr/bin/env bash
# Check, installing nothing, that every install line of the README's two commands (scripts/setup_env.sh with
# scripts/setup_lmdeploy.sh, scripts/setup_vllm_env.sh and scripts/setup_vllm026_env.sh) resolves from the public index alone: each line runs
# as `pip install --isolated --dry-run --ignore-installed ...`, which ignores this machine's pip configuration
# and local wheels. Needs the network; about 5 minutes (pip fetches the metadata of torch and vLLM's wheels).
#
#   bash scripts/check_install.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
start=$SECONDS
export DLINFER_PIP_DRY_RUN=1
dry_venv="$(mktemp -d)/venv"   # never created: a dry run installs nothing
status=0
bash "$root/scripts/setup_env.sh" "$dry_venv" || status=1
bash "$root/scripts/setup_lmdeploy.sh" "$dry_venv" --serve || status=1
bash "$root/scripts/setup_vllm_env.sh" "$dry_venv" || status=1
bash "$root/scripts/setup_vllm026_env.sh" "$dry_venv" || status=1   # the test command's vllm026 suite
echo "[check_install] $([ $status = 0 ] && echo passed || echo FAILED) in $((SECONDS - start)) s"
exit $status
