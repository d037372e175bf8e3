#!/usr/bin/env bash
# Lint, format check, type check and tests: what a change must pass before it lands.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check merge tests scripts
ruff format --check merge tests scripts
mypy merge
python -m pytest -q "$@"
