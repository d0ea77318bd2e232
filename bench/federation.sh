#!/usr/bin/env bash
# bench/federation.sh — issue 9: federation, Hearth vs Synapse side by side in one run.
#
#   bench/federation.sh                  ~3 min on 2 cores with the defaults (busy machine)
#   FED_REPEATS=2 bench/federation.sh    every throughput pair twice
#
# Starts four servers on loopback TLS, IP-literal server names (127.0.0.1:PORT), fresh data:
#   H   Hearth, receiver                      :$HEARTH_PORT  (8662)
#   O   Hearth, origin of the throughput part :$ORIGIN_PORT  (8663)
#   S1  Synapse 1.163 (synapse-peer), origin  :$S1_PORT      (8664)
#   S2  Synapse 1.163 (synapse-peer), receiver:$S2_PORT      (8665)
# and runs bench/federation.py against them:
#   1. send -> remote /sync latency: an S1 user sends into a room joined by an H user and an
#      S2 user, each with a parked /sync; FED_W rounds; p50/p90 per receiver.
#   2. inbound /send throughput: per pair O->H, O->S2 (FED_N, then FED_SMALL_N messages),
#      S1->H, S1->S2 (FED_S1_N), a fresh room each, the receiver is frozen (SIGSTOP) while the
#      origin's user sends the messages + a marker, then resumed; PDUs/s and receiver CPU per
#      PDU until the receiver's user's /sync returns the marker. Synapse prunes its staging
#      queue at 100 waiting PDUs: only the 90-PDU drains make it process every PDU.
# Results: $FED_OUT/federation.json, summary.txt (printed at the end), env.txt, logs/.
#
# Every server started here is stopped here (resumed first if frozen), also on error or
# Ctrl-C. Every step runs under `timeout`.
#
# Knobs (environment): FED_W (30), FED_N (1000), FED_SMALL_N (90), FED_S1_N (90), FED_SENDERS (8),
#   FED_REPEATS (1), FED_PARK_MS (100), FED_SETTLE_S (1.0) -> bench/federation.py;
#   FED_TIMEOUT (600) seconds allowed for federation.py;
#   HEARTH_BIN (target/release/hearth; copied into $FED_OUT first), FED_OUT (/tmp/hearth-fed),
#   HEARTH_PORT, ORIGIN_PORT, S1_PORT, S2_PORT, S1_NAME (hfed1), S2_NAME (hfed2: synapse-peer
#   instances, wiped), SYNPEER_DIR (/work/shared/synapse-peer), SYNPEER_HOME (/tmp/synpeer),
#   PY (/tmp/hearth-pyvenv/bin/python; bench/setup.sh creates it)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OUT=${FED_OUT:-/tmp/hearth-fed}
HPORT=${HEARTH_PORT:-8662}
OPORT=${ORIGIN_PORT:-8663}
S1PORT=${S1_PORT:-8664}
S2PORT=${S2_PORT:-8665}
S1NAME=${S1_NAME:-hfed1}
S2NAME=${S2_NAME:-hfed2}
SYNPEER_DIR=${SYNPEER_DIR:-/work/shared/synapse-peer}
export SYNPEER_HOME=${SYNPEER_HOME:-/tmp/synpeer}
PY=${PY:-/tmp/hearth-pyvenv/bin/python}
FED_TIMEOUT=${FED_TIMEOUT:-600}
SRC_BIN=${HEARTH_BIN:-$REPO/target/release/hearth}
T_START=$(date +%s)

