#!/usr/bin/env python3
"""bench/sticky.py — sticky events (MSC4354), Hearth and Synapse side by side (see sticky.sh).

1. sync cost: on one server, a user in a room holding 100 live sticky events (1 h) against a
   user in a room holding 100 plain messages: p50/p90 of an initial /sync (timeline limit 10)
   and of an empty incremental /sync (timeout=0, since = the latest token), ST_N each.
   Every request carries a filter of its own (an unused `not_types` entry), so Synapse's
   sync response cache never answers one from another.
2. delivery after an outage: sender X and peer Y share a room; Y is stopped, X's user sends a
   sticky event, ST_DOWN_S seconds pass (X's sends fail and back off), Y is started again.
   Measured from Y answering /versions to Y's user seeing the event in /sync (sticky section or
   timeline): "passive" (Y does nothing; capped at ST_PASSIVE_S), and if not delivered by then,
   "after contact" (Y's user sends a message into the room, which reaches X: servers retry a
   destination that contacts them).

Prints one JSON object. Stdlib only (urllib, ssl without verification: self-signed peers).
"""
import json
import os
import signal
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
PARAM = "org.matrix.msc4354.sticky_duration_ms"
HOUR = 3_600_000

OUT = os.environ["ST_OUT"]
BIN = os.environ["ST_BIN"]
SYNPEER = os.environ["SYNPEER_DIR"]
N = int(os.environ.get("ST_N", "100"))
DOWN_S = float(os.environ.get("ST_DOWN_S", "20"))
PASSIVE_S = float(os.environ.get("ST_PASSIVE_S", "90"))
PORTS = [int(p) for p in os.environ.get("ST_PORTS", "8671,8672,8673,8674").split(",")]


def log(*a):
    print(f"[sticky.py {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def req(base, method, path, tok=None, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    r = urllib.request.Request(base + path, data=data, method=method)
    if tok:
        r.add_header("Authorization", f"Bearer {tok}")
    if data is not None:
        r.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(r, context=CTX, timeout=timeout) as res:
            return res.status, json.loads(res.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def ok(*a, **k):
    s, v = req(*a, **k)
    if s != 200:
        raise RuntimeError(f"{a[1]} {a[2]}: {s} {v}")
    return v


def enc(s):
    return urllib.parse.quote(s, safe="")


class Hearth:
    kind = "hearth"

    def __init__(self, port):
        self.port, self.proc = port, None
        self.dir = os.path.join(OUT, "data", f"hearth-{port}")
        os.makedirs(self.dir, exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", f"{self.dir}/key.pem", "-out", f"{self.dir}/cert.pem"],
            check=True, capture_output=True)

    name = property(lambda s: f"127.0.0.1:{s.port}")
    url = property(lambda s: f"https://127.0.0.1:{s.port}")

    def start(self):
        logf = open(os.path.join(OUT, "logs", f"hearth-{self.port}.log"), "a")
        self.proc = subprocess.Popen(
            [BIN, "--database", f"{self.dir}/hearth.db", "--tls-cert", f"{self.dir}/cert.pem",
             "--tls-key", f"{self.dir}/key.pem", "--listen", self.name, "--server-name", self.name,
             "--no-rate-limit", "--insecure-federation-tls"],
            stdout=subprocess.DEVNULL, stderr=logf)
        wait_up(self)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Synapse:
    kind = "synapse"

    def __init__(self, port):
        self.port, self.up = port, False
        self.inst = f"hsticky{port}"

    name = property(lambda s: f"127.0.0.1:{s.port}")
    url = property(lambda s: f"https://127.0.0.1:{s.port}")

    def start(self, reset=False):
        env = dict(os.environ)
        if reset:
            env["SYNPEER_RESET"] = "1"
        self.up = True
        subprocess.run(["timeout", "180", f"{SYNPEER}/start.sh", self.inst, str(self.port)],
                       env=env, check=True, capture_output=True)
        wait_up(self)

    def stop(self, purge=False):
        if not self.up:
            return
        env = dict(os.environ)
        if purge:
            env["SYNPEER_PURGE"] = "1"
        subprocess.run([f"{SYNPEER}/stop.sh", self.inst], env=env, capture_output=True)
        self.up = False


def wait_up(s, secs=120):
    end = time.time() + secs
    while time.time() < end:
        try:
            if req(s.url, "GET", "/_matrix/client/versions", timeout=2)[0] == 200:
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{s.name} not up")


def register(s, name):
    v = ok(s.url, "POST", "/_matrix/client/v3/register",
           body={"username": name, "password": f"pw-{name}-long-enough", "auth": {"type": "m.login.dummy"}})
    return v["user_id"], v["access_token"]


def create_room(s, tok):
    return ok(s.url, "POST", "/_matrix/client/v3/createRoom", tok,
              {"preset": "public_chat", "room_version": "10"})["room_id"]


def send(s, tok, room, txn, sticky=False, kind="m.room.message"):
    q = f"?{PARAM}={HOUR}" if sticky else ""
    body = {"sticky_key": txn} if sticky else {"msgtype": "m.text", "body": txn}
    return ok(s.url, "PUT", f"/_matrix/client/v3/rooms/{enc(room)}/send/{kind}/{txn}{q}", tok, body)["event_id"]


FILTER_N = [0]


def sync(s, tok, since=None, timeout=0):
    # A filter of its own per request: no sync response cache answers it.
    FILTER_N[0] += 1
    f = json.dumps({"room": {"timeline": {"limit": 10, "not_types": [f"x.bench.{FILTER_N[0]}"]}}})
    q = f"timeout={timeout}&filter={enc(f)}" + (f"&since={since}" if since else "")
    return ok(s.url, "GET", f"/_matrix/client/v3/sync?{q}", tok)


def pct(xs, p):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * p))], 2)


