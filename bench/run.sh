#!/usr/bin/env bash
# bench/run.sh — reproduce every figure in BENCHMARKS.md: Hearth and Synapse side by side.
#
#   bench/run.sh                 everything (~5 min on 2 cores); results in $BENCH_OUT (summary.txt)
#   BENCH_SKIP_SYNAPSE=1 bench/run.sh     Hearth only
#
# Phases (each server fresh, i.e. a new data dir, one after the other):
#   1. start-up: bench/startup.sh (5 timed restarts of an existing server each; exec ->
#      first 200 on /_matrix/client/versions, polled every 5 ms) + idle VmRSS 5 s after start
#   2. load: bench/load.py defaults (8 senders x 250 messages, 50 wake-ups) with --pid,
#      Hearth's /_hearth/metrics saved after each load run (group-commit batch = writes/commits),
#      two runs per server, fresh server per run, order Hearth, Synapse, Hearth, Synapse
#   3. Hearth only: wrk -t1 -c32 -d10s on GET /_matrix/client/versions (cancellable route)
#      vs GET /_hearth/health (not cancellable), alternated 3 times each, RUST_LOG=warn
#   4. abandoned long-polls: bench/abandon.py (1,000 parked /sync, then all sockets closed);
#      Hearth twice on the same server (is the memory reused?), Synapse once (--late-s 32); TcpExtListenOverflows
#      (/proc/net/netstat) counted around each round
#
# Every server started here is stopped here (Hearth: SIGTERM; Synapse: synapse-peer/stop.sh),
# also on error or Ctrl-C. Every step runs under `timeout`.
#
# Knobs: HEARTH_BIN (default target/release/hearth; copied into $BENCH_OUT first so a rebuild
# during the run cannot change it), BENCH_OUT (/tmp/hearth-bench), HEARTH_PORT (8590),
# SYNAPSE_PORT (8591), SYNAPSE_NAME (hbench, a synapse-peer instance; it is wiped),
# SYNPEER_DIR (/work/shared/synapse-peer), SYNPEER_HOME (/tmp/synpeer, its venv is reused),
# PY (/tmp/hearth-pyvenv/bin/python; bench/setup.sh creates it), WRK_SECONDS (10).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OUT=${BENCH_OUT:-/tmp/hearth-bench}
HPORT=${HEARTH_PORT:-8590}
SPORT=${SYNAPSE_PORT:-8591}
SNAME=${SYNAPSE_NAME:-hbench}
SYNPEER_DIR=${SYNPEER_DIR:-/work/shared/synapse-peer}
export SYNPEER_HOME=${SYNPEER_HOME:-/tmp/synpeer}
PY=${PY:-/tmp/hearth-pyvenv/bin/python}
WRK_SECONDS=${WRK_SECONDS:-10}
SKIP_SYNAPSE=${BENCH_SKIP_SYNAPSE:-}
T_START=$(date +%s)

