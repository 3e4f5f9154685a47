#!/usr/bin/env bash
# Install chatd with its test tools into ./.venv and run the whole suite:
# ruff (ASYNC, B, S rules), mypy --strict on chatd/, then pytest.
# Idempotent: safe to run again at any time.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "== ruff"
.venv/bin/ruff check chatd tests bench
.venv/bin/ruff format --check chatd tests bench
echo "== mypy --strict chatd"
.venv/bin/mypy --strict chatd
echo "== pytest"
.venv/bin/pytest "$@"
