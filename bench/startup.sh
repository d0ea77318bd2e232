#!/usr/bin/env bash
# startup.sh hearth  DIR  PORT [RUNS]     time Hearth restarts (database DIR/hearth.db)
# startup.sh synapse NAME PORT [RUNS]     time Synapse restarts (synapse-peer instance NAME)
#
# Start-up time = from just before the fork/exec of the server process to the first
# 200 on GET /_matrix/client/versions, polled every 5 ms (a fresh connection per poll;
# so the figure is rounded up by at most ~5 ms). What is timed is a RESTART of an existing
# server: the script first creates a fresh server (new data dir: Hearth creates its schema,
# Synapse gets its config, keys and schema from synapse-peer/start.sh with SYNPEER_RESET=1),
# stops it, then times RUNS (default 5) restarts of the bare server process.
# IDLE_S seconds (default 5) after each start it reads VmRSS/VmHWM/threads from
# /proc/PID/status, then stops the server (Hearth: SIGTERM; Synapse: synapse-peer/stop.sh)
# and times the stop. Prints one JSON document on stdout; each run also records when the
# last refused poll was sent (readiness lies between that and startup_ms).
#
#   HEARTH_BIN   Hearth binary (default: target/release/hearth of this repo)
#   SYNPEER_DIR  synapse-peer scripts (default /work/shared/synapse-peer)
#   SYNPEER_HOME synapse-peer base dir (default /tmp/synpeer; its venv is reused)
#   IDLE_S       seconds between readiness and the RSS reading (default 5)
#   PY           python interpreter for the timer (default python3)
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,3p' "$0" >&2; exit 2; }
KIND=$1 WHERE=$2 PORT=$3 RUNS=${4:-5}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HEARTH_BIN=${HEARTH_BIN:-$HERE/../target/release/hearth}
SYNPEER_DIR=${SYNPEER_DIR:-/work/shared/synapse-peer}
export SYNPEER_HOME=${SYNPEER_HOME:-/tmp/synpeer}
IDLE_S=${IDLE_S:-5}
PY=${PY:-python3}

case $KIND in
hearth)
    DIR=$WHERE
    rm -rf "$DIR"; mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    CMD=("$HEARTH_BIN" --database "$DIR/hearth.db" --listen "127.0.0.1:$PORT"
         --server-name "127.0.0.1:$PORT" --no-rate-limit)
    URL="http://127.0.0.1:$PORT"
    CWD=$DIR LOG=$DIR/hearth.log PIDFILE="" STOP=""
    # Prime: the first start creates the database; it is not timed as a restart.
    ;;
synapse)
    NAME=$WHERE
    INST=$SYNPEER_HOME/$NAME
    # Prime: a fresh instance (config, keys, TLS cert, schema), then stop it.
    SYNPEER_RESET=1 "$SYNPEER_DIR/start.sh" "$NAME" "$PORT" >/dev/null
    "$SYNPEER_DIR/stop.sh" "$NAME" 2>/dev/null
    # The exact command start.sh runs (no extra -c files here).
    CMD=("$SYNPEER_HOME/venv/bin/python" -m synapse.app.homeserver -c "$INST/homeserver.yaml")
    URL="https://127.0.0.1:$PORT"
    CWD=$INST LOG=$INST/stdout.log PIDFILE=$INST/synapse.pid STOP="$SYNPEER_DIR/stop.sh $NAME"
    ;;
*) echo "unknown server kind: $KIND" >&2; exit 2 ;;
esac

"$PY" - "$KIND" "$URL" "$RUNS" "$IDLE_S" "$CWD" "$LOG" "$PIDFILE" "$STOP" "${CMD[@]}" <<'EOF'
import http.client, json, os, signal, ssl, statistics, subprocess, sys, time

kind, url, runs, idle_s, cwd, logpath, pidfile, stop = sys.argv[1:9]
cmd = sys.argv[9:]
runs, idle_s = int(runs), float(idle_s)
tls = url.startswith("https://")
host, port = url.split("//")[1].split(":")
port = int(port)
ctx = None
if tls:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

def versions_ok():
    c = (http.client.HTTPSConnection(host, port, timeout=2, context=ctx) if tls
         else http.client.HTTPConnection(host, port, timeout=2))
    try:
        c.request("GET", "/_matrix/client/versions")
        return c.getresponse().status == 200
    except OSError:
        return False
    finally:
        c.close()

def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k + "_mib"] = round(int(v.split()[0]) / 1024, 1)
            elif k == "Threads":
                out["threads"] = int(v)
    return out

def start():
    log = open(logpath, "ab")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    if pidfile:  # so that synapse-peer/stop.sh can stop it
        with open(pidfile, "w") as f:
            f.write(f"{p.pid}\n")
    polls, last_fail = 0, None
    deadline = t0 + 120
    while True:
        polls += 1
        t_poll = time.perf_counter()
        if versions_ok():
            return p, (time.perf_counter() - t0) * 1000, polls, last_fail
        last_fail = (t_poll - t0) * 1000  # readiness came after this poll was sent
        if p.poll() is not None:
            sys.exit(f"startup.sh: {kind} exited with {p.returncode} during start-up; see {logpath}")
        if time.perf_counter() > deadline:
            p.kill()
            sys.exit(f"startup.sh: {kind} not ready after 120 s; see {logpath}")
        time.sleep(0.005)

def stop_(p):
    t0 = time.perf_counter()
    # stop.sh polls `kill -0`, which a zombie passes: reap the child while stop.sh runs.
    stopper = subprocess.Popen(stop.split(), stderr=subprocess.DEVNULL) if stop else None
    if not stopper:
        p.send_signal(signal.SIGTERM)
    try:
        rc = p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = p.wait()
    ms = (time.perf_counter() - t0) * 1000
    if stopper:
        stopper.wait(timeout=30)
    return rc, ms

out = {"server": kind, "url": url, "command": cmd, "idle_s": idle_s, "runs": []}
if kind == "hearth":  # prime: create the database
    p, ms, _, _ = start()
    rc, _ = stop_(p)
    out["prime_start_ms"] = round(ms, 1)
for i in range(runs):
    p, ms, polls, last_fail = start()
    time.sleep(idle_s)
    st = status(p.pid)
    rc, stop_ms = stop_(p)
    out["runs"].append({"startup_ms": round(ms, 1), "polls": polls,
                        "last_failed_poll_sent_ms": None if last_fail is None else round(last_fail, 1),
                        **st,
                        "stop_ms": round(stop_ms, 1), "exit_code": rc})
    print(f"[startup] {kind} run {i+1}: ready in {ms:.1f} ms, VmRSS {st['VmRSS_mib']} MiB "
          f"after {idle_s:g} s, stop {stop_ms:.0f} ms (exit {rc})", file=sys.stderr)
s = [r["startup_ms"] for r in out["runs"]]
r = [r["VmRSS_mib"] for r in out["runs"]]
out["startup_ms_median"] = round(statistics.median(s), 1)
out["startup_ms_min"], out["startup_ms_max"] = min(s), max(s)
out["idle_rss_mib_median"] = round(statistics.median(r), 1)
json.dump(out, sys.stdout, indent=2)
print()
EOF