log() { printf '[bench %4ds] %s\n' $(( $(date +%s) - T_START )) "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ -x "$PY" ] || "$HERE/setup.sh" >/dev/null
command -v wrk >/dev/null || die "wrk not found (apt-get install -y wrk)"
command -v curl >/dev/null || die "curl not found"
[ -x /usr/bin/time ] || die "/usr/bin/time not found (apt-get install -y time)"
command -v bc >/dev/null || die "bc not found (apt-get install -y bc)"

rm -rf "$OUT"; mkdir -p "$OUT/logs" "$OUT/data"
BIN=$OUT/hearth
cp "${HEARTH_BIN:-$REPO/target/release/hearth}" "$BIN"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # 1,000 long-polls need fds (servers inherit it)

# ------------------------------------------------------------------ servers ----
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

# hearth_start TAG: a fresh Hearth (new data dir) on $HPORT, log in logs/hearth-TAG.log
hearth_start() {
    local dir=$OUT/data/hearth-$1
    rm -rf "$dir"; mkdir -p "$dir"
    "$BIN" --database "$dir/hearth.db" --listen "127.0.0.1:$HPORT" \
        --server-name "127.0.0.1:$HPORT" --no-rate-limit >"$OUT/logs/hearth-$1.log" 2>&1 &
    HPID=$!
    for _ in $(seq 1 600); do
        curl -sf -o /dev/null "http://127.0.0.1:$HPORT/_matrix/client/versions" && return 0
        kill -0 "$HPID" 2>/dev/null || die "hearth exited during start-up (logs/hearth-$1.log)"
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
# synapse_start: a fresh Synapse (SYNPEER_RESET=1) on $SPORT; SPID is its python process
synapse_start() {
    SYN_UP=1
    SYNPEER_RESET=1 timeout 180 "$SYNPEER_DIR/start.sh" "$SNAME" "$SPORT" >/dev/null 2>"$OUT/logs/synapse-start.err" \
        || { cat "$OUT/logs/synapse-start.err" >&2; die "synapse did not start"; }
    SPID=$(cat "$SYNPEER_HOME/$SNAME/synapse.pid")
}
# synapse_stop TAG: stop.sh, then keep its logs as logs/synapse-TAG.*.log
synapse_stop() {
    "$SYNPEER_DIR/stop.sh" "$SNAME" 2>/dev/null || true
    SYN_UP=""
    cp "$SYNPEER_HOME/$SNAME/homeserver.log" "$OUT/logs/synapse-$1.homeserver.log" 2>/dev/null || true
    cp "$SYNPEER_HOME/$SNAME/stdout.log" "$OUT/logs/synapse-$1.stdout.log" 2>/dev/null || true
}

listen_overflows() { awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "ListenOverflows") c = i; h = 1 } else print $c }' /proc/net/netstat; }
proc_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }   # utime+stime
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }  # all non-idle

# ------------------------------------------------------------------ context ----
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "kernel: $(uname -sr)"
    echo "memory: $(free -m | awk '/Mem:/ {print $2" MiB"}')"
    echo "hearth: $("$BIN" --version) sha256 $(sha256sum "$BIN" | cut -c1-16) (binary built $(date -u -r "${HEARTH_BIN:-$REPO/target/release/hearth}" '+%Y-%m-%d %H:%M UTC'); repo HEAD now $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
    [ -n "$SKIP_SYNAPSE" ] || echo "synapse: $("$SYNPEER_HOME/venv/bin/python" -c 'import synapse; print(synapse.__version__)') ($("$SYNPEER_HOME/venv/bin/python" --version))"
    echo "load generator: $("$PY" --version), aiohttp $("$PY" -c 'import aiohttp; print(aiohttp.__version__)')"
    echo "wrk: $(wrk --version 2>&1 | head -1 | awk '{print $1, $2}')"
    echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/env.txt"
cat "$OUT/env.txt" >&2

# --------------------------------------------------------- 1. start-up + idle ----
log "1. start-up: Hearth (5 restarts)"
HEARTH_BIN=$BIN PY=$PY timeout 120 "$HERE/startup.sh" hearth "$OUT/data/hearth-startup" "$HPORT" 5 \
    >"$OUT/startup-hearth.json" 2>"$OUT/logs/startup-hearth.err" || { cat "$OUT/logs/startup-hearth.err" >&2; die "startup.sh hearth"; }
cp "$OUT/data/hearth-startup/hearth.log" "$OUT/logs/hearth-startup.log"
if [ -z "$SKIP_SYNAPSE" ]; then
    log "1. start-up: Synapse (fresh instance, then 5 restarts)"
    SYN_UP=1
    PY=$PY timeout 240 "$HERE/startup.sh" synapse "$SNAME" "$SPORT" 5 \
        >"$OUT/startup-synapse.json" 2>"$OUT/logs/startup-synapse.err" || { cat "$OUT/logs/startup-synapse.err" >&2; die "startup.sh synapse"; }
    synapse_stop startup
fi

