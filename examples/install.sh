#!/usr/bin/env bash
# Make .venv: upstream OpenPI (JAX, CPU) plus openpi-prune. Only PyPI is needed.
# OpenPI comes from `rpent-openpi`, a repackaging of upstream whose JAX model code is
# byte-identical to upstream's; its metadata pins CUDA builds, hence --no-deps and our own list.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-openpi.txt
.venv/bin/python -m pip install -q --no-deps rpent-openpi==0.2.2
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
