#!/usr/bin/env bash
# Set everything up, then run the whole test suite, slow real-model tests included, in two
# processes (each test process uses one torch thread). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pytest -q -n 2 "$@"
