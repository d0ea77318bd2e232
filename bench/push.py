#!/usr/bin/env python3
"""Push-rule evaluation in a 1,000-member room, seen from clients (any homeserver).

The same client-API scenario for Hearth and Synapse, so the two can be set side by side:

  setup    Alice and MEMBERS users register (m.login.dummy), Alice creates a public room
           (version 10) and every member joins it through /join (JOIN_CONC at a time). Alice
           also has a room of her own (the 1-member baseline).
  single   SINGLES sequential sends into each room: median/p90 latency and, with --pid, the
           server's CPU per send (/proc/PID/stat utime+stime). Synapse evaluates push rules
           inside the send (before the event is persisted), Hearth after it (a worker), so
           the 1,000-member minus 1-member difference is the evaluation's share of a send on
           Synapse and ~0 on Hearth.
  burst    SENDS messages by CLIENTS concurrent clients (Alice's token, SENDS/CLIENTS each)
           into the big room, then the same into the 1-member room: msg/s, server CPU per
           message. After the big-room burst's last 200, member m0 polls /sync (since a token
           taken before the burst, so the room is in every response) until its
           unread_notifications.notification_count has grown by SENDS: the time from the
           first send until then is when the last message's count is visible to a member.

Output: a JSON document on stdout, one line per figure on stderr.

  /tmp/hearth-pyvenv/bin/python bench/push.py --url http://127.0.0.1:8008 --pid PID
"""

import argparse
import asyncio
import json
import secrets
import sys
import time

import aiohttp

from benchutil import cpu_s, pct

CLIENT = "/_matrix/client/v3"
# Lazy-loaded members and a 1-event timeline: the poll asks for the counts, not 1,000
# membership events.
FILTER = json.dumps({"room": {"timeline": {"limit": 1}, "state": {"lazy_load_members": True}},
                     "presence": {"types": []}, "account_data": {"types": []}})


