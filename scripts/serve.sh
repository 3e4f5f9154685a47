#!/usr/bin/env bash
# Install chatd into ./.venv and start it with the embedded default:
# ./chatd-data holds the SQLCipher database, its generated key (0600), the
# generated admin token (0600), the config and the admin socket (0600).
# Idempotent: an existing venv is updated, existing files are never overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .
.venv/bin/chatd init --data-dir chatd-data
exec .venv/bin/chatd serve --config chatd-data/chatd.toml
