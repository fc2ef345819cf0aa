#!/bin/sh
# Runs INSIDE the image's root filesystem (a Dockerfile RUN, or a chroot during scripts/build-image.sh):
# installs emoserve into the venv /opt/emoserve from a folder of wheels, offline, then strips what a
# running server does not need. The same script for both builds, so the two images hold the same files.
#   install.sh TARGET WHEELS      TARGET: cpu | cuda | ray (with torch) or onnx (without torch)
# The project itself is installed when WHEELS holds its wheel (the Dockerfile); scripts/build-image.sh
# leaves it out and adds it as a layer of its own, so that a change of the source rebuilds only that.
# WHEELS holds every wheel, the project's wheel (emoserve-*.whl), pip's wheel, requirements.txt (the
# project's dependencies without torch and silero-vad), torch-version and healthcheck.py.
set -eu
target="$1"
wheels="$2"
venv=/opt/emoserve

python3 -m venv --without-pip "$venv"
# pip runs from its wheel and is not installed: the image carries no pip and no pip cache
pip_whl="$(ls "$wheels"/pip-*.whl | head -n 1)"
# the builder's PIP_* variables (an index, find-links) mean nothing in here
unset_pip_env="$(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/-u \1/p')"
pip() {
    # shellcheck disable=SC2086
    env $unset_pip_env PIP_CONFIG_FILE=/dev/null "$venv/bin/python" "$pip_whl/pip" install --quiet \
        --no-index --find-links "$wheels" --no-cache-dir --no-compile --disable-pip-version-check "$@"
}
case "$target" in
    cpu | cuda | ray) pip -r "$wheels/requirements.txt" "torch==$(cat "$wheels/torch-version")" silero-vad ;;
    # silero-vad declares torch, but emoserve only reads the ONNX file it ships (never imports it)
    onnx) pip -r "$wheels/requirements.txt" ;;
    *) echo "install.sh: unknown target $target (cpu, cuda, ray, onnx)" >&2; exit 2 ;;
esac
if [ "$target" = onnx ]; then pip --no-deps silero-vad; fi
if ls "$wheels"/emoserve-*.whl >/dev/null 2>&1; then pip --no-deps "$wheels"/emoserve-*.whl; fi

site="$(echo "$venv"/lib/python3*/site-packages)"
# the test suites some wheels ship (never imported at run time), and C headers for building extensions
find "$site" -depth -type d -name tests -exec rm -rf {} +
rm -rf "$site"/torch/include "$site"/numpy/_core/include
find "$venv" -name '*.pyc' -delete
# bytecode once, here: the root filesystem may be read-only at run time; unchecked-hash pycs do not
# depend on file times, so a rebuild gives the same bytes
# (-q q: only the files that do not compile, which no import can load either: modelscope ships a few)
"$venv/bin/python" -m compileall -qq -j 0 --invalidation-mode unchecked-hash "$venv" || true

install -m 0755 "$wheels/healthcheck.py" /usr/local/bin/emoserve-healthcheck

# the non-root user (uid 1000) and the model cache it owns (a volume in the image config)
grep -q '^emoserve:' /etc/group || echo 'emoserve:x:1000:' >> /etc/group
grep -q '^emoserve:' /etc/passwd || echo 'emoserve:x:1000:1000::/home/emoserve:/usr/sbin/nologin' >> /etc/passwd
mkdir -p /models /home/emoserve
chown 1000:1000 /models /home/emoserve
rm -rf /var/cache/apt/* /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log /root/.cache
