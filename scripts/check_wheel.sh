#!/usr/bin/env bash
# Build dlinfer's wheel, install it NOT editable into a fresh venv (with torch and the example vendor, nothing from
# this checkout on the path), and run `dlinfer check --vendor reference --quick` and the example vendor's check
# from there: the package works as installed, without benchmarks/ or tests/. About 1-2 minutes.
#
#   bash scripts/check_wheel.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
unset DLINFER_PIP_DRY_RUN
source "$root/scripts/_pip.sh"
start=$SECONDS
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[check_wheel] building the wheel and installing it into a fresh venv (1-2 minutes)"

"$py" -m pip wheel -q --disable-pip-version-check --no-deps -w "$tmp/dist" "$root" >"$tmp/build.log" 2>&1 \
    || { cat "$tmp/build.log" >&2; exit 1; }
whl=$(ls "$tmp"/dist/dlinfer-*.whl)
# The library must not import what the wheel does not ship.
"$py" - "$whl" <<'PYEOF'
import re, sys, zipfile

whl = zipfile.ZipFile(sys.argv[1])
names = whl.namelist()
tops = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))})
if tops != ["dlinfer"]:
    sys.exit(f"check_wheel: the wheel ships {tops}, expected only 'dlinfer'")
pattern = re.compile(r"^\s*(from|import)\s+(benchmarks|tests|examples)\b|import_module\(\s*['\"](benchmarks|tests)\b", re.M)
bad = [f"{n}: {m.group(0).strip()}" for n in names if n.endswith(".py")
       for m in pattern.finditer(whl.read(n).decode("utf-8", "replace"))]
if bad:
    sys.exit("check_wheel: the packaged library imports modules the wheel does not ship:\n  " + "\n  ".join(bad))
print(f"[check_wheel] {sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, no import of benchmarks/tests/examples")
PYEOF

"$py" -m venv "$tmp/venv"
# torch: the version the dev venv has when there is one (pip's cache makes this a local copy), else 2.13.0.
torch_version=$("$root/.venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null \
    || echo 2.13.0)
# shellcheck disable=SC2046
pip_install "$tmp/venv" $(torch_index_args) "torch==$torch_version" numpy
pip_install "$tmp/venv" --no-deps "$whl" "$root/examples/dlinfer-vendor-example"

cd "$tmp"   # nothing of the checkout on sys.path
where=$("$tmp/venv/bin/python" -c 'import dlinfer, os; print(os.path.dirname(dlinfer.__file__))')
case "$where" in
    "$tmp/venv/"*) echo "[check_wheel] dlinfer imports from the installed wheel: ${where#"$tmp/"}" ;;
    *) echo "check_wheel: dlinfer imported from $where, not from the fresh venv" >&2; exit 1 ;;
esac
"$tmp/venv/bin/dlinfer" check --vendor reference --device cpu --quick | tail -n 1
"$tmp/venv/bin/dlinfer" check --vendor example --device cpu --quick | tail -n 1
echo "[check_wheel] passed in $((SECONDS - start)) s"
