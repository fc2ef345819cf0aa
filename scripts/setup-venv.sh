#!/usr/bin/env bash
# Create or refresh .venv for emoserve. Quick when nothing changed: a stamp of pyproject.toml and
# this script is compared, and pip runs only when it differs.
#   scripts/setup-venv.sh [EXTRAS]     e.g. scripts/setup-venv.sh test,ray,train (as ./test.sh does)
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
python="${PYTHON:-python3}"
torch_version="2.13.0"
# The CPU wheel index, used only when no local wheel of torch_version is found (see README).
torch_cpu_index="${EMOSERVE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
stamp=".venv/.emoserve-stamp"
want="$(cat pyproject.toml scripts/setup-venv.sh | sha256sum | cut -c1-16) extras=${extras}"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && .venv/bin/python -c "import emoserve" 2>/dev/null; then
    exit 0
fi

[[ -x .venv/bin/python ]] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first: a bare `torch` requirement on a machine without one pulls a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: installing torch ${torch_version} (CUDA build, a GPU is present)" >&2
        "${pip[@]}" "torch==${torch_version}"
    else
        echo "setup: installing torch ${torch_version} (CPU build, no GPU)" >&2
        # a CPU wheel that pip can already see (a --find-links folder, as on our CI machines) is taken
        # as is; otherwise the PyTorch CPU index, which also serves torch's own dependencies
        probe="$(mktemp -d)"
        if .venv/bin/python -m pip download --quiet --no-deps --no-index -d "$probe" "torch==${torch_version}" \
            >/dev/null 2>&1; then
            "${pip[@]}" "torch==${torch_version}"
        else
            "${pip[@]}" --index-url "$torch_cpu_index" "torch==${torch_version}"
        fi
        rm -rf "$probe"
    fi
fi

echo "setup: installing emoserve${extras:+[$extras]} into .venv" >&2
"${pip[@]}" -e ".${extras:+[$extras]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
.venv/bin/python -c "import emoserve" # fail loudly if the install did not take
echo "$want" > "$stamp"
