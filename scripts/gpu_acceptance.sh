#!/usr/bin/env bash
# The GPU acceptance run in one command (docs/benchmarks.md, "GPU"): on a CUDA machine it runs the
# checks and writes gpu_acceptance.{json,md} and its logs to --out (default $OUT, else
# runs/gpu-acceptance); elsewhere it lists what it would run and exits 0. Options: --help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" scripts/gpu_acceptance.py "$@"
