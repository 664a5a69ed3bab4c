#!/usr/bin/env bash
# Set up the environment, then prune SmolLM2-135M end to end (options: see `prunekit demo --help`).
# The output folder (default ./prunekit-demo-out) is created in the current directory.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/prunekit" demo "$@"