# ---------------------------------------------------------------------- 2. load ----
for run in 1 2; do
    log "2. load run $run: Hearth"
    hearth_start "load$run"
    b0=$(busy_ticks); t0=$(date +%s.%N)
    timeout 300 "$PY" "$HERE/load.py" --url "http://127.0.0.1:$HPORT" --pid "$HPID" \
        >"$OUT/load-hearth-$run.json" 2>"$OUT/logs/load-hearth-$run.err" || { cat "$OUT/logs/load-hearth-$run.err" >&2; die "load.py hearth"; }
    echo "busy_ticks $(( $(busy_ticks) - b0 )) clk_tck $(getconf CLK_TCK) wall_s $(echo "$(date +%s.%N) - $t0" | bc)" > "$OUT/load-hearth-$run.busy"
    tail -1 "$OUT/logs/load-hearth-$run.err" >&2
    curl -s "http://127.0.0.1:$HPORT/_hearth/metrics" > "$OUT/load-hearth-$run.metrics" || true
    du -sk "$OUT/data/hearth-load$run" | awk '{print $1}' > "$OUT/load-hearth-$run.db_kib"
    hearth_stop
    [ -n "$SKIP_SYNAPSE" ] && continue
    log "2. load run $run: Synapse"
    synapse_start
    b0=$(busy_ticks); t0=$(date +%s.%N)
    timeout 420 "$PY" "$HERE/load.py" --url "https://127.0.0.1:$SPORT" --insecure --pid "$SPID" \
        >"$OUT/load-synapse-$run.json" 2>"$OUT/logs/load-synapse-$run.err" || { cat "$OUT/logs/load-synapse-$run.err" >&2; die "load.py synapse"; }
    echo "busy_ticks $(( $(busy_ticks) - b0 )) clk_tck $(getconf CLK_TCK) wall_s $(echo "$(date +%s.%N) - $t0" | bc)" > "$OUT/load-synapse-$run.busy"
    tail -1 "$OUT/logs/load-synapse-$run.err" >&2
    du -k "$SYNPEER_HOME/$SNAME/homeserver.db" | awk '{print $1}' > "$OUT/load-synapse-$run.db_kib"
    synapse_stop "load$run"
done

# -------------------------------------------------- 3. cancellable-route cost ----
log "3. wrk: /_matrix/client/versions (cancellable) vs /_hearth/health, ${WRK_SECONDS}s each, x3"
RUST_LOG=warn hearth_start wrk
for i in 1 2 3; do
    for route in versions health; do
        case $route in
            versions) path=/_matrix/client/versions ;;
            health) path=/_hearth/health ;;
        esac
        # CPU accounting around each run: Hearth's utime+stime, wrk's (GNU time), and the
        # whole machine's busy time (/proc/stat), so interference from other processes shows.
        h0=$(proc_ticks "$HPID"); b0=$(busy_ticks)
        timeout $(( WRK_SECONDS + 30 )) /usr/bin/time -f 'wrk_cpu_s %U %S' -o "$OUT/wrk-$route-$i.cpu" \
            wrk -t1 -c32 -d"${WRK_SECONDS}s" --latency "http://127.0.0.1:$HPORT$path" \
            > "$OUT/wrk-$route-$i.txt" 2>&1 || die "wrk failed"
        h1=$(proc_ticks "$HPID"); b1=$(busy_ticks)
        echo "hearth_ticks $((h1 - h0)) busy_ticks $((b1 - b0)) clk_tck $(getconf CLK_TCK)" >> "$OUT/wrk-$route-$i.cpu"
        log "   $route #$i: $(awk '/Requests\/sec/ {print $2}' "$OUT/wrk-$route-$i.txt") req/s"
    done
done
curl -s "http://127.0.0.1:$HPORT/_hearth/metrics" > "$OUT/wrk-metrics.txt"
hearth_stop

# -------------------------------------------------- 4. abandoned long-polls ----
log "4. abandon: Hearth, 1,000 parked /sync then closed (two rounds, same server)"
hearth_start abandon
for round in 1 2; do
    o0=$(listen_overflows)
    timeout 150 "$PY" "$HERE/abandon.py" --url "http://127.0.0.1:$HPORT" --pid "$HPID" \
        >"$OUT/abandon-hearth-$round.json" 2>"$OUT/logs/abandon-hearth-$round.err" || { cat "$OUT/logs/abandon-hearth-$round.err" >&2; die "abandon.py hearth"; }
    tail -1 "$OUT/logs/abandon-hearth-$round.err" >&2
    echo "listen_overflows $(( $(listen_overflows) - o0 ))" > "$OUT/abandon-hearth-$round.overflows"
