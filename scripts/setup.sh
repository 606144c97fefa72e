#!/usr/bin/env bash
# Set up causal-circuits on a fresh machine: graphviz's `dot` (Debian), a virtual environment in
# .venv with the CPU build of torch 2.13.0 installed first (a bare `torch` would pull a multi-GB
# CUDA build), then the package with its test extras. Idempotent: reruns are quick.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v dot >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "setup: installing graphviz (dot) with apt-get" >&2
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    echo "setup: installing torch==2.13.0 (CPU)" >&2
    .venv/bin/pip install -q torch==2.13.0
fi
echo "setup: installing causal-circuits" >&2
.venv/bin/pip install -q -e ".[test]"
