#!/usr/bin/env bash
# Install everything, then prune a real (small, embedded) pi0.5 and show what was kept.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/install.sh tools 2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/openpi-prune demo --out openpi-prune-demo
