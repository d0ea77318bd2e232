#!/usr/bin/env bash
# Runs every test: the Rust unit and integration tests, then the client-library interop test
# (matrix-nio from PyPI, installed into a venv by tests/py/setup.sh; matrix-js-sdk from npm,
# installed by tests/js/setup.sh; the matrix-rust-sdk from crates.io, tests/sdk, which also runs
# each scenario against a Synapse from ../shared/synapse-peer) against a freshly built
# server on a free loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --all-targets --locked 2>&1 | tee /tmp/hearth-cargo-test.log

echo "== client library interop (matrix-nio) =="
VENV=$(tests/py/setup.sh | tail -n 1)
work=$(mktemp -d)
port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
./target/debug/hearth --database "$work/hearth.db" --listen "127.0.0.1:$port" --server-name "127.0.0.1:$port" \
    --no-rate-limit > "$work/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/_matrix/client/versions" >/dev/null 2>&1 && break
    sleep 0.1
done
PYTHONDONTWRITEBYTECODE=1 HEARTH_URL="http://127.0.0.1:$port" "$VENV/bin/pytest" -q tests/py || {
    echo "--- server log ---"; tail -n 50 "$work/server.log"; exit 1;
}

echo "== client library interop (matrix-js-sdk, Element's SDK) =="
tests/js/setup.sh
HEARTH_URL="http://127.0.0.1:$port" node --test tests/js/ || {
    echo "--- server log ---"; tail -n 50 "$work/server.log"; exit 1;
}

echo "== matrix-rust-sdk (Element X's SDK), against this Hearth and a Synapse it starts =="
# A separate package (tests/sdk, its own Cargo.lock) so the server's build stays fast; built
# here from scratch on a clean clone, which takes minutes (timed below).
sdk_start=$SECONDS
CARGO_TARGET_DIR=tests/sdk/target cargo test --locked --manifest-path tests/sdk/Cargo.toml --no-run
echo "matrix-rust-sdk test crate built in $((SECONDS - sdk_start)) s"
HEARTH_URL="http://127.0.0.1:$port" CARGO_TARGET_DIR=tests/sdk/target \
    cargo test --locked --manifest-path tests/sdk/Cargo.toml || {
    echo "--- server log ---"; tail -n 50 "$work/server.log"; exit 1;
}
# The server must stop cleanly on SIGTERM (exit 0 after checkpointing the WAL).
kill -TERM $pid
wait $pid
echo "server stopped cleanly on SIGTERM"
