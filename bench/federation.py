#!/usr/bin/env python3
"""Federation benchmark (issue 9): remote-send latency and inbound /send throughput.

Four servers, all on loopback TLS with IP-literal server names, started by
bench/federation.sh:
  S1  Synapse, the origin of the latency part (and of part 2b)
  S2  Synapse, a receiver
  H   Hearth, a receiver
  O   Hearth, the origin of part 2a

Part 1, send -> remote /sync latency. A user of S1 creates a room (version 10);
a user of H and a user of S2 join it over federation. W rounds, one after
another: both receivers park GET /sync?since=...&timeout=30000, PARK_MS later
the S1 user sends a message; for each receiver, the latency is from the send's
200 to its long-poll returning with that message (a poll that returns without
it is re-parked at once). Both receivers are fed by the same S1 sender (one
queue per destination), so the difference between them is the receiving
server's path: /send, the checks on receipt, persisting, waking /sync.

Part 2, inbound /send throughput. For each (origin, receiver) pair, in order
O->H, O->S2 with N messages, the same with SMALL_N, then S1->H, S1->S2 with S1_N
(REPEATS times), on a fresh room of the origin:
  1. the receiver's user joins the room over federation; one warm-up message
     is sent and seen (keys fetched, connections open);
  2. the receiver's user parks a /sync long-poll (it re-parks whenever it
     returns, as a client does);
  3. the receiver process is frozen (SIGSTOP);
  4. the origin's user sends N messages (SENDERS concurrent senders) and then
     one marker message; the origin queues them for the receiver, which cannot
     answer: one transaction is stuck in flight and the rest wait in the
     origin's queue, as after a network blip;
  5. the receiver is resumed (SIGCONT); the clock runs from here until the
     receiver's user's /sync returns the marker. Both origins send
     transactions of at most 50 PDUs, one in flight per destination, in
     stream order, so the marker is the last PDU to arrive.
  PDUs/s = (N + 1) / that time; the receiver's CPU (utime+stime from
  /proc/PID/stat) over the same window / (N + 1) = CPU per PDU. Afterwards
  (untimed) the receiver's /messages is paged back to check that all N + 1
  messages are there.
  Synapse drops a room's staged inbound PDUs once 100 or more wait
  (prune_staged_events_in_room), so only drains of fewer than ~99 PDUs make it
  process every PDU: SMALL_N and S1_N default to 90; N (1000) shows the pruning.
  Freezing the receiver takes the origin's own send rate out of the
  measurement (Synapse as an origin accepts only ~70 client sends/s, far
  below what a receiver can take), so both origins can be used. The freeze
  must stay well under the origins' federation request timeouts (Hearth 30 s,
  Synapse 60 s): it is reported as "frozen_s".

Output: JSON on stdout; progress on stderr.

  /tmp/hearth-pyvenv/bin/python bench/federation.py --hearth https://127.0.0.1:8662 --hearth-pid P \
      --origin https://127.0.0.1:8663 --origin-pid P --s1 https://127.0.0.1:8664 --s1-pid P \
      --s2 https://127.0.0.1:8665 --s2-pid P
"""

import argparse
import asyncio
import os
import secrets
import signal
import sys
import time
import urllib.parse

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wakeups import (  # noqa: E402  (shared client and /proc helpers)
    Client, HSError, busy_s, metrics, own_cpu, proc_cpu, proc_mem, run_cli, stats,
)

RUN = secrets.token_hex(3)
T0 = time.monotonic()


