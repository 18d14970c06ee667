#!/usr/bin/env bash
# Create .venv with the pinned dependencies (constraints.txt) and emotion-dist installed editable.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Some machines carry a CPU-only torch wheel in pip's find-links; PyPI's torchvision cannot import
# with it ("operator torchvision::nms does not exist"). Install from the registry alone there.
# (captured first: with pipefail, `grep -q` closing the pipe early would make the test fail)
pip_config=$("$PY" -m pip config list 2>/dev/null || true)
case "$pip_config" in
  *find-links*) export PIP_CONFIG_FILE=/dev/null ;;
esac
export PIP_FIND_LINKS=
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[all,dev,demo]'
.venv/bin/python -c "import torch, torchvision, ultralytics; print('emotion-dist ready: torch', torch.__version__, 'torchvision', torchvision.__version__, 'ultralytics', ultralytics.__version__)"
