#!/usr/bin/env bash
# Set-up from the lock files, so that two machines on different days get the same versions.
#
#   bash setup.sh          .venv with the locked runtime dependencies and the project (editable)
#   bash setup.sh --dev    the same plus the locked dev tools (pytest, ruff, playwright, uv) and
#                          Debian's Chromium for the browser test, where packages can be installed
#   bash setup.sh --lock   recompile requirements.lock and requirements-dev.lock from
#                          pyproject.toml with uv, then exit (run it after editing dependencies)
#
# torch/torchvision are installed first, with pip and the exact versions the lock names, so that
# no resolver ever picks (and downloads) another torch. They are PyPI's wheels: a CUDA build
# (~5.5 GB in .venv) that also runs on the CPU, the same one the Modal image installs.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
MODE="${1:-}"
case "$MODE" in "" | --dev | --lock) ;; *)
  echo "setup.sh: unknown option '$MODE'; use no option, --dev or --lock" >&2
  exit 2
  ;;
esac

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q)

if [ "$MODE" = --lock ]; then
  # The lock is for the Modal image's platform and Python (Debian slim, x86_64, 3.11), which is
  # also the development machines'. The dev lock is constrained by the runtime one, so the two
  # never disagree on a shared package.
  [ -x .venv/bin/uv ] || "${PIP[@]}" "$(grep -E '^uv==' requirements-dev.lock 2>/dev/null || echo uv)"
  COMPILE=(.venv/bin/uv pip compile pyproject.toml --quiet --python-version 3.11
    --python-platform x86_64-manylinux_2_28 --custom-compile-command "bash setup.sh --lock")
  "${COMPILE[@]}" -o requirements.lock
  "${COMPILE[@]}" --extra dev -c requirements.lock -o requirements-dev.lock
  echo "lock: $(grep -c '^[a-z0-9]' requirements.lock) runtime packages in requirements.lock," \
    "$(grep -c '^[a-z0-9]' requirements-dev.lock) with the dev tools in requirements-dev.lock" >&2
  exit 0
fi

LOCK=requirements.lock
[ "$MODE" = --dev ] && LOCK=requirements-dev.lock
"${PIP[@]}" --upgrade pip
# shellcheck disable=SC2046
"${PIP[@]}" $(grep -E '^(torch|torchvision)==' "$LOCK")
"${PIP[@]}" -r "$LOCK"
"${PIP[@]}" --no-deps -e .

if [ "$MODE" = --dev ] && ! command -v chromium >/dev/null 2>&1; then
  # The end-to-end test renders the Prefect UI in Debian's headless Chromium.
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup.sh: Chromium is not installed and this user cannot install packages; the browser" \
      "test will fail until someone runs: sudo apt-get install -y chromium" >&2
  fi
fi
echo "set-up done ($LOCK): $(.venv/bin/python -c 'import torch, prefect, modal; print("torch", torch.__version__, "prefect", prefect.__version__, "modal", modal.__version__)')" >&2
