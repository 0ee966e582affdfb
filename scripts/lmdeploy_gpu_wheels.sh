#!/usr/bin/env bash
# Download into .whl/ the wheels the GPU machine needs to run LMDeploy 0.18.0's PyTorch engine (stock and on
# dlinfer): benchmarks/lmdeploy_e2e.py.
#
#   scripts/lmdeploy_gpu_wheels.sh [DEST]        (default: .whl in the repository root)
#
# The GPU image (Python 3.12, torch 2.11, transformers 5.17, no network) lacks LMDeploy and 15 of the modules
# its engine imports (listed in WHEELS below). The LMDeploy wheel is rewritten without the TurboMind
# extension and its bundled libraries (never loaded by the PyTorch engine), so the set is about 10 MiB.
# Versions are pinned to those tested on the CPU with scripts/setup_lmdeploy.sh.
#
# On the device machine, start the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
# and name `.whl` in the call's `carry`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"

WHEELS=(
    "lmdeploy==0.18.0"
    "apache-tvm-ffi==0.1.11"
    "pydantic==2.14.4"
    "pydantic-core==2.50.5"
    "xgrammar==0.2.8"
    "pyzmq==27.3.0"
    "mmengine-lite==0.10.7"
    "yapf==0.43.0"
    "pybase64==1.5.1"
    "platformdirs==4.14.8"
    "typing-extensions==4.16.0"
    "typing-inspection==0.4.5"
    "annotated-types==0.8.0"
    "shortuuid==1.0.13"
    "termcolor==3.3.0"
    "addict==2.4.0"
)

source "$ROOT/scripts/_gpu_wheels.sh"
mkdir -p "$DEST"
git_exclude "$ROOT" .whl

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

download_gpu_wheels "$PY" "$TMP" "${WHEELS[@]}"

# One version of each package in DEST: drop older copies of what we bring.
for whl in "$TMP"/*.whl; do
    dist="$(basename "$whl" | cut -d- -f1)"
    rm -f "$DEST/$dist"-*.whl
done

# LMDeploy without TurboMind: drop compiled objects and bundled lib*/ folders, and their RECORD lines.
"$PY" - "$TMP" <<'PYEOF'
import pathlib
import re
import sys
import zipfile

tmp = pathlib.Path(sys.argv[1])
(src,) = tmp.glob("lmdeploy-0.18.0-*.whl")
unwanted = re.compile(r"^lmdeploy/(?:turbomind/)?lib[^/]*/|\.so(?:\.\d+)*$|\.a$")
out = tmp / "stripped" / src.name
out.parent.mkdir()
with zipfile.ZipFile(src) as whl, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as new:
    for item in whl.infolist():
        if unwanted.search(item.filename):
            continue
        data = whl.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(l for l in lines if not unwanted.search(l.split(",", 1)[0])).encode()
        new.writestr(item, data)
src.unlink()
out.replace(src)
PYEOF

cp "$TMP"/*.whl "$DEST"/
COUNT="$(ls "$TMP"/*.whl | wc -l)"
SIZE="$(du -ch "$TMP"/*.whl | tail -n 1 | cut -f1)"
echo "lmdeploy_gpu_wheels.sh: $COUNT wheels ($SIZE) in $DEST"
