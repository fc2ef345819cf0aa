#!/usr/bin/env bash
# Build the manual (mkdocs.yml, docs/) into OUTDIR, strictly: any warning fails the build, a broken link,
# a link to a missing anchor or a page left out of the nav included. The Reference pages are generated from
# the code at build time (docs/hooks/reference.py).
#   scripts/build-docs.sh OUTDIR
# It uses .venv, set up by scripts/setup-venv.sh with the extras .venv already has plus `docs` (a no-op
# when nothing changed). EMOSERVE_DOCS_PYTHON=/path/to/python builds with that interpreter instead and
# sets nothing up (the tests pass their own).
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: scripts/build-docs.sh OUTDIR" >&2
    exit 2
fi
out="$(realpath -m "$1")"
cd "$(dirname "$0")/.."

python="${EMOSERVE_DOCS_PYTHON:-}"
if [[ -z "$python" ]]; then
    # keep the extras the venv was made with (./test.sh: test,ray,train,docs,postgres), so that the stamp matches
    extras="$(sed -n 's/.* extras=//p' .venv/.emoserve-stamp 2>/dev/null || true)"
    [[ ",$extras," == *",docs,"* ]] || extras="${extras:+$extras,}docs"
    scripts/setup-venv.sh "$extras"
    python=.venv/bin/python
fi

# COLUMNS: the CLI reference is argparse's --help, which wraps to the terminal's width. No --quiet: mkdocs
# counts the warnings that --strict turns into a failure only when they are logged.
export NO_MKDOCS_2_WARNING=1  # Material's notice about its successor, printed at every build
COLUMNS=100 "$python" -m mkdocs build --strict --config-file mkdocs.yml --site-dir "$out"
echo "docs: built into $out" >&2
