#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv. Idempotent: a second call does nothing
# unless settings.ini or this script changed. torch/torchvision are pinned to the pair that installs here
# (see ../shared/design/stack.md); the pins are kept in tools/constraints.txt so pip never swaps the build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ECHOBOOK_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.echobook-env"
want=$(cat settings.ini tools/setup_env.sh tools/constraints.txt | sha1sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "echobook: setting up $VENV (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel "setuptools<81" 2>&1 | grep -v -E "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q -c tools/constraints.txt torch torchvision 2>&1 | grep -v -E "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q -c tools/constraints.txt -e ".[dev]" 2>&1 | grep -v -E "^WARNING: Location" || true
"$VENV/bin/python" -c "import torch, torchvision, timm, fastai, albumentations, cv2, papermill, nbdev" 
"$VENV/bin/python" -m ipykernel install --sys-prefix --name echobook --display-name "echobook" >/dev/null
echo "$want" > "$stamp"
echo "echobook: environment ready in $VENV" >&2
