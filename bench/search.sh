#!/usr/bin/env bash
# bench/search.sh — issue 13: /search latency over N messages, Hearth and Synapse side by side.
#
#   bench/search.sh                           both servers, 100,000 messages each
#   SEARCH_N_SYNAPSE=10000 bench/search.sh    fewer for Synapse (it loads ~50-90 msgs/s)
#   SEARCH_SKIP_SYNAPSE=1 bench/search.sh     Hearth only (SEARCH_SKIP_HEARTH=1: Synapse only)
#
# For each server, on a fresh data dir, bench/search.py loads the messages through the client
# API (one user, SEARCH_ROOMS rooms, SEARCH_CONC concurrent sends) and then times
# SEARCH_QUERIES sequential searches per planted term (rare 1/10,000, medium 1/100, frequent
# 1/10) and order (rank, recent), and SEARCH_PAGES pages of next_batch.
# Results: $SEARCH_OUT/search-{hearth,synapse}-N.json, logs/, env.txt.
#
# Every server started here is stopped here (Hearth: SIGTERM; Synapse: synapse-peer/stop.sh),
# also on error or Ctrl-C. Every step runs under `timeout`.
#
# Knobs: SEARCH_N (100000), SEARCH_N_HEARTH / SEARCH_N_SYNAPSE (default SEARCH_N; several
#   sizes separated by spaces run one after another, each on a fresh server),
#   SEARCH_ROOMS (4), SEARCH_CONC (16), SEARCH_QUERIES (30), SEARCH_PAGES (10),
#   SEARCH_TIMEOUT (5400 s per run), HEARTH_BIN (target/release/hearth), SEARCH_OUT
#   (/tmp/hearth-search), HEARTH_PORT (8594), SYNAPSE_PORT (8595), SYNAPSE_NAME (hsearch, wiped),
#   SYNPEER_DIR (/work/shared/synapse-peer), SYNPEER_HOME (/tmp/synpeer), PY (/tmp/hearth-pyvenv/bin/python)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OUT=${SEARCH_OUT:-/tmp/hearth-search}
HPORT=${HEARTH_PORT:-8594}
SPORT=${SYNAPSE_PORT:-8595}
SNAME=${SYNAPSE_NAME:-hsearch}
SYNPEER_DIR=${SYNPEER_DIR:-/work/shared/synapse-peer}
export SYNPEER_HOME=${SYNPEER_HOME:-/tmp/synpeer}
PY=${PY:-/tmp/hearth-pyvenv/bin/python}
N=${SEARCH_N:-100000}
NH=${SEARCH_N_HEARTH:-$N}
NS=${SEARCH_N_SYNAPSE:-$N}
TMO=${SEARCH_TIMEOUT:-5400}
SRC_BIN=${HEARTH_BIN:-$REPO/target/release/hearth}
ARGS=(--rooms "${SEARCH_ROOMS:-4}" --conc "${SEARCH_CONC:-16}" --queries "${SEARCH_QUERIES:-30}" --pages "${SEARCH_PAGES:-10}")
T_START=$(date +%s)

log() { printf '[search.sh %4ds] %s\n' $(( $(date +%s) - T_START )) "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ -x "$PY" ] || "$HERE/setup.sh" >/dev/null
command -v curl >/dev/null || die "curl not found"
[ -n "${SEARCH_SKIP_HEARTH:-}" ] || [ -x "$SRC_BIN" ] || die "no Hearth binary at $SRC_BIN (cargo build --release --locked, or HEARTH_BIN=...)"

mkdir -p "$OUT/logs" "$OUT/data"
BIN=$OUT/hearth
[ -n "${SEARCH_SKIP_HEARTH:-}" ] || cp "$SRC_BIN" "$BIN"

HPID=""
SYN_UP=""
cleanup() {
    if [ -n "$HPID" ] && kill -0 "$HPID" 2>/dev/null; then
        kill -TERM "$HPID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$HPID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$HPID" 2>/dev/null || true
    fi
    if [ -n "$SYN_UP" ]; then "$SYNPEER_DIR/stop.sh" "$SNAME" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

hearth_start() {
    local dir=$OUT/data/hearth
    rm -rf "$dir"; mkdir -p "$dir"
    "$BIN" --database "$dir/hearth.db" --listen "127.0.0.1:$HPORT" \
        --server-name "127.0.0.1:$HPORT" --no-rate-limit >"$OUT/logs/hearth-$1.log" 2>&1 &
    HPID=$!
    for _ in $(seq 1 600); do
        curl -sf -o /dev/null "http://127.0.0.1:$HPORT/_matrix/client/versions" && return 0
        kill -0 "$HPID" 2>/dev/null || die "hearth exited during start-up"
        sleep 0.05
    done
    die "hearth not ready after 30 s"
}
hearth_stop() {
    kill -TERM "$HPID"
    for _ in $(seq 1 150); do kill -0 "$HPID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$HPID" 2>/dev/null && kill -KILL "$HPID"
    wait "$HPID" || true
    HPID=""
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    [ -n "${SEARCH_SKIP_HEARTH:-}" ] || echo "hearth: sha256 $(sha256sum "$BIN" | cut -c1-16), repo HEAD $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    [ -n "${SEARCH_SKIP_SYNAPSE:-}" ] || echo "synapse: $("$SYNPEER_HOME/venv/bin/python" -c 'import synapse; print(synapse.__version__)' 2>/dev/null || echo '?')"
    echo "sizes: hearth '$NH', synapse '$NS'; ${ARGS[*]}"
    echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >> "$OUT/env.txt"

if [ -z "${SEARCH_SKIP_HEARTH:-}" ]; then
    for n in $NH; do
        log "Hearth on :$HPORT, $n messages"
        hearth_start "$n"
        timeout "$TMO" "$PY" "$HERE/search.py" --url "http://127.0.0.1:$HPORT" --pid "$HPID" \
            --messages "$n" "${ARGS[@]}" >"$OUT/search-hearth-$n.json" \
            2> >(tee "$OUT/logs/search-hearth-$n.err" >&2) || die "search.py hearth $n failed"
        ls -l "$OUT/data/hearth/" >> "$OUT/logs/hearth-$n.log"
        hearth_stop
    done
fi
if [ -z "${SEARCH_SKIP_SYNAPSE:-}" ]; then
    for n in $NS; do
        log "Synapse on :$SPORT, $n messages (fresh instance $SNAME)"
        SYN_UP=1
        SYNPEER_RESET=1 timeout 180 "$SYNPEER_DIR/start.sh" "$SNAME" "$SPORT" >/dev/null 2>"$OUT/logs/synapse-start.err" \
            || die "synapse did not start (logs/synapse-start.err)"
        SPID=$(cat "$SYNPEER_HOME/$SNAME/synapse.pid")
        timeout "$TMO" "$PY" "$HERE/search.py" --url "https://127.0.0.1:$SPORT" --insecure --pid "$SPID" \
            --messages "$n" "${ARGS[@]}" >"$OUT/search-synapse-$n.json" \
            2> >(tee "$OUT/logs/search-synapse-$n.err" >&2) || die "search.py synapse $n failed"
        "$SYNPEER_DIR/stop.sh" "$SNAME" 2>/dev/null || true
        SYN_UP=""
        cp "$SYNPEER_HOME/$SNAME/homeserver.log" "$OUT/logs/synapse-$n.homeserver.log" 2>/dev/null || true
    done
fi
echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/env.txt"
log "done: $OUT"
