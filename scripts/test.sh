#!/usr/bin/env bash
# Set up the environment, lint, check formatting, type-check, check the import contracts (.importlinter),
# then run the tests (further arguments go to pytest).
#   scripts/test.sh [PYTEST ARGS]            in .venv, pinned to constraints.txt (what CI runs)
#   scripts/test.sh --latest [PYTEST ARGS]   in .venv-latest, the newest releases pyproject.toml admits
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=.venv
if [ "${1:-}" = "--latest" ]; then
    shift
    venv=.venv-latest
    bash scripts/setup.sh --latest
else
    bash scripts/setup.sh
fi
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy"
# the layer contracts of .importlinter (no cycle, ir imports nothing, nothing imports cli, no plugin import)
"$venv/bin/lint-imports" --no-cache
exec "$venv/bin/python" -m pytest -q "$@"
