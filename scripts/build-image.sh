#!/usr/bin/env bash
# Build emoserve's container image WITHOUT a container registry: a Debian root filesystem from Debian's
# packages (mmdebstrap --mode=unshare: it never touches the host's /dev), the project and its wheels
# installed into it by deploy/container/install.sh (the Dockerfile's install step), packed as an OCI
# archive by deploy/container/oci.py with the image config of the Dockerfile's stage of the same name.
#   scripts/build-image.sh [cpu|onnx|ray]      -> dist/emoserve-<version>-<target>.oci.tar
#   podman load -i dist/emoserve-0.1.0-cpu.oci.tar     (or docker load -i ...)
# cpu: torch's CPU wheel (as scripts/setup-venv.sh installs it); onnx: no torch, serves entries that
# were converted elsewhere; ray: cpu + the ray extra and wget, for KubeRay (its probes run wget).
# The CUDA image: the Dockerfile's `cuda` target.
#
# Two layers, as the uv pattern has it: Debian + the dependencies (slow to build, rarely changed), then
# the project. Caches (EMOSERVE_IMAGE_CACHE, default .cache/image): the wheels, keyed by the dependency
# list; the base layer (and its gzip), keyed by the Debian suite and mirror, the wheels, the install
# step and SOURCE_DATE_EPOCH; the project's layer, keyed by its files. A change of the source rebuilds
# only the project's layer; nothing changed: the archive is reused.
# Reproducible where the tools allow: SOURCE_DATE_EPOCH (default: the last commit to the image's inputs) for
# mmdebstrap's files and the archive, bytecode that does not depend on file times.
set -euo pipefail
umask 022
cd "$(dirname "$0")/.."

target="${1:-cpu}"
case "$target" in
    cpu | onnx | ray) ;;
    *) echo "usage: scripts/build-image.sh [cpu|onnx|ray]  (CUDA: the Dockerfile's cuda target)" >&2; exit 2 ;;
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
# the time of the last commit to what decides the image's contents besides the source, not of the last
# commit: that would change with every commit and rebuild the base layer for nothing
inputs=(deploy/container/install.sh deploy/container/healthcheck.py pyproject.toml scripts/build-image.sh
    scripts/setup-venv.sh)
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct -- "${inputs[@]}" 2>/dev/null || echo 0)}"
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
debian_packages=python3
if [[ "$target" == ray ]]; then
    requirements+=$'\n'"$(python3 -c 'import tomllib
print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["ray"], sep="\n")')"
    debian_packages+=,wget
fi
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

# 2. the base layer: Debian + the venv with every dependency, keyed by all that goes into it
base_key="$(cat deploy/container/install.sh deploy/container/healthcheck.py \
    | sha256sum - <(echo "$suite $mirror $target $SOURCE_DATE_EPOCH $wheels") | key)"
base="$cache/base-$target-$base_key.tar"
if [[ ! -f "$base" ]]; then
    say "building the base layer (mmdebstrap $suite, unshare mode)"
    stage="$(mktemp -d "$cache/.stage-XXXXXX")"
    chmod 755 "$stage"  # read from inside mmdebstrap's user namespace
    partial="$cache/.partial-$(basename "$base")"  # mmdebstrap writes a tarball when the name ends .tar
    trap 'rm -rf "$stage" "$partial"' EXIT
    cp -l "$wheels"/*.whl "$wheels"/requirements.txt "$wheels"/torch-version "$stage"/ 2>/dev/null \
        || cp "$wheels"/*.whl "$wheels"/requirements.txt "$wheels"/torch-version "$stage"/
    cp deploy/container/healthcheck.py deploy/container/install.sh "$stage"/
    # unshare mode: an unprivileged user namespace, /dev and /proc mounted only inside it (root mode
    # once replaced the host's /dev/null with a regular file)
    nice -n 10 mmdebstrap --mode=unshare --variant=minbase --include="$debian_packages" --quiet \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook='mkdir -p "$1/tmp/build"' \
        --customize-hook="sync-in '$stage' /tmp/build" \
        --customize-hook="chroot \"\$1\" sh /tmp/build/install.sh $target /tmp/build" \
        --customize-hook='rm -rf "$1/tmp/build" "$1"/tmp/* "$1/var/cache/ldconfig/aux-cache"' \
        "$suite" "$partial" "$mirror" >&2
    mv "$partial" "$base"
    rm -rf "$stage"
    trap - EXIT
    # older base layers of this target are not needed again
    find "$cache" -maxdepth 1 -name "base-$target-*.tar*" ! -name "$(basename "$base")*" -delete
fi

# 3. the project's layer: its wheel, installed into /opt/emoserve by the build host's pip (the same
# Python minor version as the image's, so the same bytecode), keyed by its files as in the working tree
source_key="$(git ls-files -z -co --exclude-standard pyproject.toml README.md src | sort -z \
    | xargs -0 sha256sum | key)"
project="$cache/project-$source_key.tar"
if [[ ! -f "$project" ]]; then
    say "building the project's layer"
    host_python="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    [[ "$host_python" == "$python_version" ]] \
        || { echo "build-image: $python is Python $host_python; the image's is $python_version" >&2; exit 1; }
    work="$(mktemp -d "$cache/.project-XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/src" "$work/wheel" "$work/layer"
    # from a copy, so that the build leaves nothing (build/, *.egg-info) in the working tree
    git ls-files -z -co --exclude-standard pyproject.toml README.md src | xargs -0 cp --parents -t "$work/src"
    "${pip[@]}" wheel --quiet --no-deps --no-build-isolation -w "$work/wheel" "$work/src" >&2
    # --ignore-installed: else pip uninstalls the build host's own (editable) emoserve from .venv before
    # installing under --root (it did, once)
    PIP_CONFIG_FILE=/dev/null "${pip[@]}" install --quiet --no-deps --ignore-installed --no-compile \
        --no-warn-script-location --root "$work/layer" --prefix /opt/emoserve "$work"/wheel/emoserve-*.whl
    sed -i '1s|^#!.*|#!/opt/emoserve/bin/python|' "$work/layer/opt/emoserve/bin/emoserve"
    "$python" -m compileall -q --invalidation-mode unchecked-hash -s "$work/layer" -p / "$work/layer/opt" >/dev/null
    tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner --format=posix \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
        -C "$work/layer" -cf "$project.partial" opt
    mv "$project.partial" "$project"
    rm -rf "$work"
    trap - EXIT
    find "$cache" -maxdepth 1 -name "project-*.tar*" ! -name "$(basename "$project")*" -delete
fi

# 4. the archive, unless it already holds these layers
stamp="$out.layers"
# the layers and what writes the config (a change of the Dockerfile's ENV repacks, rebuilding nothing)
layers="$(basename "$base") $(basename "$project") $(cat deploy/container/Dockerfile deploy/container/oci.py | key)"
if [[ -f "$out" && -f "$stamp" && "$(cat "$stamp")" == "$layers" ]]; then
    say "$out is up to date"
else
    say "packing $out"
    python3 deploy/container/oci.py deploy/container/Dockerfile "$target" "emoserve:${version}-${target}" \
        "$out" "$base" "$project" > "$out.json"
    echo "$layers" > "$stamp"
fi
say "done: $out $(python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
print("(%.0f MB compressed, %.0f MB unpacked)" % (r["compressed_bytes"] / 1e6, r["unpacked_bytes"] / 1e6))' "$out.json")"
