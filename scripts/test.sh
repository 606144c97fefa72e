#!/usr/bin/env bash
# Set everything up, then run the whole test suite, slow real-model tests included, in two
# processes (each test process uses one torch thread). Extra arguments go to pytest.
# The tests also need headless Chromium (Debian `chromium`) for the HTML viewer; it is installed
# here, not in setup.sh, because only the tests use it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "test: installing chromium (headless browser for the HTML viewer test) with apt-get" >&2
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
.venv/bin/python -m pytest -q -n 2 "$@"
