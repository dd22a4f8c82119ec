#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with the project installed (editable) and its
# dev tools. torch/torchvision are installed first, with pip and exact versions, so that the
# project install never lets a resolver pick (and download) another torch. The default pins are
# PyPI's wheels, a CUDA build (~5.5 GB in .venv) that also runs on the CPU; on a CPU-only machine
# with access to PyTorch's own index, TORCH_SPEC="--index-url https://download.pytorch.org/whl/cpu
# torch==2.14.1 torchvision==0.29.1" installs the much smaller CPU build instead.
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
