#!/usr/bin/env bash
# Debian packages the tests use: promtool (checks the shipped alert rules), Chromium (drives the web
# UI in a real headless browser), mmdebstrap and runc (scripts/build-image.sh builds the container image
# from Debian's packages, tests/test_container.py runs it), PostgreSQL (the jobs' shared store: the tests
# start a server of their own in a temporary directory, tests/support/jobs.py). Installed only when missing and when we may
# (root + apt-get); otherwise the tests that need them skip and say why.
set -uo pipefail
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
command -v runc >/dev/null 2>&1 || missing+=(runc)
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || missing+=(postgresql)
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: ${missing[*]} missing and cannot be installed here (needs root + apt-get); those tests will skip" >&2
    exit 0
fi
echo "setup: installing ${missing[*]} (Debian)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
    || echo "setup: could not install ${missing[*]}; those tests will skip" >&2
