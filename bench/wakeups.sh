#!/usr/bin/env bash
# bench/wakeups.sh — issue 8: N parked bystander long-polls vs. CPU per message into another
# room and the member's wake-up latency. Hearth and Synapse side by side, one run.
#
#   bench/wakeups.sh                       both servers (~4.7 min on 2 cores with the defaults: 279-282 s measured)
#   WK_N=200 bench/wakeups.sh              fewer bystanders (quick check)
#   WAKE_SKIP_SYNAPSE=1 bench/wakeups.sh   Hearth only (WAKE_SKIP_HEARTH=1: Synapse only)
#
# For each server (Hearth, then Synapse), on a fresh data dir, bench/wakeups.py:
#   setup  N bystanders (WK_QUIET of them with a quiet room of their own, the rest in no room),
#          a member and a sender in one busy room; each bystander's initial /sync (since token)
#   A      none parked: M messages into the busy room (server CPU per message), then W
#          sequential wake-ups of the member's parked /sync (p50, p90)
#   B      the same with the N bystanders' /sync long-polls parked (re-parked if they return;
#          returns counted)
# Results: $WAKE_OUT/wakeups-{hearth,synapse}.json, logs/, summary.txt (printed at the end).
#
# Every server started here is stopped here (Hearth: SIGTERM; Synapse: synapse-peer/stop.sh),
# also on error or Ctrl-C. Every step runs under `timeout`.
#
# Knobs (environment):
#   WK_N (1000) bystanders, WK_QUIET (100) of them with a quiet room, WK_M (200) messages,
#   WK_W (50) wake-ups, WK_SEND_CONC (1: sequential sends), WK_SETUP_CONC (16),
#   WK_PARK_MS (100), WK_BYSTANDER_TIMEOUT_MS (240000), WK_SETTLE_S (6)  -> bench/wakeups.py
#   WK_TIMEOUT (480) seconds allowed for each wakeups.py run
#   HEARTH_BIN (target/release/hearth; copied into $WAKE_OUT first), WAKE_OUT (/tmp/hearth-wakeups),
#   HEARTH_PORT (8592), SYNAPSE_PORT (8593), SYNAPSE_NAME (hwake, a synapse-peer instance; wiped),
#   SYNPEER_DIR (/work/shared/synapse-peer), SYNPEER_HOME (/tmp/synpeer),
#   PY (/tmp/hearth-pyvenv/bin/python; bench/setup.sh creates it)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OUT=${WAKE_OUT:-/tmp/hearth-wakeups}
HPORT=${HEARTH_PORT:-8592}
SPORT=${SYNAPSE_PORT:-8593}
SNAME=${SYNAPSE_NAME:-hwake}
SYNPEER_DIR=${SYNPEER_DIR:-/work/shared/synapse-peer}
export SYNPEER_HOME=${SYNPEER_HOME:-/tmp/synpeer}
PY=${PY:-/tmp/hearth-pyvenv/bin/python}
WK_TIMEOUT=${WK_TIMEOUT:-480}
SKIP_SYNAPSE=${WAKE_SKIP_SYNAPSE:-}
SKIP_HEARTH=${WAKE_SKIP_HEARTH:-}
SRC_BIN=${HEARTH_BIN:-$REPO/target/release/hearth}
T_START=$(date +%s)

