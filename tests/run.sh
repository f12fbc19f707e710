#!/usr/bin/env bash
# Install everything with the test tools, then run the suite but for the tests marked slow (builds of
# wheels and venvs, the stock So400m, 8 devices, whole pipelines). Extra args go to pytest: `-m slow`
# runs those, `-m ""` everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/install.sh test 2> >(grep -v "^WARNING: Location" >&2)
exec .venv/bin/python -m pytest -ra --durations=15 -m "not slow" "$@"
