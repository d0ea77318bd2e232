#!/usr/bin/env bash
# Create (or update) the Python venv used by tests/py and bench/.
#   HEARTH_PYVENV  venv location (default /tmp/hearth-pyvenv)
#   HEARTH_PYTHON  interpreter used to create it (default python3)
# Idempotent: re-running only installs what requirements.txt is missing.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${HEARTH_PYVENV:-/tmp/hearth-pyvenv}
if [ ! -x "$VENV/bin/python" ]; then
    "${HEARTH_PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
"$VENV/bin/pip" install -q -r "$HERE/requirements.txt"
echo "$VENV"
