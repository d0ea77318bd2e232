#!/usr/bin/env python3
"""Load generator for any Matrix homeserver (client-server API only).

Phases:
  setup    register SENDERS users + 1 watcher (/register, m.login.dummy UIA),
           the first sender creates a public room, everyone joins.
  send     SENDERS concurrent senders each PUT MESSAGES m.room.message events
           (each sender's sends are sequential): msgs/s, p50/p99 latency.
  wakeup   WAKEUPS times, one after another: the watcher parks
           /sync?timeout=30000&since=..., a sender sends; latency is from the
           send's 200 arriving to the /sync that carries the event returning.
  cost     this process's CPU time (getrusage) and, with --pid, the server's
           CPU time (/proc/PID/stat utime+stime) per message and its RSS
           (/proc/PID/status VmRSS) before and after.

Output: a JSON document on stdout, one human summary line on stderr.

  bench/setup.sh
  /tmp/hearth-pyvenv/bin/python bench/load.py --url https://127.0.0.1:8491 --insecure --pid PID
"""

import argparse
import asyncio
import json
import os
import resource
import secrets
import sys
import time

import aiohttp

CLIENT = "/_matrix/client/v3"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------- helpers --

def pct(samples, p):
    """Nearest-rank percentile of a list of numbers (None if empty)."""
    if not samples:
        return None
    s = sorted(samples)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def ms(seconds):
    return None if seconds is None else round(seconds * 1000, 2)


def stats(samples):
    """Latency summary in milliseconds."""
    return {
        "n": len(samples),
        "p50_ms": ms(pct(samples, 50)),
        "p99_ms": ms(pct(samples, 99)),
        "max_ms": ms(max(samples)) if samples else None,
        "mean_ms": ms(sum(samples) / len(samples)) if samples else None,
    }


def own_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu(pid):
    """utime+stime of a process in seconds (fields 14 and 15 of stat)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may contain spaces: split after ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem(pid):
    """VmRSS and VmHWM (peak RSS) of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(val.split()[0]) / 1024, 1)
    return out


class HSError(Exception):
    pass


# ------------------------------------------------------------------ client --

