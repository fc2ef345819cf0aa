#!/usr/bin/env bash
# The main job: score the bundled example clips with the default model (emotion2vec_plus_large:
# cached, else downloaded, else - loudly - a generated random-weight model of the same
# architecture). Extra arguments go to `emoserve predict`, e.g. ./run.sh --model DIR
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh
exec .venv/bin/emoserve predict src/emoserve/examples --format table "$@"
