#!/usr/bin/env python3
"""Memory and clean-up after N abandoned /sync long-polls (stdlib only).

  1. registers a user (POST /register, m.login.dummy) and does an initial
     GET /sync?timeout=0 to get next_batch;
  2. reads the server's VmRSS (/proc/PID/status) and, when the server has
     /_hearth/metrics, the idle hearth_http_requests_in_flight gauge (the
     metrics request counts itself while it is served, so "idle" reads 1);
  3. opens N raw TCP (or TLS, for https URLs) connections, each sending
     GET /_matrix/client/v3/sync?since=TOKEN&timeout=30000 with the access
     token, and waits until the gauge reads idle + N (for a server without the
     metric: until the server's CPU use has settled);
  4. reads VmRSS, closes every socket (FIN), measures the time until the gauge
     is back at its idle value, waits 1 s, reads VmRSS again;
  5. optionally (--late-s S) reads VmRSS once more S seconds after the close,
     i.e. after the long-polls' own 30 s timeout would have fired;
  6. checks the server still answers /versions, and prints JSON on stdout.

  python3 bench/abandon.py --url http://127.0.0.1:8590 --pid PID
  python3 bench/abandon.py --url https://127.0.0.1:8591 --insecure --pid PID --late-s 32
"""

import argparse
import http.client
import json
import os
import resource
import secrets
import socket
import ssl
import sys
import time
import urllib.parse

CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Server:
    def __init__(self, url, insecure):
        u = urllib.parse.urlsplit(url)
        self.tls = u.scheme == "https"
        self.host, self.port = u.hostname, u.port or (443 if self.tls else 80)
        self.ctx = None
        if self.tls:
            self.ctx = ssl.create_default_context()
            if insecure:
                self.ctx.check_hostname = False
                self.ctx.verify_mode = ssl.CERT_NONE

    def conn(self, timeout=30):
        if self.tls:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def req(self, method, path, body=None, token=None, timeout=30):
        c = self.conn(timeout)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        c.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    def metrics(self):
        """The /_hearth/metrics gauges as a dict, or None if the server has none."""
        status, data = self.req("GET", "/_hearth/metrics", timeout=10)
        if status != 200:
            return None
        out = {}
        for line in data.decode().splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.partition(" ")
                out[k] = float(v)
        return out

    def raw_socket(self):
        s = socket.create_connection((self.host, self.port), timeout=30)
        if self.tls:
            s = self.ctx.wrap_socket(s, server_hostname=self.host)
        return s


def register(srv, localpart, password):
    body = {"username": localpart, "password": password, "auth": {"type": "m.login.dummy"}}
    status, data = srv.req("POST", "/_matrix/client/v3/register", body)
    if status == 401:  # a server that insists on the UIA session: take it and retry
        body["auth"]["session"] = json.loads(data).get("session")
        status, data = srv.req("POST", "/_matrix/client/v3/register", body)
    if status != 200:
        sys.exit(f"abandon.py: register -> {status} {data[:300]!r}")
    return json.loads(data)["access_token"]


