#!/usr/bin/env bash
# The main job: one process with the web UI (http://127.0.0.1:7860/), the HTTP API (/v1/recognize,
# docs at /docs), probes (/healthz, /readyz) and metrics (/metrics). /healthz answers at once;
# /readyz says 200 once the model is loaded and warmed up. The default model is
# emotion2vec_plus_large: cached, else downloaded, else - loudly - a generated random-weight model
# of the same architecture. Extra arguments go to `emoserve serve`, e.g. ./run.sh --model DIR
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh
exec .venv/bin/emoserve serve "$@"
