#!/usr/bin/env python3
"""Faster remote joins (issue 12): a joiner joins a room of N members held by a Hearth.

For each kind of joiner and each repeat, a FRESH resident (a copy of the database built by
tests/join_bench.rs, served by the `hearth` binary) and a FRESH joiner are started:
  hearth-partial   Hearth, `[federation] partial_joins = true` (the default)
  hearth-full      Hearth, `partial_joins = false`
  synapse-partial  Synapse 1.163 (synapse-peer); it always asks `omit_members`
  synapse-full     Synapse 1.163 against a resident with `serve_partial_joins = false`
                   (Synapse 1.163 has no switch for its faster joins: the resident decides)
A user registered on the joiner joins through the resident (`POST /join/{room}?server_name=`).
Measured:
  join_s    the client's /join request to its 200;
  resync_s  the /join request to the end of the resync. Hearth: `hearth_resync_last_duration_ms`
            on /_hearth/metrics becomes non-zero (set when the resync's last write committed);
            Synapse: its `partial_state_rooms` table is empty (read from its SQLite file;
            Synapse deletes the row in the write that un-partials the room). A full join has no
            resync: resync_s = join_s. Afterwards `/joined_members` on the joiner must list
            every member (N + owner + the joiner).
  Checked: the resident's `hearth_federation_partial_send_joins_total` is 1 for a partial kind, 0 for a
  full one (and Synapse's full join leaves no partial-state room).
  hwm_mib   the joiner's peak RSS (VmHWM of /proc/PID/status) at the end of the resync.
  cpu_s     the joiner's CPU time (user + system) from before the join to the end.
Output: JSON on stdout, one line per measurement on stderr.
"""