def wait_cpu_settled(pid, quiet_s=1.0, max_frac=0.02, deadline_s=60):
    """Until the process used < max_frac of a core over quiet_s (or the deadline)."""
    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end:
        c0 = cpu_s(pid)
        time.sleep(quiet_s)
        if cpu_s(pid) - c0 < max_frac * quiet_s:
            return True
    return False


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--pid", type=int, required=True, help="server PID (for VmRSS)")
    p.add_argument("--insecure", action="store_true", help="don't verify TLS certificates")
    p.add_argument("-n", "--connections", type=int, default=1000)
    p.add_argument("--timeout-ms", type=int, default=30000, help="the long-polls' ?timeout=")
    p.add_argument("--late-s", type=float, default=0,
                   help="also read VmRSS this many seconds after the close (0: don't)")
    p.add_argument("--deadline-s", type=float, default=90, help="bound for each wait")
    a = p.parse_args()
    n = a.connections
    srv = Server(a.url.rstrip("/"), a.insecure)
    out = {"url": a.url, "connections": n}

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(n + 100, soft)), hard))
    out["rlimit_nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    token = register(srv, f"abandon_{secrets.token_hex(3)}", secrets.token_urlsafe(12))
    status, data = srv.req("GET", "/_matrix/client/v3/sync?timeout=0", token=token)
    if status != 200:
        sys.exit(f"abandon.py: initial sync -> {status} {data[:300]!r}")
    since = json.loads(data)["next_batch"]

    time.sleep(1.0)  # let the register/sync aftermath settle
    m0 = srv.metrics()
    has_gauge = bool(m0) and "hearth_http_requests_in_flight" in m0
    idle = m0["hearth_http_requests_in_flight"] if has_gauge else None
    out["rss_before_mib"] = rss_mib(a.pid)
    out["metrics_before"] = m0

    # -- open N long-polls -------------------------------------------------------
    request = (f"GET /_matrix/client/v3/sync?since={urllib.parse.quote(since)}&timeout={a.timeout_ms} HTTP/1.1\r\n"
               f"Host: {srv.host}:{srv.port}\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
    socks = []
    t_open = time.monotonic()
    try:
        for _ in range(n):
            s = srv.raw_socket()
            s.sendall(request)
            socks.append(s)
    except OSError as e:
        out["open_error"] = f"after {len(socks)} connections: {e!r}"
    out["opened"] = len(socks)
    out["open_s"] = round(time.monotonic() - t_open, 3)

    t_end = time.monotonic() + a.deadline_s
    if has_gauge:
        target = idle + len(socks)
        parked = None
        while time.monotonic() < t_end:
            parked = srv.metrics()["hearth_http_requests_in_flight"]
            if parked >= target:
                break
            time.sleep(0.01)
        out["in_flight_parked"] = parked
        out["all_parked"] = parked is not None and parked >= target
    else:
        out["all_parked"] = None  # unknown: no gauge; waited for the CPU to settle instead
        out["cpu_settled"] = wait_cpu_settled(a.pid, deadline_s=a.deadline_s)
    out["parked_after_s"] = round(time.monotonic() - t_open, 3)
    out["rss_with_mib"] = rss_mib(a.pid)
    out["metrics_with"] = srv.metrics() if has_gauge else None
    # Nothing may have come back on the sockets yet (the long-polls are parked).
    answered = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1):
                answered += 1
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except OSError:
            answered += 1
    out["answered_before_close"] = answered

    # -- abandon them --------------------------------------------------------------
    t_close = time.monotonic()
    for s in socks:
        s.close()
    t_closed = time.monotonic()
    out["close_s"] = round(t_closed - t_close, 4)
    if has_gauge:
        back, g = None, None
        t_end = time.monotonic() + a.deadline_s
        while time.monotonic() < t_end:
            g = srv.metrics()["hearth_http_requests_in_flight"]
            if g <= idle:
                back = time.monotonic()
                break
            time.sleep(0.001)
        out["in_flight_last_read"] = g
        out["gauge_idle_after_last_close_ms"] = round((back - t_closed) * 1000, 1) if back else None
        out["gauge_idle_after_first_close_ms"] = round((back - t_close) * 1000, 1) if back else None
    else:
        out["cpu_settled_after_close"] = wait_cpu_settled(a.pid, deadline_s=a.deadline_s)
        out["settled_after_close_s"] = round(time.monotonic() - t_closed, 2)
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t_closed)) if not has_gauge else 1.0)
    out["rss_after_1s_mib"] = rss_mib(a.pid)
    out["metrics_after"] = srv.metrics() if has_gauge else None
    if a.late_s:
        time.sleep(max(0.0, a.late_s - (time.monotonic() - t_closed)))
        out["late_s"] = a.late_s
        out["rss_late_mib"] = rss_mib(a.pid)
    status, _ = srv.req("GET", "/_matrix/client/versions", timeout=10)
    out["versions_after"] = status
    out["rss_delta_with_mib"] = round(out["rss_with_mib"] - out["rss_before_mib"], 1)
    out["rss_delta_after_mib"] = round(out["rss_after_1s_mib"] - out["rss_before_mib"], 1)
    out["kib_per_parked_poll"] = round(out["rss_delta_with_mib"] * 1024 / max(1, len(socks)), 1)
    json.dump(out, sys.stdout, indent=2)
    print()
    line = (f"abandon: {len(socks)} long-polls, RSS {out['rss_before_mib']} -> {out['rss_with_mib']} "
            f"-> {out['rss_after_1s_mib']} MiB")
    if has_gauge:
        line += f", in-flight back to idle {out['gauge_idle_after_last_close_ms']} ms after the last close"
    print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
