#!/usr/bin/env bash
# Create (or update) the Python venv for bench/load.py: the tests' venv (tests/py/setup.sh,
# which honours HEARTH_PYVENV and HEARTH_PYTHON) plus the benchmark's own requirements.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=$("$HERE/../tests/py/setup.sh" | tail -n 1)
"$VENV/bin/pip" install -q -r "$HERE/requirements.txt"
echo "$VENV"
