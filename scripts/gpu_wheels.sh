#!/usr/bin/env bash
# Put into .whl/ the Python packages the GPU machine's image lacks for benchmarks/gpu_suite.py.
#
#   scripts/gpu_wheels.sh [DEST]          (default: .whl in the repository root)
#
# The GPU machine (Python 3.12, torch 2.11+cu130, triton 3.6, matplotlib, pytest, numpy already there) has no
# network. The suite needs one more thing: LMDeploy 0.18.0's CUDA Triton kernels, the peer it times beside
# dlinfer. Only `lmdeploy/pytorch/kernels/cuda` is imported (benchmarks/peers.py registers bare packages so
# that LMDeploy's serving stack is never loaded), so the wheel is rewritten without the TurboMind extension
# (`turbomind/*.so`, ~363 MB) and its bundled `lib*/` folders: under 2 MiB, well inside a device call's
# 64 MiB. matplotlib is in the image (/work/.library/device/KINDS.md, package list of 2026-11-17), so it is not
# carried.
#
# On the device machine, start the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
# and name `.whl` in the call's `carry`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
LMDEPLOY_VERSION=0.18.0

source "$ROOT/scripts/_gpu_wheels.sh"
mkdir -p "$DEST"
git_exclude "$ROOT" .whl

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

download_gpu_wheels "$PY" "$TMP" "lmdeploy==$LMDEPLOY_VERSION"

SRC="$(ls "$TMP"/lmdeploy-"$LMDEPLOY_VERSION"-*.whl | head -n 1)"
if [[ -z "$SRC" ]]; then
    echo "gpu_wheels.sh: pip downloaded no lmdeploy $LMDEPLOY_VERSION wheel" >&2
    exit 1
fi
rm -f "$DEST"/lmdeploy-*.whl
OUTWHL="$DEST/$(basename "$SRC")"

# Rewrite the wheel without the TurboMind extension and bundled libraries; RECORD is rewritten to match,
# so that pip installs it cleanly.
"$PY" - "$SRC" "$OUTWHL" <<'EOF'
import re
import sys
import zipfile

src, dst = sys.argv[1], sys.argv[2]
# lib*/ folders at the top of the package or under turbomind/, and every compiled object.
drop = re.compile(r"^lmdeploy/(turbomind/)?lib[^/]*/|\.(so(\.[0-9]+)*|a)$")
kept, dropped = [], 0
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    record_name = None
    for info in zin.infolist():
        name = info.filename
        if name.endswith(".dist-info/RECORD"):
            record_name = name
            continue
        if drop.search(name):
            dropped += 1
            continue
        kept.append(name)
        zout.writestr(info, zin.read(name))
    if record_name is None:
        sys.exit("no RECORD in " + src)
    lines = []
    for line in zin.read(record_name).decode().splitlines():
        path = line.split(",", 1)[0]
        if path in kept:
            lines.append(line)
    lines.append(f"{record_name},,")
    zout.writestr(record_name, "\n".join(lines) + "\n")
print(f"gpu_wheels.sh: {dst}: kept {len(kept)} files, dropped {dropped}")
EOF

SIZE=$(stat -c %s "$OUTWHL")
echo "gpu_wheels.sh: $(basename "$OUTWHL") is $((SIZE / 1024)) KiB"
if ((SIZE > 4 * 1024 * 1024)); then
    echo "gpu_wheels.sh: the stripped wheel is larger than expected (> 4 MiB)" >&2
    exit 1
fi
unzip -l "$OUTWHL" 'lmdeploy/pytorch/kernels/cuda/pagedattention.py' >/dev/null \
    || { echo "gpu_wheels.sh: the kernels are missing from the rewritten wheel" >&2; exit 1; }
ls -l "$DEST"