def log(msg):
    print(f"[federation {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def server_name(url):
    return urllib.parse.urlsplit(url).netloc


def enc(s):
    return urllib.parse.quote(s, safe="")


def room_events(sync, room_id):
    room = sync.get("rooms", {}).get("join", {}).get(room_id, {})
    return room.get("timeline", {}).get("events", [])


def bodies(sync, room_id):
    return [(e.get("content") or {}).get("body") for e in room_events(sync, room_id)]


class Server:
    def __init__(self, label, url, pid):
        self.label, self.url, self.pid, self.name = label, url, pid, server_name(url)

    def snap(self):
        return {"cpu_s": proc_cpu(self.pid), **proc_mem(self.pid)}


async def user(http, srv, localpart):
    c = await Client.register(http, srv.url, f"fb_{RUN}_{localpart}", secrets.token_urlsafe(12))
    c.srv, c.since = srv, None
    return c


async def create_room(origin, name):
    _, r = await origin.req("POST", "/createRoom", {
        "preset": "public_chat", "name": name, "room_version": "10"})
    return r["room_id"]


async def join_and_wait(rcv, room_id, origin_name, deadline_s=60):
    """Join over federation, then wait until the room is in the user's /sync (Synapse keeps
    a partial-state room out of /sync until its state is complete)."""
    await rcv.req("POST", f"/join/{enc(room_id)}?server_name={enc(origin_name)}", {}, timeout=120)
    end = time.monotonic() + deadline_s
    since = rcv.since
    while time.monotonic() < end:
        s = await rcv.sync(since, 5000)
        since = s["next_batch"]
        if room_id in s.get("rooms", {}).get("join", {}):
            rcv.since = since
            return
    raise HSError(f"{rcv.user_id}: {room_id} not in /sync {deadline_s} s after joining")


async def wait_body(rcv, room_id, body, deadline_s=60, on_return=None):
    """Long-poll /sync from rcv.since until `body` arrives in the room; returns the time
    (monotonic) of the poll that carried it. Re-parks at once after any other return."""
    end = time.monotonic() + deadline_s
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise HSError(f"{rcv.srv.label}: {body!r} not seen within {deadline_s} s")
        s = await rcv.sync(rcv.since, int(min(30, left) * 1000))
        t = time.monotonic()
        rcv.since = s["next_batch"]
        if on_return:
            on_return(s)
        if body in bodies(s, room_id):
            return t


async def send(c, room_id, txn, body):
    _, r = await c.req("PUT", f"/rooms/{enc(room_id)}/send/m.room.message/{txn}",
                       {"msgtype": "m.text", "body": body})
    return r["event_id"]


# ---------------------------------------------------------------- part 1 --

async def latency(args, s1u, receivers):
    room_id = await create_room(s1u, f"latency {RUN}")
    for r in receivers:
        await join_and_wait(r, room_id, s1u.srv.name)
    log(f"latency: {', '.join(r.srv.label for r in receivers)} joined {room_id}")
    lat = {r.srv.label: [] for r in receivers}
    send_lat = []
    for k in range(-args.warmup, args.wakeups):
        body = f"{RUN} latency {k}"
        polls = [asyncio.create_task(wait_body(r, room_id, body)) for r in receivers]
        await asyncio.sleep(args.park_ms / 1000)
        ts = time.monotonic()
        await send(s1u, room_id, f"{RUN}-lat-{k}", body)
        t200 = time.monotonic()
        seen = await asyncio.gather(*polls)
        if k < 0:
            continue  # warm-up rounds
        send_lat.append(t200 - ts)
        for r, t in zip(receivers, seen):
            lat[r.srv.label].append(t - t200)
    out = {"room_id": room_id, "rounds": args.wakeups, "warmup_rounds": args.warmup,
           "park_ms": args.park_ms, "s1_send_latency": stats(send_lat)}
    for label, v in lat.items():
        out[label] = stats(v)
        out[label]["samples_ms"] = [round(x * 1000, 2) for x in v]
        log(f"latency S1 -> {label}: p50 {out[label]['p50_ms']} ms, p90 {out[label]['p90_ms']} ms")
    return out


# ---------------------------------------------------------------- part 2 --

async def count_messages(rcv, room_id, wanted, from_token):
    """Page the receiver's /messages backwards until every body in `wanted` is found (or
    history ends): the untimed completeness check of part 2. Returns how many were found."""
    want = len(wanted)
    found, token = set(), from_token
    for _ in range(want // 50 + 20):
        q = f"?dir=b&limit=100&from={enc(token)}"
        _, r = await rcv.req("GET", f"/rooms/{enc(room_id)}/messages{q}")
        for e in r.get("chunk", []):
            b = (e.get("content") or {}).get("body") or ""
            if b in wanted:
                found.add(b)
        if len(found) >= want or not r.get("chunk") or not r.get("end"):
            break
        token = r["end"]
    return len(found)


async def drain(args, http, origin_u, rcv, n, tag):
    origin, receiver = origin_u.srv, rcv.srv
    room_id = await create_room(origin_u, f"throughput {tag} {RUN}")
    await join_and_wait(rcv, room_id, origin.name)
    # Warm-up: keys and connections in place, the room's state settled at the receiver.
    await send(origin_u, room_id, f"{RUN}-{tag}-warm", f"{RUN} {tag} warm")
    await wait_body(rcv, room_id, f"{RUN} {tag} warm")
    await asyncio.sleep(0.5)

    returns = {"n": 0, "events": 0}

    def on_return(s):
        returns["n"] += 1
        returns["events"] += len(room_events(s, room_id))

    prefix = f"{RUN} {tag} m"
    marker = f"{RUN} {tag} marker"
    watcher = asyncio.create_task(wait_body(rcv, room_id, marker, args.drain_deadline_s, on_return))
    await asyncio.sleep(args.park_ms / 1000)
    o_m0 = await metrics(http, origin.url)
    os.kill(receiver.pid, signal.SIGSTOP)
    try:
        t_stop = time.monotonic()
        it = iter(range(n))

        async def sender():
            for k in it:
                await send(origin_u, room_id, f"{RUN}-{tag}-{k}", f"{prefix}{k}")

        await asyncio.gather(*(sender() for _ in range(args.senders)))
        await send(origin_u, room_id, f"{RUN}-{tag}-marker", marker)
        t_sent = time.monotonic()
        # Let the origin hand the events to its federation sender (Synapse does it
        # asynchronously after persisting; Hearth queues them in the event's own write).
        await asyncio.sleep(args.settle_s)
        o_m1 = await metrics(http, origin.url)
        r0, o0, c0, b0 = receiver.snap(), origin.snap(), own_cpu(), busy_s()
        t_cont = time.monotonic()
    finally:
        os.kill(receiver.pid, signal.SIGCONT)
    t_seen = await watcher
    r1, o1, c1, b1 = receiver.snap(), origin.snap(), own_cpu(), busy_s()
    wall = t_seen - t_cont
    pdus = n + 1
    rcpu = r1["cpu_s"] - r0["cpu_s"]
    got = await count_messages(rcv, room_id, {f"{prefix}{k}" for k in range(n)} | {marker}, rcv.since)
    o_m2 = await metrics(http, origin.url)
    out = {
        "origin": origin.label, "receiver": receiver.label, "room_id": room_id,
        "pdus": pdus, "senders": args.senders,
        "origin_send_s": round(t_sent - t_stop, 3),
        "frozen_s": round(t_cont - t_stop, 3),
        "drain_s": round(wall, 3),
        "pdus_per_s": round(pdus / wall, 1),
        "receiver_cpu_s": round(rcpu, 3),
        "receiver_cpu_ms_per_pdu": round(rcpu * 1000 / pdus, 3),
        "origin_cpu_s": round(o1["cpu_s"] - o0["cpu_s"], 3),
        "loadgen_cpu_s": round(c1 - c0, 3),
        "other_cpu_s": round(max(0.0, (b1 - b0) - rcpu - (o1["cpu_s"] - o0["cpu_s"]) - (c1 - c0)), 2),
        "receiver_sync_returns": returns["n"],
        "receiver_sync_events": returns["events"],
        "receiver_has_all": got == pdus, "receiver_found": got,
        "receiver_after": {k: r1[k] for k in ("VmRSS", "VmHWM")},
    }
    if o_m1 and o_m0:
        out["origin_queue_depth_when_resumed"] = o_m1.get("hearth_federation_queue_depth_total")
        out["origin_transactions"] = o_m2["hearth_federation_transactions_total"] - o_m0["hearth_federation_transactions_total"]
        out["origin_failures"] = o_m2["hearth_federation_failures_total"] - o_m0["hearth_federation_failures_total"]
    log(f"drain {tag}: {pdus} PDUs {origin.label} -> {receiver.label} in {wall:.2f} s = "
        f"{out['pdus_per_s']} PDUs/s, receiver CPU {out['receiver_cpu_ms_per_pdu']} ms/PDU, "
        f"frozen {out['frozen_s']} s, in /messages afterwards: {got}/{pdus}")
    # Not fatal: a receiver that ends up with holes (Synapse from Synapse does, see
    # BENCHMARKS.md) is a finding to report, and its PDUs/s is then an overstatement.
    return out


async def main(args):
    srv = {k: Server(k, getattr(args, k), getattr(args, f"{k}_pid"))
           for k in ("hearth", "origin", "s1", "s2")}
    srv["hearth"].label, srv["origin"].label = "H", "O"
    srv["s1"].label, srv["s2"].label = "S1", "S2"
    out = {"run": RUN, "servers": {s.label: s.name for s in srv.values()},
           "start": {s.label: s.snap() for s in srv.values()}}
    connector = aiohttp.TCPConnector(ssl=False, limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        users = await asyncio.gather(*(user(http, srv[k], k) for k in ("s1", "hearth", "s2", "origin")))
        s1u, hu, s2u, ou = users
        for u in (hu, s2u):
            u.since = (await u.sync())["next_batch"]
        out["latency"] = await latency(args, s1u, [hu, s2u])
        out["after_latency"] = {s.label: s.snap() for s in srv.values()}

        runs = []
        for rep in range(args.repeats):
            for origin_u, n in ((ou, args.pdus), (ou, args.small_pdus), (s1u, args.s1_pdus)):
                if n <= 0:
                    continue
                for rcv in (hu, s2u):
                    tag = f"{origin_u.srv.label}{rcv.srv.label}{n}r{rep}"
                    runs.append(await drain(args, http, origin_u, rcv, n, tag))
        out["throughput"] = runs
        out["ratelimited_429s"] = sum(u.ratelimited for u in users)
    out["end"] = {s.label: s.snap() for s in srv.values()}
    out["total_s"] = round(time.monotonic() - T0, 1)
    return out


def parse_args(argv=None):
    e = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k, what in (("hearth", "Hearth receiver H"), ("origin", "Hearth origin O"),
                    ("s1", "Synapse S1 (latency origin)"), ("s2", "Synapse receiver S2")):
        p.add_argument(f"--{k}", required=True, help=f"base URL of {what}")
        p.add_argument(f"--{k}-pid", type=int, required=True)
    p.add_argument("--wakeups", "-w", type=int, default=int(e("FED_W", 30)))
    p.add_argument("--warmup", type=int, default=3, help="latency rounds not counted")
    p.add_argument("--park-ms", type=int, default=int(e("FED_PARK_MS", 100)))
    p.add_argument("--pdus", "-n", type=int, default=int(e("FED_N", 1000)),
                   help="messages per drain with the Hearth origin O (0: skip)")
    p.add_argument("--small-pdus", type=int, default=int(e("FED_SMALL_N", 90)),
                   help="messages per second drain with O, below Synapse's staging prune "
                        "threshold of 100 (0: skip)")
    p.add_argument("--s1-pdus", type=int, default=int(e("FED_S1_N", 90)),
                   help="messages per drain with the Synapse origin S1 (0: skip)")
    p.add_argument("--senders", type=int, default=int(e("FED_SENDERS", 8)))
    p.add_argument("--repeats", type=int, default=int(e("FED_REPEATS", 1)))
    p.add_argument("--settle-s", type=float, default=float(e("FED_SETTLE_S", 1.0)))
    p.add_argument("--drain-deadline-s", type=float, default=float(e("FED_DRAIN_DEADLINE_S", 240)))
    args = p.parse_args(argv)
    for k in ("hearth", "origin", "s1", "s2"):
        setattr(args, k, getattr(args, k).rstrip("/"))
    args.senders = max(1, args.senders)
    return args


if __name__ == "__main__":
    run_cli(main, parse_args(), "federation.py")