log() { printf '[wakeups.sh %4ds] %s\n' $(( $(date +%s) - T_START )) "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ -x "$PY" ] || "$HERE/setup.sh" >/dev/null
command -v curl >/dev/null || die "curl not found"
[ -n "$SKIP_HEARTH" ] || [ -x "$SRC_BIN" ] || die "no Hearth binary at $SRC_BIN (cargo build --release --locked, or HEARTH_BIN=...)"

rm -rf "$OUT"; mkdir -p "$OUT/logs" "$OUT/data"
BIN=$OUT/hearth
[ -n "$SKIP_HEARTH" ] || cp "$SRC_BIN" "$BIN"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # N long-polls need fds (servers inherit it)
[ "$(ulimit -n)" -ge $(( ${WK_N:-1000} + 200 )) ] || die "ulimit -n is $(ulimit -n): too low for WK_N=${WK_N:-1000}"

# ------------------------------------------------------------------ servers ----
HPID=""
SYN_UP=""
cleanup() {
    if [ -n "$HPID" ] && kill -0 "$HPID" 2>/dev/null; then
        kill -TERM "$HPID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$HPID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$HPID" 2>/dev/null || true
    fi
    if [ -n "$SYN_UP" ]; then synapse_stop; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

hearth_start() {
    local dir=$OUT/data/hearth
    rm -rf "$dir"; mkdir -p "$dir"
    "$BIN" --database "$dir/hearth.db" --listen "127.0.0.1:$HPORT" \
        --server-name "127.0.0.1:$HPORT" --no-rate-limit >"$OUT/logs/hearth.log" 2>&1 &
    HPID=$!
    for _ in $(seq 1 600); do
        curl -sf -o /dev/null "http://127.0.0.1:$HPORT/_matrix/client/versions" && return 0
        kill -0 "$HPID" 2>/dev/null || die "hearth exited during start-up (logs/hearth.log)"
        sleep 0.05
    done
    die "hearth not ready after 30 s"
}
hearth_stop() {
    kill -TERM "$HPID"
    for _ in $(seq 1 150); do kill -0 "$HPID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$HPID" 2>/dev/null && { log "hearth ignored SIGTERM for 15 s: SIGKILL"; kill -KILL "$HPID"; }
    local rc=0; wait "$HPID" || rc=$?
    [ "$rc" = 0 ] || log "hearth exited with $rc"
    HPID=""
}
synapse_start() {
    SYN_UP=1
    SYNPEER_RESET=1 timeout 180 "$SYNPEER_DIR/start.sh" "$SNAME" "$SPORT" >/dev/null 2>"$OUT/logs/synapse-start.err" \
        || { cat "$OUT/logs/synapse-start.err" >&2; die "synapse did not start"; }
    SPID=$(cat "$SYNPEER_HOME/$SNAME/synapse.pid")
}
synapse_stop() {
    "$SYNPEER_DIR/stop.sh" "$SNAME" 2>/dev/null || true
    SYN_UP=""
    cp "$SYNPEER_HOME/$SNAME/homeserver.log" "$OUT/logs/synapse.homeserver.log" 2>/dev/null || true
    cp "$SYNPEER_HOME/$SNAME/stdout.log" "$OUT/logs/synapse.stdout.log" 2>/dev/null || true
}

# ------------------------------------------------------------------ context ----
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "kernel: $(uname -sr)"
    [ -n "$SKIP_HEARTH" ] || echo "hearth: $("$BIN" --version) sha256 $(sha256sum "$BIN" | cut -c1-16) (binary built $(date -u -r "$SRC_BIN" '+%Y-%m-%d %H:%M UTC'); repo HEAD now $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
    [ -n "$SKIP_SYNAPSE" ] || echo "synapse: $("$SYNPEER_HOME/venv/bin/python" -c 'import synapse; print(synapse.__version__)' 2>/dev/null || echo '? (venv created on first start)')"
    echo "load generator: $("$PY" --version), aiohttp $("$PY" -c 'import aiohttp; print(aiohttp.__version__)')"
    echo "knobs: WK_N=${WK_N:-1000} WK_QUIET=${WK_QUIET:-100} WK_M=${WK_M:-200} WK_W=${WK_W:-50} WK_SEND_CONC=${WK_SEND_CONC:-1} WK_PARK_MS=${WK_PARK_MS:-100}"
    echo "ulimit -n: $(ulimit -n)"
    echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/env.txt"
cat "$OUT/env.txt" >&2

# ---------------------------------------------------------------------- runs ----
if [ -z "$SKIP_HEARTH" ]; then
    log "Hearth on :$HPORT (fresh data dir)"
    hearth_start
    timeout "$WK_TIMEOUT" "$PY" "$HERE/wakeups.py" --url "http://127.0.0.1:$HPORT" --pid "$HPID" \
        >"$OUT/wakeups-hearth.json" 2> >(tee "$OUT/logs/wakeups-hearth.err" >&2) \
        || { sleep 0.2; die "wakeups.py hearth failed (logs/wakeups-hearth.err)"; }
    curl -s "http://127.0.0.1:$HPORT/_hearth/metrics" > "$OUT/hearth.metrics" || true
    hearth_stop
fi
if [ -z "$SKIP_SYNAPSE" ]; then
    log "Synapse on :$SPORT (fresh instance $SNAME)"
    synapse_start
    timeout "$WK_TIMEOUT" "$PY" "$HERE/wakeups.py" --url "https://127.0.0.1:$SPORT" --insecure --pid "$SPID" \
        >"$OUT/wakeups-synapse.json" 2> >(tee "$OUT/logs/wakeups-synapse.err" >&2) \
        || { sleep 0.2; die "wakeups.py synapse failed (logs/wakeups-synapse.err)"; }
    synapse_stop
fi
echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/env.txt"
sleep 0.2   # let the tee'd stderr drain

# ------------------------------------------------------------------- summary ----
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys

out = sys.argv[1]
R = {}
for srv in ("hearth", "synapse"):
    p = os.path.join(out, f"wakeups-{srv}.json")
    if os.path.exists(p) and os.path.getsize(p):
        R[srv] = json.load(open(p))
g = lambda d, *k: None if d is None else __import__("functools").reduce(lambda a, b: (a or {}).get(b), k, d)
H, S = R.get("hearth"), R.get("synapse")
any_r = H or S
n = g(any_r, "bystanders")
print(f"\nWake-ups with {n} parked bystanders ({g(any_r, 'quiet_rooms')} of them with a quiet room): "
      f"{g(any_r, 'messages')} messages (send concurrency {g(any_r, 'send_concurrency')}), "
      f"{g(any_r, 'wakeups')} wake-ups per phase")
print("A = none parked, B = all parked\n")

def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)
def vs(h, s, lower_better=True):
    if not isinstance(h, (int, float)) or not isinstance(s, (int, float)) or not h or not s:
        return "-"
    r = s / h if lower_better else h / s
    return f"{r:.2f}x better" if r >= 1 else f"{1 / r:.2f}x worse"
rows = [
    ("server CPU per message, A (ms)", ("A", "throughput", "server_cpu_ms_per_msg"), True),
    ("server CPU per message, B (ms)", ("B", "throughput", "server_cpu_ms_per_msg"), True),
    ("  ratio B/A (target <= 1.5)", ("result", "cpu_ratio_B_over_A"), None),
    ("server CPU per wake-up round, A (ms)", ("A", "wakeup", "server_cpu_ms_per_msg"), True),
    ("server CPU per wake-up round, B (ms)", ("B", "wakeup", "server_cpu_ms_per_msg"), True),
    ("member wake-up p50, A (ms)", ("A", "wakeup", "latency", "p50_ms"), True),
    ("member wake-up p50, B (ms)", ("B", "wakeup", "latency", "p50_ms"), True),
    ("  ratio B/A (target: unchanged)", ("result", "wake_p50_ratio_B_over_A"), None),
    ("member wake-up p90, A (ms)", ("A", "wakeup", "latency", "p90_ms"), True),
    ("member wake-up p90, B (ms)", ("B", "wakeup", "latency", "p90_ms"), True),
    ("send p50, A (ms)", ("A", "throughput", "send_latency", "p50_ms"), True),
    ("send p50, B (ms)", ("B", "throughput", "send_latency", "p50_ms"), True),
    ("msgs/s, A", ("A", "throughput", "msgs_per_s"), False),
    ("msgs/s, B", ("B", "throughput", "msgs_per_s"), False),
    ("bystander polls returned during B", ("B", "bystander_returns"), None),
    ("  of which with data", ("B", "bystander_returns_with_data"), None),
    ("bystander poll errors during B", ("B", "bystander_errors"), None),
    ("returned while parking (before B)", ("park", "returns_while_parking"), None),
    ("all parked (Hearth: in-flight gauge)", ("park", "all_parked"), None),
    ("server CPU to park N polls (s)", ("park", "server_cpu_to_park_s"), True),
    ("VmRSS at start (MiB)", ("server_start", "VmRSS"), True),
    ("VmRSS after setup (MiB)", ("server_after_setup", "VmRSS"), True),
    ("VmRSS after A (MiB)", ("server_after_A", "VmRSS"), True),
    ("VmRSS with N parked (MiB)", ("server_parked", "VmRSS"), True),
    ("VmRSS after B (MiB)", ("server_after_B", "VmRSS"), True),
    ("other CPU on machine, A (s, ~)", ("A", "throughput", "other_cpu_s"), None),
    ("other CPU on machine, B (s, ~)", ("B", "throughput", "other_cpu_s"), None),
    ("setup: register N+2 (s)", ("setup", "register_s"), True),
    ("wakeups.py run (s)", ("total_s",), None),
]
w = 40
print(f"{'measurement':<{w}} {'Hearth':>10} {'Synapse':>10}  Hearth vs Synapse")
for name, path, lb in rows:
    h, s = g(H, *path), g(S, *path)
    ratio = "-" if lb is None else vs(h, s, lb)
    print(f"{name:<{w}} {fmt(h):>10} {fmt(s):>10}  {ratio}")
for srv, r in R.items():
    x = r["result"]
    print(f"\n{srv}: CPU B/A {x['cpu_ratio_B_over_A']}x ({'within' if x['cpu_within_1_5x'] else 'NOT within'} 1.5x); "
          f"wake-up p50 B/A {x['wake_p50_ratio_B_over_A']}x; bystander returns in B {x['bystander_returns_B']}")
    print(f"  {srv} bystander returns with data, by section: while parking {r['park'].get('return_sections_while_parking')}, "
          f"B messages {r['B']['throughput'].get('bystander_return_sections')}, B wake-ups {r['B']['wakeup'].get('bystander_return_sections')}")
EOF
tail -1 "$OUT/env.txt" >&2
log "done in $(( $(date +%s) - T_START )) s; results in $OUT"
