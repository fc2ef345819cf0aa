#!/usr/bin/env bash
# Set up .venv with the test tools and run lint and the whole test suite (slow tests included).
# Extra arguments go to pytest, e.g. ./test.sh -k weights
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh test,ray,train,docs,postgres,livekit,pipecat
scripts/setup-system.sh
.venv/bin/ruff check src tests benchmarks docs/hooks
.venv/bin/ruff format --check src tests benchmarks docs/hooks
.venv/bin/mypy src/emoserve
.venv/bin/python -m pytest "$@"
