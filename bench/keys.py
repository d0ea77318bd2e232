"""`/keys/query` for a user with 50 devices: time per query on one server (issue 10).

    python bench/keys.py BASE_URL [--devices 50] [--queries 300]

Registers an owner, logs it in DEVICES times and uploads signed device keys for each login
(ed25519 keys made and signed with signedjson, as a client's crypto would), then registers a
querier and times QUERIES sequential `/keys/query` calls for the owner over one keep-alive
connection, after 20 warm-up calls. Each answer is checked to hold all the devices with their
keys. Prints one JSON line. Run with a Python that has signedjson and PyNaCl (the synapse-peer
venv does: Synapse depends on both).
"""

import argparse
import http.client
import json
import ssl
import statistics
import time
import urllib.parse
import uuid

import signedjson.key
import signedjson.sign
from unpaddedbase64 import encode_base64


class Conn:
    def __init__(self, base):
        u = urllib.parse.urlsplit(base)
        if u.scheme == "https":
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # synapse-peer's certificate is self-signed
            self.c = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=60)
        else:
            self.c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)

    def call(self, method, path, body=None, token=None):
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.c.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        r = self.c.getresponse()
        data = r.read()
        if r.status != 200:
            raise SystemExit(f"{method} {path} -> {r.status} {data[:300]!r}")
        return json.loads(data)


def register(c, name, password):
    return c.call("POST", "/_matrix/client/v3/register",
                  {"username": name, "password": password, "auth": {"type": "m.login.dummy"}})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--queries", type=int, default=300)
    a = ap.parse_args()
    c = Conn(a.base)
    suffix = uuid.uuid4().hex[:8]
    pw = "keys-bench-password"
    owner = register(c, f"owner{suffix}", pw)["user_id"]
    t0 = time.perf_counter()
    for i in range(a.devices):
        login = c.call("POST", "/_matrix/client/v3/login", {
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": owner},
            "password": pw})
        dev = login["device_id"]
        key = signedjson.key.generate_signing_key(dev)
        curve = encode_base64(uuid.uuid4().bytes + uuid.uuid4().bytes)
        keys = {
            "user_id": owner, "device_id": dev,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {f"curve25519:{dev}": curve,
                     f"ed25519:{dev}": signedjson.key.encode_verify_key_base64(key.verify_key)},
        }
        signedjson.sign.sign_json(keys, owner, key)
        c.call("POST", "/_matrix/client/v3/keys/upload", {"device_keys": keys}, login["access_token"])
    setup_s = time.perf_counter() - t0
    querier = register(c, f"querier{suffix}", pw)["access_token"]
    body = {"device_keys": {owner: []}}
    for _ in range(20):
        c.call("POST", "/_matrix/client/v3/keys/query", body, querier)
    times = []
    for _ in range(a.queries):
        t = time.perf_counter()
        r = c.call("POST", "/_matrix/client/v3/keys/query", body, querier)
        times.append((time.perf_counter() - t) * 1000)
        devs = r["device_keys"].get(owner, {})
        # The owner also has the device of its registration, without keys.
        if len(devs) < a.devices or any("keys" not in d for d in devs.values()):
            raise SystemExit(f"answer holds {len(devs)} devices, wanted {a.devices} with keys")
    times.sort()
    print(json.dumps({
        "base": a.base, "devices": a.devices, "queries": a.queries,
        "setup_s": round(setup_s, 2),
        "p50_ms": round(statistics.median(times), 2),
        "p90_ms": round(times[int(len(times) * 0.9)], 2),
        "mean_ms": round(statistics.mean(times), 2),
        "per_s": round(1000 / statistics.mean(times), 1),
    }))


main()