class Client:
    def __init__(self, session, base, ssl):
        self.s, self.base, self.ssl = session, base, ssl

    async def call(self, method, path, token=None, body=None, params=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.s.request(method, self.base + path, json=body, headers=headers,
                                  params=params, ssl=self.ssl) as r:
            data = await r.json(content_type=None)
            if r.status != 200:
                raise RuntimeError(f"{method} {path} -> {r.status} {data}")
            return data

    async def register(self, name):
        r = await self.call("POST", "/register", body={
            "username": name, "password": "bench-" + name, "auth": {"type": "m.login.dummy"}})
        return r["access_token"]

    async def send(self, token, room, txn, text):
        await self.call("PUT", f"/rooms/{room}/send/m.room.message/{txn}", token,
                        {"msgtype": "m.text", "body": text})

    async def sync(self, token, since=None):
        params = {"filter": FILTER, "timeout": "0"}
        if since:
            params["since"] = since
        return await self.call("GET", "/sync", token, params=params)


def notif_count(sync, room):
    r = sync.get("rooms", {}).get("join", {}).get(room)
    return None if r is None else r.get("unread_notifications", {}).get("notification_count", 0)


async def gather_limited(n, coros):
    sem = asyncio.Semaphore(n)

    async def one(c):
        async with sem:
            return await c
    return await asyncio.gather(*(one(c) for c in coros))


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--pid", type=int)
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--sends", type=int, default=400)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--singles", type=int, default=20)
    p.add_argument("--join-conc", type=int, default=8)
    p.add_argument("--visible-timeout", type=float, default=600)
    a = p.parse_args()
    out = {"members": a.members, "sends": a.sends, "clients": a.clients}
    tag = secrets.token_hex(3)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=32)) as s:
        c = Client(s, a.url.rstrip("/") + CLIENT, False if a.insecure else None)

        # ---- setup
        t0 = time.monotonic()
        alice = await c.register(f"alice{tag}")
        members = await gather_limited(8, [c.register(f"m{i}x{tag}") for i in range(a.members)])
        t_reg = time.monotonic() - t0
        big = (await c.call("POST", "/createRoom", alice, {"preset": "public_chat", "room_version": "10"}))["room_id"]
        solo = (await c.call("POST", "/createRoom", alice, {"preset": "private_chat", "room_version": "10"}))["room_id"]
        t1 = time.monotonic()
        await gather_limited(a.join_conc, [c.call("POST", f"/join/{big}", tok, {}) for tok in members])
        t_join = time.monotonic() - t1
        out["setup"] = {"register_s": round(t_reg, 1), "join_s": round(t_join, 1)}
        print(f"setup: {a.members + 1} users registered in {t_reg:.1f} s, {a.members} joins in {t_join:.1f} s",
              file=sys.stderr)
        await c.send(alice, big, "setup", "everyone is here")
        await asyncio.sleep(3)  # let a trailing evaluator finish before timing

        # ---- single sends
        out["single"] = {}
        for label, room in ((f"{a.members}_members", big), ("1_member", solo)):
            lat, c0 = [], cpu_s(a.pid)
            for i in range(a.singles):
                t = time.monotonic()
                await c.send(alice, room, f"one-{label}-{i}", f"hello {i}")
                lat.append(time.monotonic() - t)
            m = {"p50_ms": round(pct(lat, 50) * 1e3, 1), "p90_ms": round(pct(lat, 90) * 1e3, 1)}
            if a.pid:
                m["server_cpu_ms_per_send"] = round((cpu_s(a.pid) - c0) * 1e3 / a.singles, 1)
            out["single"][label] = m
            print(f"single send, {label}: p50 {m['p50_ms']} ms, p90 {m['p90_ms']} ms, "
                  f"cpu {m.get('server_cpu_ms_per_send')} ms", file=sys.stderr)
            await asyncio.sleep(3)

        # ---- bursts
        m0 = members[0]
        base_sync = await c.sync(m0)
        since = base_sync["next_batch"]
        before = notif_count(base_sync, big)

        async def burst(room, label):
            async def client(k):
                for i in range(a.sends // a.clients):
                    await c.send(alice, room, f"b-{label}-{k}-{i}", f"burst {k} {i}")
            c0 = cpu_s(a.pid)
            t = time.monotonic()
            await asyncio.gather(*(client(k) for k in range(a.clients)))
            return t, time.monotonic(), c0

        out["burst"] = {}
        t_first, t_last, c0 = await burst(big, "big")
        deadline = time.monotonic() + a.visible_timeout
        polls = 0
        while True:
            now_count = notif_count(await c.sync(m0, since), big)
            polls += 1
            if now_count is not None and now_count >= before + a.sends:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"count stuck at {now_count} (want {before + a.sends})")
            await asyncio.sleep(0.02)
        t_vis = time.monotonic()
        # CPU up to the counts being visible: the evaluation's cost is in it on both servers.
        cpu = (cpu_s(a.pid) - c0) * 1e3 / a.sends if a.pid else None
        m = {"seconds": round(t_last - t_first, 2), "msgs_per_s": round(a.sends / (t_last - t_first), 1),
             "count_before": before, "count_after": now_count,
             "visible_after_first_send_s": round(t_vis - t_first, 2),
             "visible_after_last_200_s": round(t_vis - t_last, 2), "polls": polls}
        if cpu is not None:
            m["server_cpu_ms_per_msg_until_visible"] = round(cpu, 2)
        out["burst"][f"{a.members}_members"] = m
        print(f"burst, {a.members} members: {a.sends} msgs in {m['seconds']} s = {m['msgs_per_s']} msg/s; "
              f"count {before} -> {now_count} visible {m['visible_after_first_send_s']} s after the first send "
              f"({m['visible_after_last_200_s']} s after the last 200); cpu {cpu and round(cpu, 2)} ms/msg",
              file=sys.stderr)
        await asyncio.sleep(3)
        t_first, t_last, c0 = await burst(solo, "solo")
        m = {"seconds": round(t_last - t_first, 2), "msgs_per_s": round(a.sends / (t_last - t_first), 1)}
        if a.pid:
            m["server_cpu_ms_per_msg"] = round((cpu_s(a.pid) - c0) * 1e3 / a.sends, 2)
        out["burst"]["1_member"] = m
        print(f"burst, 1 member: {a.sends} msgs in {m['seconds']} s = {m['msgs_per_s']} msg/s, "
              f"cpu {m.get('server_cpu_ms_per_msg')} ms/msg", file=sys.stderr)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    asyncio.run(main())