import argparse
import json
import os
import shutil
import sqlite3
import ssl
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[joins.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def http(method, url, body=None, token=None, timeout=600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=CTX) as r:
            raw = r.read()
            return r.status, raw
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_up(url, pid_alive, secs=60):
    deadline = time.time() + secs
    while time.time() < deadline:
        try:
            if http("GET", url + "/_matrix/client/versions", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        if not pid_alive():
            raise RuntimeError(f"{url}: the server exited during start-up")
        time.sleep(0.05)
    raise RuntimeError(f"{url} not up after {secs} s")


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB
    return None


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK_TCK


def self_signed(d):
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", f"{d}/key.pem", "-out", f"{d}/cert.pem"],
        check=True, capture_output=True, timeout=30)


class HearthProc:
    """The `hearth` binary on loopback TLS, `127.0.0.1:PORT` as its name."""

    def __init__(self, binary, d, port, db=None, toml=""):
        os.makedirs(d, exist_ok=True)
        self_signed(d)
        self.db = db or f"{d}/hearth.db"
        with open(f"{d}/hearth.toml", "w") as f:
            f.write(toml)
        self.url = f"https://127.0.0.1:{port}"
        self.name = f"127.0.0.1:{port}"
        self.logf = open(f"{d}/hearth.log", "ab")
        self.p = subprocess.Popen(
            [binary, "--config", f"{d}/hearth.toml", "--database", self.db,
             "--listen", self.name, "--server-name", self.name,
             "--tls-cert", f"{d}/cert.pem", "--tls-key", f"{d}/key.pem",
             "--no-rate-limit", "--insecure-federation-tls"],
            stdout=subprocess.DEVNULL, stderr=self.logf, env={**os.environ, "RUST_LOG": "info"})
        self.pid = self.p.pid
        wait_up(self.url, lambda: self.p.poll() is None)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.logf.close()

    def metric(self, name):
        s, raw = http("GET", self.url + "/_hearth/metrics", timeout=10)
        for line in raw.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None


class SynapseProc:
    """A fresh synapse-peer instance (wiped first)."""

    def __init__(self, peer_dir, home, port):
        self.peer_dir, self.home = peer_dir, home
        self.inst = f"joinbench{port}"
        self.url = f"https://127.0.0.1:{port}"
        self.name = f"127.0.0.1:{port}"
        subprocess.run(["bash", f"{peer_dir}/start.sh", self.inst, str(port)], check=True,
                       env={**os.environ, "SYNPEER_RESET": "1", "SYNPEER_HOME": home},
                       capture_output=True, timeout=300)
        with open(f"{home}/{self.inst}/synapse.pid") as f:
            self.pid = int(f.read().strip())

    def partial_rooms(self):
        c = sqlite3.connect(f"file:{self.home}/{self.inst}/homeserver.db?mode=ro", uri=True,
                            timeout=10)
        try:
            return c.execute("SELECT COUNT(*) FROM partial_state_rooms").fetchone()[0]
        finally:
            c.close()

    def stop(self, out_dir):
        subprocess.run(["bash", f"{self.peer_dir}/stop.sh", self.inst], capture_output=True,
                       timeout=60, env={**os.environ, "SYNPEER_HOME": self.home})
        try:
            shutil.copy(f"{self.home}/{self.inst}/homeserver.log", f"{out_dir}/{self.inst}.log")
        except OSError:
            pass
        subprocess.run(["bash", f"{self.peer_dir}/stop.sh", self.inst], capture_output=True,
                       timeout=60,
                       env={**os.environ, "SYNPEER_HOME": self.home, "SYNPEER_PURGE": "1"})


def register(url, name):
    s, raw = http("POST", url + "/_matrix/client/v3/register",
                  {"username": name, "password": f"pw-{name}-long-enough",
                   "auth": {"type": "m.login.dummy"}})
    if s != 200:
        raise RuntimeError(f"register at {url}: {s} {raw[:300]!r}")
    return json.loads(raw)["access_token"]


def measure(a, kind, run, port):
    d = f"{a.out}/{kind}-{run}"
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    # A fresh resident: the template database copied, served by the binary.
    shutil.copy(a.resident_db, f"{d}/resident.db")
    resident_toml = "[federation]\nserve_partial_joins = false\n" if kind == "synapse-full" else ""
    res = HearthProc(a.bin, f"{d}/resident", a.resident_port, db=f"{d}/resident.db",
                     toml=resident_toml)
    joiner = None
    try:
        if kind.startswith("hearth"):
            toml = "[federation]\npartial_joins = false\n" if kind == "hearth-full" else ""
            joiner = HearthProc(a.bin, f"{d}/joiner", port, toml=toml)
        else:
            joiner = SynapseProc(a.synapse_dir, a.synapse_home, port)
        token = register(joiner.url, "joiner")
        room = urllib.parse.quote(a.room, safe="")
        via = urllib.parse.quote(res.name, safe="")
        cpu0 = cpu_s(joiner.pid)
        t0 = time.monotonic()
        s, raw = http("POST", f"{joiner.url}/_matrix/client/v3/join/{room}?server_name={via}",
                      {}, token=token, timeout=a.timeout)
        join_s = time.monotonic() - t0
        if s != 200:
            raise RuntimeError(f"{kind}: join {s} {raw[:300]!r}")
        partial = kind.endswith("partial")
        # The resident answered with partial state exactly when the kind says so (Synapse's
        # full join rests on the resident's `serve_partial_joins = false`).
        partial_answers = res.metric("hearth_federation_partial_send_joins_total")
        if partial_answers != (1 if partial else 0):
            raise RuntimeError(f"{kind}: the resident gave {partial_answers} partial answers")
        if kind == "synapse-full" and joiner.partial_rooms() != 0:
            raise RuntimeError("synapse-full: Synapse holds a partial-state room after the join")
        resync_ms_metric = None
        if partial:
            deadline = t0 + a.timeout
            while True:
                if kind == "hearth-partial":
                    v = joiner.metric("hearth_resync_last_duration_ms")
                    done = bool(v)
                    resync_ms_metric = v
                else:
                    done = joiner.partial_rooms() == 0
                if done:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind}: resync not done after {a.timeout} s")
                time.sleep(0.05)
        resync_s = time.monotonic() - t0
        hwm = proc_status(joiner.pid, "VmHWM") / 1024
        cpu = cpu_s(joiner.pid) - cpu0
        s, raw = http("GET", f"{joiner.url}/_matrix/client/v3/rooms/{room}/joined_members",
                      token=token, timeout=a.timeout)
        members = len(json.loads(raw).get("joined", {})) if s == 200 else None
        r = {"kind": kind, "n": a.n, "run": run, "join_s": round(join_s, 3),
             "resync_s": round(resync_s, 3), "hwm_mib": round(hwm, 1), "cpu_s": round(cpu, 2),
             "joined_members": members, "members_expected": a.n + 2}
        if resync_ms_metric is not None:
            r["resync_metric_ms"] = resync_ms_metric
        log(json.dumps(r))
        if members != a.n + 2:
            raise RuntimeError(f"{kind}: /joined_members lists {members}, not {a.n + 2}")
        return r
    finally:
        if joiner is not None:
            joiner.stop(d) if isinstance(joiner, SynapseProc) else joiner.stop()
        res.stop()
        if not a.keep:
            for f in ("resident.db", "resident.db-wal", "resident.db-shm"):
                try:
                    os.remove(f"{d}/{f}")
                except OSError:
                    pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True)
    p.add_argument("--resident-db", required=True)
    p.add_argument("--resident-port", type=int, required=True)
    p.add_argument("--room", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--kinds", default="hearth-partial,hearth-full,synapse-partial,synapse-full")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--joiner-port", type=int, default=8690)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", required=True)
    p.add_argument("--synapse-dir", default="/work/shared/synapse-peer")
    p.add_argument("--synapse-home", default="/tmp/synpeer")
    p.add_argument("--keep", action="store_true", help="keep each run's resident database")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    results = []
    port = a.joiner_port
    for run in range(a.repeats):
        for kind in a.kinds.split(","):
            results.append(measure(a, kind, run, port))
            port += 1  # a fresh name each time: nobody remembers an earlier joiner
    summary = {}
    for kind in a.kinds.split(","):
        rs = [r for r in results if r["kind"] == kind]
        summary[kind] = {k: statistics.median(r[k] for r in rs)
                         for k in ("join_s", "resync_s", "hwm_mib", "cpu_s")}
        log(f"n={a.n} {kind} medians: {summary[kind]}")
    print(json.dumps({"n": a.n, "runs": results, "medians": summary}, indent=1))


if __name__ == "__main__":
    main()