done
hearth_stop
if [ -z "$SKIP_SYNAPSE" ]; then
    log "4. abandon: Synapse, 1,000 parked /sync then closed (RSS also 32 s after the close)"
    synapse_start
    o0=$(listen_overflows)
    timeout 240 "$PY" "$HERE/abandon.py" --url "https://127.0.0.1:$SPORT" --insecure --pid "$SPID" --late-s 32 \
        >"$OUT/abandon-synapse.json" 2>"$OUT/logs/abandon-synapse.err" || { cat "$OUT/logs/abandon-synapse.err" >&2; die "abandon.py synapse"; }
    tail -1 "$OUT/logs/abandon-synapse.err" >&2
    echo "listen_overflows $(( $(listen_overflows) - o0 ))" > "$OUT/abandon-synapse.overflows"
    synapse_stop abandon
fi
echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/env.txt"

# ------------------------------------------------------------------- summary ----
"$PY" - "$OUT" "$SKIP_SYNAPSE" <<'EOF' | tee "$OUT/summary.txt"
import glob, json, os, re, statistics, sys

out, skip_syn = sys.argv[1], bool(sys.argv[2])
J = lambda name: json.load(open(os.path.join(out, name)))
def ratio(h, s, higher_better):
    if h is None or s is None or h == 0 or s == 0:
        return "-"
    r = h / s if higher_better else s / h
    return f"{r:.1f}x better" if r >= 1 else f"{1/r:.1f}x worse"
rows = []
def row(name, h, s, higher_better, fmt="{:g}"):
    f = lambda v: "-" if v is None else fmt.format(v)
    rows.append((name, f(h), f(s), ratio(h, s, higher_better) if not skip_syn else "-"))

sh = J("startup-hearth.json"); ss = None if skip_syn else J("startup-synapse.json")
row("start-up, median of 5 restarts (ms)", sh["startup_ms_median"], ss and ss["startup_ms_median"], False)
row("idle VmRSS 5 s after start, median (MiB)", sh["idle_rss_mib_median"], ss and ss["idle_rss_mib_median"], False)
for run in (1, 2):
    h = J(f"load-hearth-{run}.json"); s = None if skip_syn else J(f"load-synapse-{run}.json")
    g = lambda d, *k: None if d is None else __import__("functools").reduce(lambda a, b: a[b], k, d)
    row(f"load #{run}: msgs/s (8 x 250)", g(h, "send", "msgs_per_s"), g(s, "send", "msgs_per_s"), True)
    row(f"load #{run}: send p50 (ms)", g(h, "send", "latency", "p50_ms"), g(s, "send", "latency", "p50_ms"), False)
    row(f"load #{run}: send p99 (ms)", g(h, "send", "latency", "p99_ms"), g(s, "send", "latency", "p99_ms"), False)
    row(f"load #{run}: server CPU per msg (ms)", g(h, "send", "server_cpu_ms_per_msg"), g(s, "send", "server_cpu_ms_per_msg"), False)
    row(f"load #{run}: wake-up p50 (ms)", g(h, "wakeup", "latency", "p50_ms"), g(s, "wakeup", "latency", "p50_ms"), False)
    row(f"load #{run}: wake-up p99 (ms)", g(h, "wakeup", "latency", "p99_ms"), g(s, "wakeup", "latency", "p99_ms"), False)
    row(f"load #{run}: VmRSS before (MiB)", g(h, "server_before", "VmRSS"), g(s, "server_before", "VmRSS"), False)
    row(f"load #{run}: VmRSS after (MiB)", g(h, "server_after", "VmRSS"), g(s, "server_after", "VmRSS"), False)
    row(f"load #{run}: VmHWM after (MiB)", g(h, "server_after", "VmHWM"), g(s, "server_after", "VmHWM"), False)
    row(f"load #{run}: load.py CPU, send phase (s)", g(h, "send", "loadgen_cpu_s"), g(s, "send", "loadgen_cpu_s"), False)
    row(f"load #{run}: load.py CPU, whole run (s)", g(h, "loadgen_cpu_s"), g(s, "loadgen_cpu_s"), False)
    dbh = int(open(os.path.join(out, f"load-hearth-{run}.db_kib")).read())
    dbs = None if skip_syn else int(open(os.path.join(out, f"load-synapse-{run}.db_kib")).read())
    row(f"load #{run}: database on disk (MiB)", round(dbh / 1024, 1), dbs and round(dbs / 1024, 1), False)
    mp = os.path.join(out, f"load-hearth-{run}.metrics")
    mt = dict(re.findall(r"^(hearth_db_(?:writes|commits)_total) ([\d.e+]+)$", open(mp).read(), re.M)) if os.path.exists(mp) else {}
    if len(mt) == 2 and float(mt["hearth_db_commits_total"]) > 0:
        w_, c_ = float(mt["hearth_db_writes_total"]), float(mt["hearth_db_commits_total"])
        rows.append((f"load #{run}: writes/commits (group-commit batch)", f"{w_ / c_:.2f}", "-",
                     f"({w_:g} writes / {c_:g} commits, whole run incl. setup and wake-ups)"))
    row(f"load #{run}: 429s seen", g(h, "ratelimited_429s"), g(s, "ratelimited_429s"), False)
    def other(srv, d):  # machine busy time not spent by the server or load.py during the run
        if d is None:
            return None
        bt, tck, wall = re.search(r"busy_ticks (\d+) clk_tck (\d+) wall_s ([\d.]+)",
                                  open(os.path.join(out, f"load-{srv}-{run}.busy")).read()).groups()
        srv_cpu = d["server_after"]["cpu_s"] - d["server_before"]["cpu_s"]
        return round(max(0.0, int(bt) / int(tck) - srv_cpu - d["loadgen_cpu_s"]), 2)
    rows.append((f"load #{run}: other CPU on machine (s, ~)", str(other("hearth", h)),
                 "-" if s is None else str(other("synapse", s)), "(interference check; includes load.py start-up)"))

