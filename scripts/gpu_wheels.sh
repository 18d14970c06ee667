#!/usr/bin/env bash
# Download, here, the wheels the lent GPU machines lack, into .whl/ (the device tool carries that folder;
# docs/benchmarks.md, "GPU", has the exact call). Those machines have torch 2.11, torchvision, numpy,
# opencv, matplotlib, pyyaml, rich, psutil and safetensors, but no ultralytics (EmotionNet's blocks).
# --ultralytics-trainer adds polars, which `emotion-dist bench --ultralytics` needs (ultralytics' trainer
# reads its results CSV with it): about 40 MB more of the 64 MiB a device call may carry.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dest=.whl
pkgs=("ultralytics==$(sed -n 's/^ultralytics==//p' constraints.txt)" "ultralytics-thop==2.2.3")
if [[ "${1:-}" == "--ultralytics-trainer" ]]; then
    pkgs+=("polars==2.1.0" "polars-runtime-32==2.1.0")
fi
# the machines run CPython 3.12 on x86-64 (KINDS.md); --no-deps: each missing package is named above
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${pkgs[@]}"
ls -l "$dest"
