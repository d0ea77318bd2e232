#!/usr/bin/env bash
# Install the JS test client (matrix-js-sdk, pinned in package.json / package-lock.json) into
# tests/js/node_modules. Idempotent: does nothing when node_modules already matches the lock.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE"
if [ -f package-lock.json ]; then
    # npm writes node_modules/.package-lock.json after a successful install; when it is newer
    # than the lock and package.json, the tree is already what they describe.
    if [ -f node_modules/.package-lock.json ] \
        && [ node_modules/.package-lock.json -nt package-lock.json ] \
        && [ node_modules/.package-lock.json -nt package.json ]; then
        exit 0
    fi
    npm ci --no-audit --no-fund --loglevel=error
else
    npm install --no-audit --no-fund --loglevel=error
fi