ah = [J(f"abandon-hearth-{r}.json") for r in (1, 2)]
asn = None if skip_syn else J("abandon-synapse.json")
row("abandon: VmRSS before (MiB)", ah[0]["rss_before_mib"], asn and asn["rss_before_mib"], False)
row("abandon: VmRSS with 1,000 parked (MiB)", ah[0]["rss_with_mib"], asn and asn["rss_with_mib"], False)
row("abandon: VmRSS 1 s after close (MiB)", ah[0]["rss_after_1s_mib"], asn and asn["rss_after_1s_mib"], False)
row("abandon: growth per parked poll (KiB)", ah[0]["kib_per_parked_poll"], asn and asn["kib_per_parked_poll"], False)

w = 42
print(f"\n{'measurement':<{w}} {'Hearth':>10} {'Synapse':>10}  Hearth vs Synapse")
for r in rows:
    print(f"{r[0]:<{w}} {r[1]:>10} {r[2]:>10}  {r[3]}")

print("\nHearth start-up runs (ms):", [r["startup_ms"] for r in sh["runs"]],
      " last refused poll sent at (ms):", [r["last_failed_poll_sent_ms"] for r in sh["runs"]])
if ss:
    print("Synapse start-up runs (ms):", [r["startup_ms"] for r in ss["runs"]])

ready = [float(m) for m in re.findall(r"ready as \S+ in ([\d.]+)ms", open(os.path.join(out, "logs", "hearth-startup.log")).read())]
print("Hearth's own 'ready in' log line (ms; first = the priming start that creates the schema):", [round(x, 1) for x in ready])

# wrk
rps, cpu_us, p50 = {}, {}, {}
print()
for route in ("versions", "health"):
    rps[route], cpu_us[route], p50[route] = [], [], []
    for i in (1, 2, 3):
        t = open(os.path.join(out, f"wrk-{route}-{i}.txt")).read()
        c = open(os.path.join(out, f"wrk-{route}-{i}.cpu")).read()
        r = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
        n, dur = re.search(r"(\d+) requests in ([\d.]+)s", t).groups()
        n, cap = int(n), (os.cpu_count() or 1) * float(dur)
        lat = re.search(r"^\s*50%\s+(\S+)", t, re.M).group(1)  # not the "+/- Stdev" column
        wu, ws = map(float, re.search(r"wrk_cpu_s ([\d.]+) ([\d.]+)", c).groups())
        ht, bt, tck = map(int, re.search(r"hearth_ticks (\d+) busy_ticks (\d+) clk_tck (\d+)", c).groups())
        hs, bs = ht / tck, bt / tck
        rps[route].append(r); cpu_us[route].append(hs / n * 1e6); p50[route].append(lat)
        print(f"wrk {route:8} #{i}: {r:8.0f} req/s, p50 {lat:>8}, Hearth CPU {hs:5.2f} s ({hs / n * 1e6:5.1f} us/req), "
              f"wrk CPU {wu + ws:5.2f} s, other processes ~{max(0.0, bs - hs - wu - ws):4.2f} s, machine busy {bs:5.2f} of {cap:.0f} core-s")
        if "Non-2xx" in t or "Socket errors" in t:
            print(f"   wrk {route} #{i}:", " ".join(l.strip() for l in t.splitlines() if "Non-2xx" in l or "Socket" in l))
