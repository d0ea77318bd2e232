#!/usr/bin/env bash
# bench/sticky.sh — issue 11: sticky events (MSC4354), Hearth and Synapse side by side.
#
#   bench/sticky.sh                 ~6 min on 2 cores with the defaults
#   ST_N=30 bench/sticky.sh         fewer syncs per figure (quick check)
#
# Starts two Hearths and two Synapses (synapse-peer, msc4354_enabled) on loopback TLS with
# IP-literal names (ports ST_PORTS, default 8671-8674), fresh data, and runs bench/sticky.py:
#   1. the cost of /sync with 100 live sticky events in a room against 100 plain messages
#      (initial and empty incremental syncs, ST_N each, p50/p90), on Hearth and on Synapse;
#   2. the delivery time of a sticky event sent while the peer was down (ST_DOWN_S) once the
#      peer is back: Hearth->Hearth, Synapse->Synapse, Hearth->Synapse, Synapse->Hearth.
# Results: $ST_OUT/sticky.json, env.txt, logs/. Every server started is stopped (also on error).
#
# Knobs: ST_N (100), ST_DOWN_S (20), ST_PASSIVE_S (90), ST_PORTS, HEARTH_BIN
#   (target/release/hearth; copied into $ST_OUT), ST_OUT (/tmp/hearth-sticky),
#   SYNPEER_DIR (/work/shared/synapse-peer), SYNPEER_HOME (/tmp/synpeer), PY (python3)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export ST_OUT=${ST_OUT:-/tmp/hearth-sticky}
export SYNPEER_DIR=${SYNPEER_DIR:-/work/shared/synapse-peer}
export SYNPEER_HOME=${SYNPEER_HOME:-/tmp/synpeer}
PY=${PY:-python3}
SRC_BIN=${HEARTH_BIN:-$REPO/target/release/hearth}
[ -x "$SRC_BIN" ] || { echo "no Hearth binary at $SRC_BIN (cargo build --release --locked)" >&2; exit 1; }

rm -rf "$ST_OUT"; mkdir -p "$ST_OUT/logs" "$ST_OUT/data"
export ST_BIN=$ST_OUT/hearth
cp "$SRC_BIN" "$ST_BIN"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "nproc: $(nproc); loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "hearth: $("$ST_BIN" --version) (repo HEAD $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo "synapse: $("$SYNPEER_HOME/venv/bin/python" -c 'import synapse; print(synapse.__version__)' 2>/dev/null || echo '?')"
    echo "knobs: ST_N=${ST_N:-100} ST_DOWN_S=${ST_DOWN_S:-20} ST_PASSIVE_S=${ST_PASSIVE_S:-90}"
} > "$ST_OUT/env.txt"
cat "$ST_OUT/env.txt" >&2
timeout 1800 "$PY" "$HERE/sticky.py" > "$ST_OUT/sticky.json"
cat "$ST_OUT/sticky.json"
