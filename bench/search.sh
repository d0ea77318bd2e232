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
# Synapse is reached over a plain-HTTP client listener (SYNAPSE_PORT+1, added to synapse-peer's
# TLS listener) like Hearth, and logs at WARNING (its INFO line per request costs CPU). Its
# client-API load runs at tens of messages/s (~15 ms of Synapse CPU per message, one Python
# core), so 100,000 takes one to two hours: with SEARCH_RESUME_DIR=/work/bench-data/search the
# Synapse instance lives in $SEARCH_RESUME_DIR/synpeer/NAME and is kept, and search.py keeps its
# progress in $SEARCH_RESUME_DIR/synapse-state.json: rerunning the same command resumes the
# load where it stopped (message i is always transaction m{i}, so a resend is deduplicated)
# and searches once it is complete. SEARCH_LOAD_UNTIL=EPOCH stops a Synapse load at that time
# and searches what is loaded (the expected counts follow the number loaded).
#
# Every server started here is stopped here (Hearth: SIGTERM; Synapse: synapse-peer/stop.sh),
# also on error or Ctrl-C. Every step runs under `timeout`.
#
# Knobs: SEARCH_N (100000), SEARCH_N_HEARTH / SEARCH_N_SYNAPSE (default SEARCH_N; several
#   sizes separated by spaces run one after another, each on a fresh server),
#   SEARCH_ROOMS (4), SEARCH_CONC (16), SEARCH_QUERIES (30), SEARCH_PAGES (10),
#   SEARCH_TIMEOUT (5400 s per run), HEARTH_BIN (target/release/hearth), SEARCH_OUT
#   (/tmp/hearth-search), HEARTH_PORT (8594), SYNAPSE_PORT (8595), SYNAPSE_NAME (hsearch, wiped),
#   SYNPEER_DIR (/work/shared/synapse-peer), SYNPEER_HOME (/tmp/synpeer), PY (/tmp/hearth-pyvenv/bin/python),
#   SEARCH_RESUME_DIR (unset: fresh Synapse per run), SEARCH_LOAD_UNTIL (unset)
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

# shellcheck source=bench/common.sh
. "$HERE/common.sh"

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    [ -n "${SEARCH_SKIP_HEARTH:-}" ] || echo "hearth: sha256 $(sha256sum "$BIN" | cut -c1-16), repo HEAD $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    [ -n "${SEARCH_SKIP_SYNAPSE:-}" ] || echo "synapse: $(synapse_version)"
    echo "sizes: hearth '$NH', synapse '$NS'; ${ARGS[*]}"
    echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >> "$OUT/env.txt"

if [ -z "${SEARCH_SKIP_HEARTH:-}" ]; then
    for n in $NH; do
        log "Hearth on :$HPORT, $n messages"
        hearth_up "$BIN" "$OUT/data/hearth" "$HPORT" "$OUT/logs/hearth-$n.log"
        timeout "$TMO" "$PY" "$HERE/search.py" --url "http://127.0.0.1:$HPORT" --pid "$HPID" \
            --messages "$n" "${ARGS[@]}" >"$OUT/search-hearth-$n.json" \
            2> >(tee "$OUT/logs/search-hearth-$n.err" >&2) || die "search.py hearth $n failed"
        ls -l "$OUT/data/hearth/" >> "$OUT/logs/hearth-$n.log"
        hearth_down
    done
fi
if [ -z "${SEARCH_SKIP_SYNAPSE:-}" ]; then
    for n in $NS; do
        yaml=$OUT/synapse-listeners.yaml
        STATE_ARGS=()
        RESET=1
        if [ -n "${SEARCH_RESUME_DIR:-}" ]; then
            export SYNPEER_HOME=$SEARCH_RESUME_DIR/synpeer
            mkdir -p "$SYNPEER_HOME"
            [ -e "$SYNPEER_HOME/venv" ] || ln -s "${SYNPEER_VENV:-/tmp/synpeer/venv}" "$SYNPEER_HOME/venv"
            STATE_ARGS=(--state "$SEARCH_RESUME_DIR/synapse-state-$n.json")
            [ ! -f "$SEARCH_RESUME_DIR/synapse-state-$n.json" ] || RESET=""
            yaml=$SEARCH_RESUME_DIR/synapse-listeners.yaml
        fi
        [ -z "${SEARCH_LOAD_UNTIL:-}" ] || STATE_ARGS+=(--load-until "$SEARCH_LOAD_UNTIL")
        log "Synapse on :$((SPORT + 1)), $n messages (instance $SYNPEER_HOME/$SNAME${RESET:+, fresh})"
        synapse_up "$SNAME" "$SPORT" "$yaml" "$RESET" "$OUT/logs/synapse-start.err"
        timeout "$TMO" "$PY" "$HERE/search.py" --url "http://127.0.0.1:$((SPORT + 1))" --pid "$SPID" \
            --messages "$n" "${ARGS[@]}" "${STATE_ARGS[@]}" >"$OUT/search-synapse-$n.json" \
            2> >(tee "$OUT/logs/search-synapse-$n.err" >&2) || die "search.py synapse $n failed"
        synapse_down
        cp "$SYNPEER_HOME/$SNAME/homeserver.log" "$OUT/logs/synapse-$n.homeserver.log" 2>/dev/null || true
    done
fi
echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/env.txt"

# Side by side, for every size both servers have results for (also from an earlier run).
for n in $(printf "%s\n" $NH $NS | sort -un); do
    [ -f "$OUT/search-hearth-$n.json" ] && [ -f "$OUT/search-synapse-$n.json" ] || continue
    "$PY" - "$OUT/search-hearth-$n.json" "$OUT/search-synapse-$n.json" <<'PYEOF' | tee "$OUT/compare-$n.txt"
import json, sys
h, s = (json.load(open(p)) for p in sys.argv[1:3])
print(f"COMPARE hearth {h['messages']} / synapse {s['messages']} messages; p50 ms, server CPU ms per search, counts")
print(f"{'':18} {'H p50':>8} {'S p50':>8} {'H cpu':>7} {'S cpu':>7} {'cpu S/H':>8}  counts H / S (expected)")
for k, a in h["search"].items():
    b = s["search"][k]
    hc, sc = a.get("server_cpu_ms_per_search"), b.get("server_cpu_ms_per_search")
    r = f"{sc / hc:.1f}" if hc and sc else "-"
    print(f"{k:18} {a['p50_ms']:>8} {b['p50_ms']:>8} {hc!s:>7} {sc!s:>7} {r:>8}  {a['count']} / {b['count']} ({a['expected']} / {b['expected']})")
print(f"{'pages p50':18} {h['pages']['p50_ms']:>8} {s['pages']['p50_ms']:>8}   distinct {h['pages']['distinct']} / {s['pages']['distinct']}")
PYEOF
done
log "done: $OUT"
