# Sourced by the scripts that gather wheels for the GPU machine's image (CPython 3.12, x86-64, no network).
#
#   git_exclude ROOT NAME             adds /NAME/ to ROOT's .git/info/exclude unless .gitignore or the exclude
#                                     file already names it (the gathered wheels are never committed)
#   download_gpu_wheels PY DIR ARGS   pip download of ARGS into DIR, wheels only and no dependencies, for the
#                                     image's CPython 3.12 on every x86-64 manylinux tag the packages publish

git_exclude() {
    local root="$1" name="$2"
    if ! grep -qsx "/$name/" "$root/.gitignore" "$root/.git/info/exclude"; then
        echo "/$name/" >>"$root/.git/info/exclude"
    fi
}

download_gpu_wheels() {
    local py="$1" dir="$2"
    shift 2
    local platforms=() tag
    # pip matches manylinux_2_N exactly: name every N the packages publish.
    for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
               manylinux_2_24 manylinux_2_18 manylinux_2_17 manylinux2014 manylinux1; do
        platforms+=(--platform "${tag}_x86_64")
    done
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$dir" "$@"
}
