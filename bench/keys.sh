#!/usr/bin/env bash
# bench/keys.sh — `/keys/query` for a user with 50 devices, Hearth and (unless
# BENCH_SKIP_SYNAPSE=1) Synapse side by side, each fresh, alternated H S H S.
#
#   bench/keys.sh      results on stdout and in $BENCH_OUT/keys.txt
#
# Knobs: HEARTH_BIN (target/release/hearth), BENCH_OUT (/tmp/hearth-bench), KEYS_DEVICES (50),
# KEYS_QUERIES (300), KEYS_ROUNDS (2), HEARTH_PORT (8594), SYNAPSE_PORT (8595), SYNAPSE_NAME
# (hbench-keys, wiped), SYNPEER_DIR (/work/shared/synapse-peer), SYNPEER_HOME (/tmp/synpeer).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
HEARTH_BIN=${HEARTH_BIN:-$REPO/target/release/hearth}
BENCH_OUT=${BENCH_OUT:-/tmp/hearth-bench}
HEARTH_PORT=${HEARTH_PORT:-8594}
SYNAPSE_PORT=${SYNAPSE_PORT:-8595}
SYNAPSE_NAME=${SYNAPSE_NAME:-hbench-keys}
SYNPEER_DIR=${SYNPEER_DIR:-/work/shared/synapse-peer}
export SYNPEER_HOME=${SYNPEER_HOME:-/tmp/synpeer}
PY=$SYNPEER_HOME/venv/bin/python
ARGS=(--devices "${KEYS_DEVICES:-50}" --queries "${KEYS_QUERIES:-300}")

mkdir -p "$BENCH_OUT"
OUT=$BENCH_OUT/keys.txt
: >"$OUT"
WORK=$(mktemp -d)
HEARTH_PID=
cleanup() {
    [ -n "$HEARTH_PID" ] && kill "$HEARTH_PID" 2>/dev/null || true
    SYNPEER_PURGE=1 bash "$SYNPEER_DIR/stop.sh" "$SYNAPSE_NAME" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
[ -x "$PY" ] || bash "$SYNPEER_DIR/start.sh" --install >/dev/null

hearth_round() {
    rm -rf "$WORK/hearth" && mkdir -p "$WORK/hearth"
    RUST_LOG=warn "$HEARTH_BIN" --database "$WORK/hearth/hearth.db" \
        --listen "127.0.0.1:$HEARTH_PORT" --server-name "127.0.0.1:$HEARTH_PORT" \
        --no-rate-limit 2>"$WORK/hearth/log" &
    HEARTH_PID=$!
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$HEARTH_PORT/_matrix/client/versions" >/dev/null && break
        sleep 0.1
    done
    echo "hearth $(timeout 600 "$PY" "$HERE/keys.py" "http://127.0.0.1:$HEARTH_PORT" "${ARGS[@]}")" | tee -a "$OUT"
    kill "$HEARTH_PID"
    wait "$HEARTH_PID" 2>/dev/null || true
    HEARTH_PID=
}

synapse_round() {
    SYNPEER_RESET=1 bash "$SYNPEER_DIR/start.sh" "$SYNAPSE_NAME" "$SYNAPSE_PORT" >/dev/null
    echo "synapse $(timeout 600 "$PY" "$HERE/keys.py" "https://127.0.0.1:$SYNAPSE_PORT" "${ARGS[@]}")" | tee -a "$OUT"
    SYNPEER_PURGE=1 bash "$SYNPEER_DIR/stop.sh" "$SYNAPSE_NAME" >/dev/null 2>&1 || true
}

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT"
for _ in $(seq "${KEYS_ROUNDS:-2}"); do
    hearth_round
    [ "${BENCH_SKIP_SYNAPSE:-0}" = 1 ] || synapse_round
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT"
echo "results in $OUT"
