#!/usr/bin/env bash
# Install everything with the test tools, then run the whole suite (extra args go to pytest,
# e.g. -m "not slow" for the quick part).
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/install.sh test 2> >(grep -v "^WARNING: Location" >&2)
exec .venv/bin/python -m pytest -ra --durations=15 "$@"
