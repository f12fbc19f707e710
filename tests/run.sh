#!/usr/bin/env bash
# Install everything with the test tools, then run the suite but for the tests marked slow (builds of
# wheels and venvs, the stock So400m, 8 devices, whole pipelines). Extra args go to pytest: `-m slow`
# runs those, `-m ""` everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/install.sh test 2> >(grep -v "^WARNING: Location" >&2)
# One pytest process kept about 1.35 of 2 cores busy (104 CPU-minutes in 78), so two processes share
# the suite, a test file each at a time: a module's models and servers are still built once.
# PYTEST_WORKERS=0 runs it all in this one process.
exec .venv/bin/python -m pytest -ra --durations=15 -m "not slow" -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