def sync_cost(s):
    """Both rooms set up first, then the two kinds of sync measured alternately (none, live,
    none, live, ...), after a warm-up, so neither side gets the quieter half of the run."""
    out, users = {}, {}
    for label, sticky in [("none", False), ("live100", True)]:
        _, tok = register(s, f"u{label}")
        room = create_room(s, tok)
        for i in range(100):
            send(s, tok, room, f"{label}{i}", sticky=sticky,
                 kind="org.example.call.member" if sticky else "m.room.message")
        first = sync(s, tok)
        r = first["rooms"]["join"][room]
        got = len(r.get("msc4354_sticky", {}).get("events", []))
        if sticky:
            assert got + len(r["timeline"]["events"]) >= 100, got
            out["live100_sticky_section_initial"] = got
        users[label] = [tok, first["next_batch"], [], []]
    for _ in range(5):
        for u in users.values():
            sync(s, u[0])
    for _ in range(N):
        for u in users.values():
            t = time.perf_counter()
            sync(s, u[0])
            u[2].append((time.perf_counter() - t) * 1000)
    for _ in range(N):
        for u in users.values():
            t = time.perf_counter()
            v = sync(s, u[0], u[1])
            u[3].append((time.perf_counter() - t) * 1000)
            u[1] = v["next_batch"]
    for label, (_, _, initial, incr) in users.items():
        out[label] = {"initial_p50_ms": pct(initial, 0.5), "initial_p90_ms": pct(initial, 0.9),
                      "incremental_p50_ms": pct(incr, 0.5), "incremental_p90_ms": pct(incr, 0.9)}
        log(s.kind, label, out[label])
    return out


def seen(v, room, eid):
    r = v.get("rooms", {}).get("join", {}).get(room, {})
    evs = r.get("msc4354_sticky", {}).get("events", []) + r.get("timeline", {}).get("events", [])
    return any(e.get("event_id") == eid for e in evs)


def outage(x, y, tag):
    _, xt = register(x, f"x{tag}")
    _, yt = register(y, f"y{tag}")
    room = create_room(x, xt)
    ok(y.url, "POST", f"/_matrix/client/v3/join/{enc(room)}?server_name={enc(x.name)}", yt, {})
    since = sync(y, yt)["next_batch"]
    y.stop()
    eid = send(x, xt, room, f"sticky{tag}", sticky=True, kind="org.example.call.member")
    time.sleep(DOWN_S)
    y.start()
    t0 = time.time()
    res = {"down_s": DOWN_S}
    contacted = None
    while True:
        v = sync(y, yt, since, timeout=1000)
        since = v["next_batch"]
        if seen(v, room, eid):
            res["passive_s" if contacted is None else "after_contact_s"] = round(
                time.time() - (t0 if contacted is None else contacted), 2)
            break
        if contacted is None and time.time() - t0 > PASSIVE_S:
            res["passive_s"] = f">{PASSIVE_S:g}"
            send(y, yt, room, f"hello{tag}")
            contacted = time.time()
        if contacted is not None and time.time() - contacted > 300:
            res["after_contact_s"] = ">300"
            break
    log(f"{x.kind}->{y.kind}", res)
    return res


def main():
    h1, h2 = Hearth(PORTS[0]), Hearth(PORTS[1])
    s1, s2 = Synapse(PORTS[2]), Synapse(PORTS[3])
    result = {}
    try:
        h1.start()
        h2.start()
        s1.start(reset=True)
        s2.start(reset=True)
        result["sync_cost"] = {"hearth": sync_cost(h1), "synapse": sync_cost(s1)}
        result["outage"] = {}
        for x, y, tag in [(h1, h2, "hh"), (s1, s2, "ss"), (h1, s2, "hs"), (s1, h2, "sh")]:
            result["outage"][f"{x.kind}->{y.kind}"] = outage(x, y, tag)
    finally:
        for s in (h1, h2):
            s.stop()
        for s in (s1, s2):
            s.stop(purge=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
