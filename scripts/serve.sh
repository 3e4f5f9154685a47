#!/usr/bin/env bash
# Install chatd into ./.venv and start it with the embedded default:
# ./chatd-data holds the SQLCipher database, its generated key (0600), the
# generated admin token (0600), the config and the admin socket (0600).
# Idempotent: an existing venv is updated, existing files are never overwritten.
#
# The install is skipped when nothing it depends on changed since the last
# one: a stamp in the venv holds a hash of pyproject.toml and the Python
# version, so a second run starts within seconds. The install is editable
# (source changes need no reinstall); CHATD_REINSTALL=1 forces one. pip's
# output goes to .venv/chatd-install.log, shown only if the install fails.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/chatd-install.stamp
log=.venv/chatd-install.log
want="$( (cat pyproject.toml; python3 --version) | sha256sum | cut -d' ' -f1)"
if [[ "${CHATD_REINSTALL:-}" == 1 || ! -x .venv/bin/chatd || ! -f "$stamp" ||
      "$(cat "$stamp")" != "$want" ]]; then
    echo "installing chatd into .venv (pip's output: $log)"
    python3 -m venv .venv
    rm -f "$stamp"
    if ! { .venv/bin/python -m pip install --upgrade pip &&
           .venv/bin/python -m pip install -e .; } > "$log" 2>&1; then
        cat "$log" >&2
        echo "serve.sh: installing chatd failed (output above, also in $log)" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
.venv/bin/chatd init --data-dir chatd-data
exec .venv/bin/chatd serve --config chatd-data/chatd.toml
