#!/usr/bin/env bash
# bench/push.sh — push-rule evaluation in a 1,000-member room, Hearth and Synapse side by side.
#
#   bench/push.sh                  all three parts; results on stdout and in $BENCH_OUT/
#   PUSH_SKIP_SYNAPSE=1 bench/push.sh     Hearth only (PUSH_SKIP_INPROC=1: no in-process part)
#
# 1. In-process (Hearth only): tests/push_bench.rs in release mode, an in-process Hearth on
#    loopback with a temporary database: 1,000 local members join one room, then
#    - one message is evaluated for every member (`ops::push::evaluate`, the evaluator's read:
#      one `Ruleset::get_actions` per member), cold and warm (median of 20);
#    - 400 messages are sent by 4 clients with the evaluator running, and the time until it has
#      stored the last one is taken;
#    - the same burst into a fresh 1,000-member room with `push.evaluate = false`.
#    -> $BENCH_OUT/push.txt
# 2. Client API, both servers (bench/push.py, the same script against each): a release Hearth
#    (target/release/hearth, fresh database, --no-rate-limit) and a fresh Synapse 1.163
#    (synapse-peer, rate limits off) each get Alice + 1,000 members registered and joined
#    through the client API, single-send latency in the big room and in a 1-member room, 400
#    messages by 4 clients into each, and the time until member m0's /sync shows the 400th
#    notification. Both are reached over plain HTTP on loopback (Synapse gets an extra non-TLS
#    client listener) and both log at warn level only.
#    -> $BENCH_OUT/push-{hearth,synapse}.json, logs in $BENCH_OUT/push-logs/
#
# Every server started here is stopped here, also on error or Ctrl-C.
# Knobs: BENCH_OUT (/tmp/hearth-bench), HEARTH_BIN (target/release/hearth), HEARTH_PORT (8604),
#   SYNAPSE_PORT (8605; +1 is the plain-HTTP listener), SYNAPSE_NAME (hpush, wiped),
#   SYNPEER_DIR (/work/shared/synapse-peer), SYNPEER_HOME (/tmp/synpeer), PY (/tmp/hearth-pyvenv/bin/python),
#   PUSH_ARGS (extra bench/push.py arguments, e.g. "--members 200").
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BENCH_OUT=${BENCH_OUT:-/tmp/hearth-bench}
HPORT=${HEARTH_PORT:-8604}
SPORT=${SYNAPSE_PORT:-8605}
SNAME=${SYNAPSE_NAME:-hpush}
SYNPEER_DIR=${SYNPEER_DIR:-/work/shared/synapse-peer}
export SYNPEER_HOME=${SYNPEER_HOME:-/tmp/synpeer}
PY=${PY:-/tmp/hearth-pyvenv/bin/python}
SRC_BIN=${HEARTH_BIN:-$REPO/target/release/hearth}
read -r -a EXTRA <<< "${PUSH_ARGS:-}"
LOGS=$BENCH_OUT/push-logs
mkdir -p "$BENCH_OUT" "$LOGS"
cd "$REPO"
log() { printf '[push.sh] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# shellcheck source=bench/common.sh
. "$HERE/common.sh"

echo "# bench/push.sh at $(git rev-parse --short HEAD) on $(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc), loadavg $(cut -d' ' -f1-3 /proc/loadavg)" |
    tee "$BENCH_OUT/push.txt"

if [ -z "${PUSH_SKIP_INPROC:-}" ]; then
    cargo test --release --locked --test push_bench -- --ignored --nocapture --test-threads=1 2>&1 |
        grep -E '^(BENCH|setup:)' | tee -a "$BENCH_OUT/push.txt"
    echo "# in-process part done, loadavg $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$BENCH_OUT/push.txt"
fi

if [ -z "${PUSH_SKIP_HEARTH:-}" ]; then
    [ -x "$SRC_BIN" ] || die "no Hearth binary at $SRC_BIN (cargo build --release --locked, or HEARTH_BIN=...)"
    dir=$BENCH_OUT/push-hearth-data
    mkdir -p "$dir"; cp "$SRC_BIN" "$BENCH_OUT/hearth"
    hearth_up "$BENCH_OUT/hearth" "$dir" "$HPORT" "$LOGS/hearth.log"
    log "Hearth (sha256 $(sha256sum "$BENCH_OUT/hearth" | cut -c1-16)) on :$HPORT, loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
    timeout 1800 "$PY" "$HERE/push.py" --url "http://127.0.0.1:$HPORT" --pid "$HPID" "${EXTRA[@]}" \
        >"$BENCH_OUT/push-hearth.json" 2> >(tee "$LOGS/push-hearth.err" >&2) || die "push.py hearth failed"
    hearth_down
    rm -rf "$dir"
    echo "# client-API part, Hearth done, loadavg $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$BENCH_OUT/push.txt"
fi

if [ -z "${PUSH_SKIP_SYNAPSE:-}" ]; then
    synapse_up "$SNAME" "$SPORT" "$BENCH_OUT/push-synapse-listeners.yaml" 1 "$LOGS/synapse-start.err"
    log "Synapse $(synapse_version) on :$((SPORT + 1)), loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
    timeout 3600 "$PY" "$HERE/push.py" --url "http://127.0.0.1:$((SPORT + 1))" --pid "$SPID" "${EXTRA[@]}" \
        >"$BENCH_OUT/push-synapse.json" 2> >(tee "$LOGS/push-synapse.err" >&2) || die "push.py synapse failed"
    synapse_down
    cp "$SYNPEER_HOME/$SNAME/homeserver.log" "$LOGS/synapse.homeserver.log" 2>/dev/null || true
    echo "# client-API part, Synapse done, loadavg $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$BENCH_OUT/push.txt"
fi

if [ -z "${PUSH_SKIP_HEARTH:-}" ] && [ -z "${PUSH_SKIP_SYNAPSE:-}" ]; then
    "$PY" - "$BENCH_OUT/push-hearth.json" "$BENCH_OUT/push-synapse.json" <<'PYEOF' | tee -a "$BENCH_OUT/push.txt"
import json, sys
h, s = (json.load(open(p)) for p in sys.argv[1:3])
big = f"{h['members']}_members"
# (name, hearth, synapse, True if more is better): the last column is how many times better
# Hearth is (>1) or worse (<1).
rows = [
    ("single send p50 ms, big room", h["single"][big]["p50_ms"], s["single"][big]["p50_ms"], False),
    ("single send p50 ms, 1-member room", h["single"]["1_member"]["p50_ms"], s["single"]["1_member"]["p50_ms"], False),
    ("server CPU ms per single send, big room", h["single"][big].get("server_cpu_ms_per_send"), s["single"][big].get("server_cpu_ms_per_send"), False),
    ("burst msg/s, big room", h["burst"][big]["msgs_per_s"], s["burst"][big]["msgs_per_s"], True),
    ("burst msg/s, 1-member room", h["burst"]["1_member"]["msgs_per_s"], s["burst"]["1_member"]["msgs_per_s"], True),
    ("s from first send until last count visible", h["burst"][big]["visible_after_first_send_s"], s["burst"][big]["visible_after_first_send_s"], False),
    ("server CPU ms per msg until visible", h["burst"][big].get("server_cpu_ms_per_msg_until_visible"), s["burst"][big].get("server_cpu_ms_per_msg_until_visible"), False),
]
print(f"{'COMPARE':45} {'hearth':>10} {'synapse':>10} {'hearth better by':>17}")
for name, a, b, more in rows:
    r = f"{(a / b if more else b / a):.1f}x" if a and b else "-"
    print(f"{name:45} {a!s:>10} {b!s:>10} {r:>17}")
PYEOF
fi
