#!/usr/bin/env bash
# Set everything up, then run the whole test suite, slow real-model tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
