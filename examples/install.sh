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
# The Meta-World suite renders headless through EGL: bring its system libraries, or say how.
if [[ "$extras" == *metaworld* || "$extras" == *test* ]] \
    && ! { ldconfig -p | grep -q "libEGL.so.1" && compgen -G "/usr/lib/*/dri/swrast_dri.so" >/dev/null; }; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -q >/dev/null && apt-get install -y -q libegl1 libgl1-mesa-dri >/dev/null
    else
        echo "the Meta-World suite needs EGL to render headless: sudo apt-get install -y libegl1 libgl1-mesa-dri" >&2
        exit 1
    fi
fi