mv, mh = statistics.median(rps["versions"]), statistics.median(rps["health"])
cv, ch = statistics.median(cpu_us["versions"]), statistics.median(cpu_us["health"])
print(f"wrk -t1 -c32: /versions (cancellable) median {mv:.0f} req/s, {cv:.1f} us Hearth CPU/req")
print(f"wrk -t1 -c32: /_hearth/health         median {mh:.0f} req/s, {ch:.1f} us Hearth CPU/req")
print(f"ratio versions/health: throughput {mv / mh:.3f}, CPU per request {cv / ch:.3f}")

def ovf(name):
    p = os.path.join(out, name)
    return open(p).read().split()[1] if os.path.exists(p) else "?"
for r, a in enumerate(ah, 1):
    print(f"\nHearth abandon round {r}: opened {a['opened']} in {a.get('open_s')} s "
          f"(TcpExtListenOverflows +{ovf(f'abandon-hearth-{r}.overflows')}), in-flight parked {a.get('in_flight_parked')} "
          f"(all parked: {a['all_parked']}), RSS {a['rss_before_mib']} -> {a['rss_with_mib']} -> {a['rss_after_1s_mib']} MiB, "
          f"gauge back to idle {a.get('gauge_idle_after_last_close_ms')} ms after the last close "
          f"({a.get('gauge_idle_after_first_close_ms')} ms after the first), "
          f"cancelled_total {a['metrics_after']['hearth_http_requests_cancelled_total']:g}, "
          f"tasks_live {a['metrics_with']['hearth_tasks_live']:g} -> {a['metrics_after']['hearth_tasks_live']:g}")
if asn:
    print(f"Synapse abandon: opened {asn['opened']} in {asn.get('open_s')} s "
          f"(TcpExtListenOverflows +{ovf('abandon-synapse.overflows')}), RSS {asn['rss_before_mib']} -> {asn['rss_with_mib']} -> "
          f"{asn['rss_after_1s_mib']} MiB (1 s), {asn.get('rss_late_mib')} MiB ({asn.get('late_s')} s after the close)")
    lg = os.path.join(out, "logs", "synapse-abandon.homeserver.log")
    if os.path.exists(lg):
        quick = slow = 0
        for line in open(lg, errors="replace"):
            m = re.search(r"Processed request: ([\d.]+)sec.* 499! \"GET /_matrix/client/v3/sync\?since", line)
            if m:
                if float(m.group(1)) < 25: quick += 1
                else: slow += 1
        print(f"Synapse log: {quick} abandoned /sync ended (499) within 25 s, {slow} ran to their 30 s timeout")

# errors in server logs
print()
for f in sorted(glob.glob(os.path.join(out, "logs", "*.log"))):
    n_err = 0
    kinds = {}
    for line in open(f, errors="replace"):
        if re.search(r"\bERROR\b|Traceback|panicked", line):
            n_err += 1
        if re.search(r"\b(ERROR|WARN|WARNING)\b|Traceback|panicked", line):
            # Synapse: "date - logger - lineno - LEVEL - request - message"; Hearth: "[date LEVEL target] message"
            parts = line.split(" - ")
            key = " - ".join(parts[1:2] + parts[5:6])[:70] if len(parts) > 5 else re.sub(r"^\[[^]]*\] ", "", line)[:70]
            key = re.sub(r"\d+", "N", key.strip())
            kinds[key] = kinds.get(key, 0) + 1
    top = "; ".join(f"{v}x {k}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:4])
    print(f"log {os.path.basename(f)}: {n_err} error lines, {sum(kinds.values())} error+warning lines{': ' + top if top else ''}")
EOF
cat "$OUT/env.txt" | tail -1 >&2
log "done in $(( $(date +%s) - T_START )) s; results in $OUT"
