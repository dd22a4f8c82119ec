#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with the project installed (editable) and its
# dev tools. torch/torchvision are installed first with pip and exact versions, because letting a
# resolver pick torch downloads gigabytes of CUDA wheels; TORCH_SPEC overrides the pin.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC
.venv/bin/python -m pip install -q -e '.[dev]'
echo "set-up done: $(.venv/bin/python -c 'import torch, prefect, modal; print("torch", torch.__version__, "prefect", prefect.__version__, "modal", modal.__version__)')" >&2