log() { printf '[federation.sh %4ds] %s\n' $(( $(date +%s) - T_START )) "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ -x "$PY" ] || timeout 600 "$HERE/setup.sh" >/dev/null
command -v curl >/dev/null || die "curl not found"
command -v openssl >/dev/null || die "openssl not found"
[ -x "$SRC_BIN" ] || die "no Hearth binary at $SRC_BIN (cargo build --release --locked, or HEARTH_BIN=...)"

rm -rf "$OUT"; mkdir -p "$OUT/logs" "$OUT/data"
BIN=$OUT/hearth
cp "$SRC_BIN" "$BIN"

# ------------------------------------------------------------------ servers ----
declare -A HPIDS=()   # Hearth label -> pid
SYN_UP=()             # synapse-peer instances started
SYN_STARTING=()       # name:pid of start.sh runs not yet waited for
stop_pid() {          # resume (it may be frozen), SIGTERM, SIGKILL after 15 s
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    log "pid $pid ignored SIGTERM for 15 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true
}
synapse_stop() {
    local name=$1
    [ -f "$SYNPEER_HOME/$name/synapse.pid" ] && kill -CONT "$(cat "$SYNPEER_HOME/$name/synapse.pid")" 2>/dev/null || true
    timeout 60 "$SYNPEER_DIR/stop.sh" "$name" >/dev/null 2>&1 || true
    cp "$SYNPEER_HOME/$name/homeserver.log" "$OUT/logs/$name.homeserver.log" 2>/dev/null || true
    cp "$SYNPEER_HOME/$name/stdout.log" "$OUT/logs/$name.stdout.log" 2>/dev/null || true
}
cleanup() {
    local label x
    for x in "${SYN_STARTING[@]}"; do wait "${x#*:}" 2>/dev/null || true; done
    SYN_STARTING=()
    for label in "${!HPIDS[@]}"; do stop_pid "${HPIDS[$label]}"; done
    HPIDS=()
    for name in "${SYN_UP[@]}"; do synapse_stop "$name"; done
    SYN_UP=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

hearth_start() {   # label port
    local label=$1 port=$2 dir=$OUT/data/$1
    mkdir -p "$dir"
    timeout 30 openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
        -keyout "$dir/key.pem" -out "$dir/cert.pem" >/dev/null 2>&1 || die "openssl failed"
    "$BIN" --database "$dir/hearth.db" --listen "127.0.0.1:$port" --server-name "127.0.0.1:$port" \
        --tls-cert "$dir/cert.pem" --tls-key "$dir/key.pem" --insecure-federation-tls \
        --no-rate-limit >"$OUT/logs/hearth-$label.log" 2>&1 &
    HPIDS[$label]=$!
    for _ in $(seq 1 600); do
        curl -skf -o /dev/null --max-time 2 "https://127.0.0.1:$port/_matrix/client/versions" && return 0
        kill -0 "${HPIDS[$label]}" 2>/dev/null || die "hearth $label exited during start-up (logs/hearth-$label.log)"
        sleep 0.05
    done
    die "hearth $label not ready after 30 s"
}
synapse_start() {  # name port: in the background; synapse_wait collects it
    SYN_UP+=("$1")
    SYNPEER_RESET=1 timeout 300 "$SYNPEER_DIR/start.sh" "$1" "$2" >/dev/null 2>"$OUT/logs/$1-start.err" &
    SYN_STARTING+=("$1:$!")
}
synapse_wait() {
    local x
    for x in "${SYN_STARTING[@]}"; do
        wait "${x#*:}" || { cat "$OUT/logs/${x%%:*}-start.err" >&2; die "synapse ${x%%:*} did not start"; }
    done
    SYN_STARTING=()
}
syn_pid() { cat "$SYNPEER_HOME/$1/synapse.pid"; }

# ------------------------------------------------------------------ context ----
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "kernel: $(uname -sr)"
    echo "hearth: $("$BIN" --version) sha256 $(sha256sum "$BIN" | cut -c1-16) (binary built $(date -u -r "$SRC_BIN" '+%Y-%m-%d %H:%M UTC'); repo HEAD now $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo "synapse: $("$SYNPEER_HOME/venv/bin/python" -c 'import synapse; print(synapse.__version__)' 2>/dev/null || echo '? (venv created on first start)')"
    echo "load generator: $("$PY" --version), aiohttp $("$PY" -c 'import aiohttp; print(aiohttp.__version__)')"
    echo "knobs: FED_W=${FED_W:-30} FED_N=${FED_N:-1000} FED_SMALL_N=${FED_SMALL_N:-90} FED_S1_N=${FED_S1_N:-90} FED_SENDERS=${FED_SENDERS:-8} FED_REPEATS=${FED_REPEATS:-1}"
    echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "busiest other processes at start:"
    ps -eo pid,pcpu,etimes,comm --sort=-pcpu | head -8 | sed 's/^/  /'
} > "$OUT/env.txt"
cat "$OUT/env.txt" >&2

# ---------------------------------------------------------------------- run ----
log "starting H :$HPORT, O :$OPORT (Hearth), S1 :$S1PORT, S2 :$S2PORT (Synapse)"
hearth_start H "$HPORT"
hearth_start O "$OPORT"
synapse_start "$S1NAME" "$S1PORT"
synapse_start "$S2NAME" "$S2PORT"
synapse_wait
log "all four up"
timeout "$FED_TIMEOUT" "$PY" "$HERE/federation.py" \
    --hearth "https://127.0.0.1:$HPORT" --hearth-pid "${HPIDS[H]}" \
    --origin "https://127.0.0.1:$OPORT" --origin-pid "${HPIDS[O]}" \
    --s1 "https://127.0.0.1:$S1PORT" --s1-pid "$(syn_pid "$S1NAME")" \
    --s2 "https://127.0.0.1:$S2PORT" --s2-pid "$(syn_pid "$S2NAME")" \
    >"$OUT/federation.json" 2> >(tee "$OUT/logs/federation.err" >&2) \
    || { sleep 0.2; die "federation.py failed (logs/federation.err)"; }
for label in H O; do
    port=$HPORT; [ "$label" = O ] && port=$OPORT
    curl -sk --max-time 10 "https://127.0.0.1:$port/_hearth/metrics" > "$OUT/hearth-$label.metrics" || true
done
cleanup
echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/env.txt"
sleep 0.2   # let the tee'd stderr drain

# ------------------------------------------------------------------- summary ----
timeout 60 "$PY" - "$OUT/federation.json" "$OUT/logs/$S2NAME.homeserver.log" <<'EOF' | tee "$OUT/summary.txt"
import json, os, re, sys

r = json.load(open(sys.argv[1]))
# Synapse drops a room's staged inbound PDUs when 100 or more wait (prune_staged_events_in_room,
# keeping only the forward extremities; the rest come back by backfill when someone paginates):
# count them per room from S2's log, since they are PDUs S2 did not process in the drain.
pruned = {}
if os.path.exists(sys.argv[2]):
    for m in re.finditer(r"Pruning (\d+) events in room (\S+) from federation queue", open(sys.argv[2]).read()):
        pruned[m.group(2)] = pruned.get(m.group(2), 0) + int(m.group(1))
L = r["latency"]
def ratio(h, s):
    return "-" if not h or not s else (f"{s / h:.2f}x faster" if s >= h else f"{h / s:.2f}x slower")
print(f"\n1. S1 user's send -> remote user's parked /sync returns with it ({L['rounds']} rounds, "
      f"{L['warmup_rounds']} warm-up rounds not counted; S1 send p50 {L['s1_send_latency']['p50_ms']} ms)")
print(f"{'':24} {'Hearth H':>10} {'Synapse S2':>11}  Hearth vs Synapse")
for k in ("p50_ms", "p90_ms", "min_ms", "max_ms", "mean_ms"):
    h, s = L["H"][k], L["S2"][k]
    print(f"{k:<24} {h:>10} {s:>11}  {ratio(h, s)}")

print("\n2. inbound /send: receiver frozen while the origin sends, then resumed; time until the "
      "receiver's user sees the last PDU")
print(f"{'origin->receiver':<18} {'PDUs':>5} {'drain s':>8} {'PDUs/s':>8} {'CPU ms/PDU':>11} "
      f"{'frozen s':>9} {'origin CPU s':>12} {'other CPU s':>11} {'sync returns':>12} {'RSS MiB':>8} {'complete':>9} {'pruned':>7}")
for t in r["throughput"]:
    print(f"{t['origin'] + '->' + t['receiver']:<18} {t['pdus']:>5} {t['drain_s']:>8} {t['pdus_per_s']:>8} "
          f"{t['receiver_cpu_ms_per_pdu']:>11} {t['frozen_s']:>9} {t['origin_cpu_s']:>12} "
          f"{t['other_cpu_s']:>11} {t['receiver_sync_returns']:>12} {t['receiver_after']['VmRSS']:>8} {str(t['receiver_found']) + '/' + str(t['pdus']):>9} {pruned.get(t['room_id'], 0) if t['receiver'] == 'S2' else '-':>7}")
for t in r["throughput"]:
    if not t["receiver_has_all"]:
        print(f"WARNING: {t['origin']}->{t['receiver']}: after the marker, the receiver's /messages has only "
              f"{t['receiver_found']} of the {t['pdus']} messages (holes): its PDUs/s overstates it")
    if pruned.get(t["room_id"]) and t["receiver"] == "S2":
        print(f"NOTE: {t['origin']}->S2: Synapse pruned {pruned[t['room_id']]} of the {t['pdus']} PDUs from its "
              "staging queue (>= 100 waiting) instead of processing them; they are fetched back by backfill")
    if t["frozen_s"] > 25:
        print(f"WARNING: {t['origin']}->{t['receiver']} was frozen {t['frozen_s']} s, near the origin's "
              "federation request timeout (Hearth 30 s): a retry may be in the figure; lower FED_N/FED_S1_N")
by = {}
for t in r["throughput"]:
    by.setdefault(t["origin"], {}).setdefault(t["receiver"], []).append(t)
for o, d in by.items():
    if "H" in d and "S2" in d:
        for i, (h, s) in enumerate(zip(d["H"], d["S2"])):
            print(f"origin {o}, {h['pdus']} PDUs (#{i + 1}): PDUs/s H/S2 = {h['pdus_per_s'] / s['pdus_per_s']:.1f}x; "
                  f"CPU per PDU S2/H = {s['receiver_cpu_ms_per_pdu'] / h['receiver_cpu_ms_per_pdu']:.1f}x")
print("\nVmRSS / VmHWM at the end (MiB): " + ", ".join(
    f"{k} {v['VmRSS']}/{v['VmHWM']}" for k, v in r["end"].items()))
print("VmRSS at the start (MiB): " + ", ".join(f"{k} {v['VmRSS']}" for k, v in r["start"].items()))
print(f"429s: {r['ratelimited_429s']}; federation.py ran {r['total_s']} s")
EOF
tail -1 "$OUT/env.txt" >&2
log "done in $(( $(date +%s) - T_START )) s; results in $OUT"
