#!/usr/bin/env bash
# Build emoserve's container image WITHOUT a container registry: a Debian root filesystem from Debian's
# packages (mmdebstrap --mode=unshare: it never touches the host's /dev), the project and its wheels
# installed into it by deploy/container/install.sh (the Dockerfile's install step), packed as an OCI
# archive by deploy/container/oci.py with the image config of the Dockerfile's stage of the same name.
#   scripts/build-image.sh [cpu|onnx]      -> dist/emoserve-<version>-<target>.oci.tar
#   podman load -i dist/emoserve-0.1.0-cpu.oci.tar     (or docker load -i ...)
# cpu: torch's CPU wheel (as scripts/setup-venv.sh installs it); onnx: no torch, serves entries that
# were converted elsewhere. The CUDA image: the Dockerfile's `cuda` target.
#
# Caches (EMOSERVE_IMAGE_CACHE, default .cache/image): the wheels, keyed by the dependencies; the root
# filesystem, keyed by every input (Debian suite and mirror, wheels, the project's files, the install
# step, SOURCE_DATE_EPOCH). A second run with nothing changed only packs (or reuses) the archive.
# Reproducible where the tools allow: SOURCE_DATE_EPOCH (default: the last commit's time) for
# mmdebstrap's files and the archive, bytecode that does not depend on file times.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-cpu}"
case "$target" in
    cpu | onnx) ;;
    *) echo "usage: scripts/build-image.sh [cpu|onnx]  (CUDA: the Dockerfile's cuda target)" >&2; exit 2 ;;
esac
for tool in mmdebstrap gzip python3; do
    command -v "$tool" >/dev/null || { echo "build-image: $tool is missing (scripts/setup-system.sh)" >&2; exit 1; }
done
python="${PYTHON:-.venv/bin/python}"
[[ -x "$python" ]] || python=python3
suite="${EMOSERVE_IMAGE_SUITE:-bookworm}"  # its python3 is 3.11: the wheels are fetched for it
python_version=3.11
mirror="${EMOSERVE_IMAGE_MIRROR:-http://deb.debian.org/debian}"
cache="${EMOSERVE_IMAGE_CACHE:-.cache/image}"
torch_version="$(sed -n 's/^torch_version="\(.*\)"$/\1/p' scripts/setup-venv.sh)"
torch_cpu_index="${EMOSERVE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
version="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
out="dist/emoserve-${version}-${target}.oci.tar"
mkdir -p "$cache" dist
started=$SECONDS
say() { echo "build-image: $* ($((SECONDS - started)) s)" >&2; }
key() { sha256sum | cut -c1-16; }
pip=("$python" -m pip --disable-pip-version-check)

# 1. the wheels: the dependencies once per dependency list; torch's CPU wheel as setup-venv.sh finds it
requirements="$(python3 -c 'import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(*[d for d in deps if not d.startswith(("torch", "silero-vad"))], sep="\n")')"
wheels="$cache/wheels-$(printf '%s\n' "$requirements" "$torch_version" "$python_version" | key)"
if [[ ! -f "$wheels/.complete" ]]; then
    say "fetching wheels into $wheels"
    rm -rf "$wheels" && mkdir -p "$wheels"
    printf '%s\n' "$requirements" > "$wheels/requirements.txt"
    echo "$torch_version" > "$wheels/torch-version"
    get=("${pip[@]}" download --quiet --only-binary=:all: --python-version "$python_version" -d "$wheels")
    if "${get[@]}" --no-deps --no-index "torch==${torch_version}" >/dev/null 2>&1; then
        "${get[@]}" "torch==${torch_version}"  # a local CPU wheel (as on our CI machines)
    else
        "${get[@]}" --index-url "$torch_cpu_index" "torch==${torch_version}"
    fi
    "${get[@]}" --no-deps pip silero-vad
    "${get[@]}" --find-links "$wheels" -r "$wheels/requirements.txt" "torch==${torch_version}" silero-vad
    touch "$wheels/.complete"
fi

# 2. the project's wheel, keyed by its files (tracked and new, as in the working tree)
source_key="$(git ls-files -z -co --exclude-standard pyproject.toml README.md src | sort -z \
    | xargs -0 sha256sum | key)"
project="$cache/project-$source_key"
if ! ls "$project"/emoserve-*.whl >/dev/null 2>&1; then
    say "building the project's wheel"
    rm -rf "$project" && mkdir -p "$project/src"
    # from a copy, so that the build leaves nothing (build/, *.egg-info) in the working tree
    git ls-files -z -co --exclude-standard pyproject.toml README.md src | xargs -0 cp --parents -t "$project/src"
    "${pip[@]}" wheel --quiet --no-deps --no-build-isolation -w "$project" "$project/src" >&2
    rm -rf "$project/src"
fi

# 3. the root filesystem: Debian + the venv, keyed by every input
rootfs_key="$(cat deploy/container/install.sh deploy/container/healthcheck.py \
    | sha256sum - <(echo "$suite $mirror $target $SOURCE_DATE_EPOCH $wheels $source_key") | key)"
rootfs="$cache/rootfs-$target-$rootfs_key.tar"
if [[ ! -f "$rootfs" ]]; then
    say "building the root filesystem (mmdebstrap $suite, unshare mode)"
    stage="$(mktemp -d "$cache/.stage-XXXXXX")"
    chmod 755 "$stage"  # read from inside mmdebstrap's user namespace
    partial="$cache/.partial-$(basename "$rootfs")"  # mmdebstrap writes a tarball when the name ends .tar
    trap 'rm -rf "$stage" "$partial"' EXIT
    cp -l "$wheels"/*.whl "$wheels"/requirements.txt "$wheels"/torch-version "$stage"/ 2>/dev/null \
        || cp "$wheels"/*.whl "$wheels"/requirements.txt "$wheels"/torch-version "$stage"/
    cp "$project"/emoserve-*.whl deploy/container/healthcheck.py deploy/container/install.sh "$stage"/
    # unshare mode: an unprivileged user namespace, /dev and /proc mounted only inside it (root mode
    # once replaced the host's /dev/null with a regular file)
    nice -n 10 mmdebstrap --mode=unshare --variant=minbase --include=python3 --quiet \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook='mkdir -p "$1/tmp/build"' \
        --customize-hook="sync-in '$stage' /tmp/build" \
        --customize-hook="chroot \"\$1\" sh /tmp/build/install.sh $target /tmp/build" \
        --customize-hook='rm -rf "$1/tmp/build" "$1"/tmp/* "$1/var/cache/ldconfig/aux-cache"' \
        "$suite" "$partial" "$mirror" >&2
    mv "$partial" "$rootfs"
    rm -rf "$stage"
    trap - EXIT
    # older root filesystems of this target are not needed again
    find "$cache" -maxdepth 1 -name "rootfs-$target-*.tar" ! -name "$(basename "$rootfs")" -delete
fi

# 4. the archive, unless it is already this root filesystem's
stamp="$out.rootfs"
if [[ -f "$out" && -f "$stamp" && "$(cat "$stamp")" == "$(basename "$rootfs")" ]]; then
    say "$out is up to date"
else
    say "packing $out"
    python3 deploy/container/oci.py "$rootfs" deploy/container/Dockerfile "$target" \
        "emoserve:${version}-${target}" "$out" > "$out.json"
    basename "$rootfs" > "$stamp"
fi
say "done: $out $(python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
print("(layer %.0f MB gzip, %.0f MB unpacked)" % (r["layer_gzip_bytes"] / 1e6, r["rootfs_bytes"] / 1e6))' "$out.json")"