class Client:
    """A thin client-server API wrapper around one shared aiohttp session."""

    def __init__(self, http, url, token=None):
        self.http, self.url, self.token = http, url, token
        self.ratelimited = 0  # 429s seen (and waited out)

    async def req(self, method, path, body=None, ok=(200,), timeout=60):
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        while True:
            async with self.http.request(
                method, self.url + CLIENT + path, json=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                data = await r.json(content_type=None)
                status = r.status
            if status == 429:  # rate limited: wait as told, then retry
                self.ratelimited += 1
                await asyncio.sleep((data or {}).get("retry_after_ms", 1000) / 1000)
                continue
            if status not in ok:
                raise HSError(f"{method} {path} -> {status} {data}")
            return status, data

    @classmethod
    async def register(cls, http, url, localpart, password):
        """Register via UIA: first POST gets 401 + session, then m.login.dummy."""
        c = cls(http, url)
        body = {"username": localpart, "password": password,
                "initial_device_display_name": "hearth-bench"}
        status, data = await c.req("POST", "/register", body, ok=(200, 401))
        if status == 401:
            flows = [f.get("stages") for f in data.get("flows", [])]
            if ["m.login.dummy"] not in flows:
                raise HSError(f"server offers no m.login.dummy registration flow: {flows}")
            body["auth"] = {"type": "m.login.dummy", "session": data.get("session")}
            _, data = await c.req("POST", "/register", body)
        c.token, c.user_id = data["access_token"], data["user_id"]
        return c

    async def send(self, room_id, txn, text):
        path = f"/rooms/{room_id}/send/m.room.message/{txn}"
        _, data = await self.req("PUT", path, {"msgtype": "m.text", "body": text})
        return data["event_id"]

    async def sync(self, since=None, timeout_ms=0):
        q = f"?timeout={timeout_ms}" + (f"&since={since}" if since else "")
        _, data = await self.req("GET", "/sync" + q, timeout=timeout_ms / 1000 + 30)
        return data


def timeline_ids(sync, room_id):
    room = sync.get("rooms", {}).get("join", {}).get(room_id, {})
    return {e.get("event_id") for e in room.get("timeline", {}).get("events", [])}


# ------------------------------------------------------------------ phases --

async def setup(http, args, run):
    t0 = time.monotonic()
    pw = secrets.token_urlsafe(12)
    users = await asyncio.gather(*(
        Client.register(http, args.url, f"bench_{run}_{i}", pw)
        for i in range(args.senders + 1)))
    senders, watcher = users[:-1], users[-1]
    _, room = await senders[0].req("POST", "/createRoom", {
        "preset": "public_chat", "name": f"bench {run}"})
    room_id = room["room_id"]
    await asyncio.gather(*(u.req("POST", f"/rooms/{room_id}/join", {}) for u in users[1:]))
    return senders, watcher, room_id, time.monotonic() - t0


async def send_phase(senders, room_id, n, run):
    latencies = []

    async def one_sender(i, c):
        for k in range(n):
            t = time.monotonic()
            await c.send(room_id, f"{run}-s{i}-{k}", f"message {k} from sender {i}")
            latencies.append(time.monotonic() - t)

    t0 = time.monotonic()
    await asyncio.gather(*(one_sender(i, c) for i, c in enumerate(senders)))
    wall = time.monotonic() - t0
    total = n * len(senders)
    return {"messages": total, "wall_s": round(wall, 3),
            "msgs_per_s": round(total / wall, 1), "latency": stats(latencies)}


async def wakeup_phase(watcher, sender, room_id, rounds, run, park_s):
    since = (await watcher.sync())["next_batch"]
    latencies, early = [], 0
    for k in range(rounds):
        parked = asyncio.create_task(watcher.sync(since, 30000))
        await asyncio.sleep(park_s)  # let the /sync reach the server and park
        event_id = await sender.send(room_id, f"{run}-wake-{k}", f"wake {k}")
        t_200 = time.monotonic()
        sync = await parked
        # The parked sync may return for something else (presence, ...):
        # then follow the token until the event shows up.
        while event_id not in timeline_ids(sync, room_id):
            early += 1
            if time.monotonic() - t_200 > 60:
                raise HSError(f"event {event_id} not delivered by /sync within 60 s")
            sync = await watcher.sync(sync["next_batch"], 30000)
        latencies.append(time.monotonic() - t_200)
        since = sync["next_batch"]
    # Negative samples mean the /sync beat the send's own 200 back to us.
    return {"rounds": rounds, "latency": stats(latencies),
            "min_ms": ms(min(latencies)), "syncs_without_event": early}


# -------------------------------------------------------------------- main --

async def main(args):
    run = secrets.token_hex(3)

    def server():  # server CPU seconds and memory, if we know its PID
        return {"cpu_s": proc_cpu(args.pid), **proc_mem(args.pid)} if args.pid else None

    out = {"url": args.url, "senders": args.senders, "messages_per_sender": args.messages,
           "server_before": server()}
    cpu0 = own_cpu()

    connector = aiohttp.TCPConnector(ssl=False if args.insecure else None, limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        senders, watcher, room_id, setup_s = await setup(http, args, run)
        out["room_id"], out["setup_s"] = room_id, round(setup_s, 3)

        s0, c0 = server(), own_cpu()
        out["send"] = await send_phase(senders, room_id, args.messages, run)
        s1, c1 = server(), own_cpu()
        out["send"]["loadgen_cpu_s"] = round(c1 - c0, 3)
        if s0:
            cpu = s1["cpu_s"] - s0["cpu_s"]
            out["send"]["server_cpu_s"] = round(cpu, 3)
            out["send"]["server_cpu_ms_per_msg"] = round(cpu * 1000 / out["send"]["messages"], 3)

        if args.wakeups:
            out["wakeup"] = await wakeup_phase(watcher, senders[0], room_id,
                                               args.wakeups, run, args.park_ms / 1000)
            if s1:
                out["wakeup"]["server_cpu_s"] = round(server()["cpu_s"] - s1["cpu_s"], 3)
        out["ratelimited_429s"] = sum(c.ratelimited for c in senders + [watcher])

    out["loadgen_cpu_s"] = round(own_cpu() - cpu0, 3)
    out["server_after"] = server()
    return out


def summary(r):
    s = r["send"]
    line = (f"send: {s['msgs_per_s']} msg/s, p50 {s['latency']['p50_ms']} ms, "
            f"p99 {s['latency']['p99_ms']} ms")
    if "wakeup" in r:
        w = r["wakeup"]["latency"]
        line += f" | wakeup: p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms"
    if "server_cpu_ms_per_msg" in s:
        line += (f" | server: {s['server_cpu_ms_per_msg']} ms CPU/msg, RSS "
                 f"{r['server_before']['VmRSS']} -> {r['server_after']['VmRSS']} MiB")
    line += f" | loadgen CPU {r['loadgen_cpu_s']} s"
    return line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="homeserver base URL, e.g. http://127.0.0.1:8008")
    p.add_argument("--insecure", action="store_true", help="don't verify TLS certificates")
    p.add_argument("--senders", type=int, default=8)
    p.add_argument("--messages", type=int, default=250, help="messages per sender")
    p.add_argument("--wakeups", type=int, default=50, help="wake-up rounds (0 to skip)")
    p.add_argument("--park-ms", type=int, default=100,
                   help="how long the watcher's /sync is left to park before each send")
    p.add_argument("--pid", type=int, help="server process ID (Linux /proc) for CPU and RSS")
    args = p.parse_args(argv)
    args.url = args.url.rstrip("/")
    return args


if __name__ == "__main__":
    args = parse_args()
    try:
        result = asyncio.run(main(args))
    except HSError as e:
        sys.exit(f"load.py: homeserver error: {e}")
    json.dump(result, sys.stdout, indent=2)
    print()
    print(summary(result), file=sys.stderr)
