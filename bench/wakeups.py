#!/usr/bin/env python3
"""Cost of parked bystander long-polls on messages into another room (issue 8).

Requirement: "1,000 parked long-polls of bystanders; CPU per message into another
room within 1.5x of the figure with none parked, and the member's wake-up p50
unchanged."

Phases (one server, one run; client-server API only):
  setup   register N bystanders, a member and a sender (m.login.dummy UIA,
          CONCURRENCY at a time). The first QUIET bystanders each create a
          private room of their own (a quiet room nobody writes to later); the
          others are in no room. The sender creates the busy room, the member
          joins it. Every bystander does an initial /sync?timeout=0 for a since
          token.
  A       none parked. (1) throughput: the sender PUTs M messages into the busy
          room (SEND_CONCURRENCY at a time, default 1 = sequential) while the
          member long-polls /sync?since=... and re-parks after each response;
          server CPU (utime+stime of --pid) over this part / M = CPU per message.
          (2) wake-ups: W rounds, one after another: the member parks
          /sync?timeout=30000, waits PARK_MS, the sender sends; latency is from
          the send's 200 to the member's /sync returning with that event.
  park    N bystanders each open GET /sync?since=TOKEN&timeout=BYSTANDER_TIMEOUT
          on their own connection. "Parked" = every request's headers written
          (aiohttp trace); then, with /_hearth/metrics (Hearth), the gauge
          hearth_http_requests_in_flight >= idle + N; then (both servers) the
          server's CPU use settled (< 2% of a core over 1 s) and no poll
          returned for SETTLE_QUIET_S. Any poll that returns is re-parked at
          once with its new next_batch.
  B       the same as A with the N polls parked. Every bystander poll that
          returns during B is counted (and re-parked), with the sections that
          had data (e.g. presence) and the empty returns at their timeout.

The member's since token carries over from phase to phase (Synapse answers a
repeated identical /sync from a 2-minute response cache); after the M
messages, once the member has seen the last one, its next parked poll is
dropped rather than left to time out.
  end     the bystander polls are cancelled (connections closed).

Server CPU is read from /proc/PID/stat (utime+stime), RSS from
/proc/PID/status. Output: JSON on stdout, a human summary on stderr.

  bench/setup.sh
  /tmp/hearth-pyvenv/bin/python bench/wakeups.py --url http://127.0.0.1:8592 --pid PID
  /tmp/hearth-pyvenv/bin/python bench/wakeups.py --url https://127.0.0.1:8593 --insecure --pid PID
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
    return {
        "n": len(samples),
        "p50_ms": ms(pct(samples, 50)),
        "p90_ms": ms(pct(samples, 90)),
        "p99_ms": ms(pct(samples, 99)),
        "min_ms": ms(min(samples)) if samples else None,
        "max_ms": ms(max(samples)) if samples else None,
        "mean_ms": ms(sum(samples) / len(samples)) if samples else None,
    }


def own_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu(pid):
    """utime+stime of a process in seconds (fields 14 and 15 of stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(val.split()[0]) / 1024, 1)
    return out


def busy_s():
    """Whole machine's non-idle CPU seconds (interference check)."""
    with open("/proc/stat") as f:
        v = f.readline().split()
    return sum(int(x) for x in (v[1], v[2], v[3], v[6], v[7], v[8])) / CLK_TCK


def log(t0, msg):
    print(f"[wakeups {time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class HSError(Exception):
    pass


# ------------------------------------------------------------------ client --

class Client:
    def __init__(self, http, url, token=None):
        self.http, self.url, self.token = http, url, token
        self.ratelimited = 0

    async def req(self, method, path, body=None, ok=(200,), timeout=60):
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        for _ in range(100):
            async with self.http.request(
                method, self.url + CLIENT + path, json=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                data = await r.json(content_type=None)
                status = r.status
            if status == 429:
                self.ratelimited += 1
                await asyncio.sleep((data or {}).get("retry_after_ms", 1000) / 1000)
                continue
            if status not in ok:
                raise HSError(f"{method} {path} -> {status} {str(data)[:300]}")
            return status, data
        raise HSError(f"{method} {path}: rate limited 100 times")

    @classmethod
    async def register(cls, http, url, localpart, password):
        c = cls(http, url)
        body = {"username": localpart, "password": password,
                "initial_device_display_name": "hearth-wakeups"}
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
        _, data = await self.req("GET", "/sync" + q, timeout=timeout_ms / 1000 + 60)
        return data


def timeline_ids(sync, room_id):
    room = sync.get("rooms", {}).get("join", {}).get(room_id, {})
    return [e.get("event_id") for e in room.get("timeline", {}).get("events", [])]


def data_kinds(sync):
    """The sections of a /sync answer with something in them (Synapse omits empty
    sections, Hearth may not), e.g. ["presence"]; [] for an empty answer."""
    kinds = [f"rooms.{k}" for k, v in (sync.get("rooms") or {}).items() if v]
    kinds += [sec for sec in ("presence", "account_data", "to_device")
              if (sync.get(sec) or {}).get("events")]
    dl = sync.get("device_lists") or {}
    if dl.get("changed") or dl.get("left"):
        kinds.append("device_lists")
    return kinds


async def gather_bounded(n, coros_fn, limit):
    """Run coros_fn(i) for i in range(n), at most `limit` at a time, in order."""
    out = [None] * n
    it = iter(range(n))

    async def worker():
        for i in it:
            out[i] = await coros_fn(i)

    await asyncio.gather(*(worker() for _ in range(min(limit, n))))
    return out


async def metrics(http, url):
    """Hearth's /_hearth/metrics as a dict, or None (Synapse: 404)."""
    try:
        async with http.get(url + "/_hearth/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            if r.status != 200:
                return None
            text = await r.text()
    except aiohttp.ClientError:
        return None
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.partition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out if "hearth_http_requests_in_flight" in out else None


# ----------------------------------------------------------- bystanders --

class Bystanders:
    """N parked long-polls; any that returns is counted and re-parked."""

    def __init__(self, clients, since, timeout_ms):
        self.clients, self.since, self.timeout_ms = clients, list(since), timeout_ms
        self.tasks = []
        self.returns = 0          # all returns since the last reset
        self.returns_data = 0     # ... with something in them
        self.returns_timeout = 0  # ... empty, after (about) their timeout
        self.errors = 0
        self.kinds = {}
        self.last_return = time.monotonic()
        self.stopping = False

    def reset(self):
        self.returns = self.returns_data = self.returns_timeout = self.errors = 0
        self.kinds = {}  # returns with data, by section

    async def one(self, i):
        c = self.clients[i]
        while not self.stopping:
            t = time.monotonic()
            try:
                s = await c.sync(self.since[i], self.timeout_ms)
            except (aiohttp.ClientError, asyncio.TimeoutError, HSError):
                if self.stopping:
                    return
                self.errors += 1
                await asyncio.sleep(0.5)
                continue
            self.last_return = time.monotonic()
            self.returns += 1
            kinds = data_kinds(s)
            if kinds:
                self.returns_data += 1
                for k in kinds:
                    self.kinds[k] = self.kinds.get(k, 0) + 1
            elif time.monotonic() - t >= 0.9 * self.timeout_ms / 1000:
                self.returns_timeout += 1
            self.since[i] = s.get("next_batch", self.since[i])

    def start(self):
        self.tasks = [asyncio.create_task(self.one(i)) for i in range(len(self.clients))]

    async def stop(self):
        self.stopping = True
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# ------------------------------------------------------------------ phases --

async def setup(http, args, run, t0):
    pw = secrets.token_urlsafe(12)
    n = args.bystanders
    ts = time.monotonic()
    users = await gather_bounded(
        n + 2, lambda i: Client.register(http, args.url, f"wk_{run}_{i}", pw), args.concurrency)
    out = {"register_s": round(time.monotonic() - ts, 2)}
    log(t0, f"setup: registered {n + 2} users in {out['register_s']} s")
    bystanders, member, sender = users[:n], users[n], users[n + 1]

    ts = time.monotonic()
    quiet = min(args.quiet, n)

    async def quiet_room(i):
        _, r = await bystanders[i].req("POST", "/createRoom", {
            "preset": "private_chat", "name": f"quiet {i}"})
        return r["room_id"]

    await gather_bounded(quiet, quiet_room, args.concurrency)
    out["quiet_rooms"] = quiet
    out["quiet_rooms_s"] = round(time.monotonic() - ts, 2)
    log(t0, f"setup: {quiet} quiet rooms in {out['quiet_rooms_s']} s")

    _, room = await sender.req("POST", "/createRoom", {"preset": "public_chat", "name": f"busy {run}"})
    room_id = room["room_id"]
    await member.req("POST", f"/rooms/{room_id}/join", {})
    member.since = (await member.sync())["next_batch"]

    ts = time.monotonic()
    syncs = await gather_bounded(n, lambda i: bystanders[i].sync(), args.concurrency)
    since = [s["next_batch"] for s in syncs]
    out["initial_syncs_s"] = round(time.monotonic() - ts, 2)
    log(t0, f"setup: {n} initial syncs in {out['initial_syncs_s']} s")
    return bystanders, since, member, sender, room_id, out


async def measure(args, member, sender, room_id, tag, server, t0, bys=None):
    """Throughput part (M messages, member re-parking) then W wake-up rounds."""
    out = {}
    # -- (1) M messages, CPU per message ---------------------------------------
    # The member's token carries over from the previous phase. (A fresh /sync without since
    # is not used here: Synapse answers an identical request from a 2-minute response cache,
    # so the member would start behind and replay old messages one response at a time.)
    msince = member.since
    sent_ids, seen, last = set(), set(), [None]
    progress = asyncio.Event()
    member_syncs = limited = 0

    async def member_loop():
        # Runs until cancelled, once the member has seen the last message sent. A timeline
        # can be "limited" (more new events than the default timeline limit, 10): then the
        # member does not see every event ID, as a real client would not; those are counted.
        nonlocal msince, member_syncs, limited
        while True:
            s = await member.sync(msince, 30000)
            member_syncs += 1
            msince = s["next_batch"]
            room = s.get("rooms", {}).get("join", {}).get(room_id, {})
            if room.get("timeline", {}).get("limited"):
                limited += 1
            seen.update(timeline_ids(s, room_id))
            progress.set()

    latencies = []
    it = iter(range(args.messages))

    async def one_sender():
        for k in it:
            t = time.monotonic()
            eid = await sender.send(room_id, f"{run_id}-{tag}-m{k}", f"{tag} message {k}")
            latencies.append(time.monotonic() - t)
            sent_ids.add(eid)
            last[0] = eid

    if bys:
        bys.reset()
    ml = asyncio.create_task(member_loop())
    await asyncio.sleep(args.park_ms / 1000)
    s0, c0, b0, w0 = server(), own_cpu(), busy_s(), time.monotonic()
    await asyncio.gather(*(one_sender() for _ in range(args.send_concurrency)))
    # The member's delivery is part of the cost being measured: wait until it has seen the
    # last message, then drop its next (parked) poll at once instead of letting it time out.
    t_end = time.monotonic() + 60
    while last[0] not in seen and not ml.done():
        if time.monotonic() > t_end:
            ml.cancel()
            raise HSError(f"{tag}: member did not see the last of {len(sent_ids)} messages within 60 s "
                          f"(saw {len(seen & sent_ids)} of them, {member_syncs} syncs)")
        progress.clear()
        try:
            await asyncio.wait_for(progress.wait(), 1)
        except asyncio.TimeoutError:
            pass
    if ml.done():
        ml.result()  # raises the member's error
    ml.cancel()
    await asyncio.gather(ml, return_exceptions=True)
    s1, c1, b1, w1 = server(), own_cpu(), busy_s(), time.monotonic()
    cpu = s1["cpu_s"] - s0["cpu_s"]
    out["throughput"] = {
        "messages": args.messages, "send_concurrency": args.send_concurrency,
        "wall_s": round(w1 - w0, 3), "msgs_per_s": round(args.messages / (w1 - w0), 1),
        "send_latency": stats(latencies), "member_syncs": member_syncs,
        "member_limited_timelines": limited, "member_missed_events": len(sent_ids - seen),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_ms_per_msg": round(cpu * 1000 / args.messages, 3),
        "loadgen_cpu_s": round(c1 - c0, 3),
        "machine_busy_s": round(b1 - b0, 2),
        "other_cpu_s": round(max(0.0, (b1 - b0) - cpu - (c1 - c0)), 2),
    }
    if bys:
        out["throughput"]["bystander_returns"] = bys.returns
        out["throughput"]["bystander_returns_with_data"] = bys.returns_data
        out["throughput"]["bystander_returns_at_timeout"] = bys.returns_timeout
        out["throughput"]["bystander_errors"] = bys.errors
        out["throughput"]["bystander_return_sections"] = dict(bys.kinds)
        r_tp = (bys.returns, bys.returns_data, bys.returns_timeout, bys.errors)
        bys.reset()
    log(t0, f"{tag}: {args.messages} messages in {w1 - w0:.1f} s, "
            f"server CPU {cpu * 1000 / args.messages:.2f} ms/msg"
            + (f", bystander returns {r_tp[0]}" if bys else ""))

    # -- (2) W wake-ups ---------------------------------------------------------
    since = msince  # caught up: the member has seen the last message
    wl, early, early_kinds = [], 0, {}
    s0, c0 = server(), own_cpu()
    for k in range(args.wakeups):
        parked = asyncio.create_task(member.sync(since, 30000))
        await asyncio.sleep(args.park_ms / 1000)
        eid = await sender.send(room_id, f"{run_id}-{tag}-w{k}", f"{tag} wake {k}")
        t_200 = time.monotonic()
        s = await parked
        while eid not in timeline_ids(s, room_id):
            early += 1
            for kd in data_kinds(s) or ["empty"]:
                early_kinds[kd] = early_kinds.get(kd, 0) + 1
            if time.monotonic() - t_200 > 60:
                raise HSError(f"{tag}: event {eid} not delivered by /sync within 60 s")
            s = await member.sync(s["next_batch"], 30000)
        wl.append(time.monotonic() - t_200)
        since = s["next_batch"]
    member.since = since
    s1, c1 = server(), own_cpu()
    cpu = s1["cpu_s"] - s0["cpu_s"]
    out["wakeup"] = {
        "rounds": args.wakeups, "park_ms": args.park_ms, "latency": stats(wl),
        "member_syncs_without_event": early, "member_syncs_without_event_sections": early_kinds,
        "server_cpu_s": round(cpu, 3),
        "server_cpu_ms_per_msg": round(cpu * 1000 / max(1, args.wakeups), 3),
        "loadgen_cpu_s": round(c1 - c0, 3),
    }
    if bys:
        out["wakeup"]["bystander_returns"] = bys.returns
        out["wakeup"]["bystander_returns_with_data"] = bys.returns_data
        out["wakeup"]["bystander_returns_at_timeout"] = bys.returns_timeout
        out["wakeup"]["bystander_errors"] = bys.errors
        out["wakeup"]["bystander_return_sections"] = dict(bys.kinds)
        out["bystander_returns"] = r_tp[0] + bys.returns
        out["bystander_returns_with_data"] = r_tp[1] + bys.returns_data
        out["bystander_returns_at_timeout"] = r_tp[2] + bys.returns_timeout
        out["bystander_errors"] = r_tp[3] + bys.errors
    log(t0, f"{tag}: {args.wakeups} wake-ups, p50 {out['wakeup']['latency']['p50_ms']} ms, "
            f"p90 {out['wakeup']['latency']['p90_ms']} ms"
            + (f", bystander returns {bys.returns}" if bys else ""))
    return out


async def park(http, args, bys, server, t0):
    """Open the N bystander polls and wait until they are all parked."""
    out = {}
    m0 = await metrics(http, args.url)
    idle = m0["hearth_http_requests_in_flight"] if m0 else None
    out["metrics_idle"] = m0
    ts = time.monotonic()
    c0 = server()["cpu_s"]
    bys.start()
    deadline = ts + args.park_deadline_s
    while SENT["n"] < len(bys.clients) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    out["headers_sent"] = SENT["n"]
    out["all_sent_s"] = round(time.monotonic() - ts, 2)
    log(t0, f"park: {SENT['n']} requests written in {out['all_sent_s']} s")
    target = None if idle is None else idle + len(bys.clients)
    gauge = None
    if target is not None:
        while time.monotonic() < deadline:
            gauge = (await metrics(http, args.url))["hearth_http_requests_in_flight"]
            if gauge >= target:
                break
            await asyncio.sleep(0.05)
        out["in_flight_target"], out["in_flight"] = target, gauge
    # Settle: CPU quiet (< 2% of a core over 1 s) and no bystander return for SETTLE_QUIET_S.
    while time.monotonic() < deadline:
        a = server()["cpu_s"]
        await asyncio.sleep(1.0)
        quiet = server()["cpu_s"] - a < 0.02
        if quiet and time.monotonic() - bys.last_return >= args.settle_quiet_s \
                and time.monotonic() - ts >= args.settle_quiet_s:
            break
    out["settled_s"] = round(time.monotonic() - ts, 2)
    out["server_cpu_to_park_s"] = round(server()["cpu_s"] - c0, 3)
    out["returns_while_parking"] = bys.returns
    out["returns_while_parking_with_data"] = bys.returns_data
    out["errors_while_parking"] = bys.errors
    out["return_sections_while_parking"] = dict(bys.kinds)
    if target is not None:
        m = await metrics(http, args.url)
        out["in_flight_after_settle"] = m["hearth_http_requests_in_flight"]
        out["connections_after_settle"] = m.get("hearth_http_connections")
        out["all_parked"] = m["hearth_http_requests_in_flight"] >= target
    else:
        out["all_parked"] = None if SENT["n"] >= len(bys.clients) else False
    log(t0, f"park: settled after {out['settled_s']} s (all parked: {out['all_parked']}, "
            f"in flight {out.get('in_flight_after_settle')}, returns while parking {bys.returns})")
    return out


SENT = {"n": 0}
run_id = secrets.token_hex(3)


async def main(args):
    t0 = time.monotonic()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.bystanders + 200
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want), hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < want:
        raise HSError(f"RLIMIT_NOFILE {soft} < {want}: raise ulimit -n")

    def server():
        return {"cpu_s": proc_cpu(args.pid), **proc_mem(args.pid)}

    out = {"url": args.url, "bystanders": args.bystanders, "quiet_rooms": min(args.quiet, args.bystanders),
           "messages": args.messages, "wakeups": args.wakeups, "send_concurrency": args.send_concurrency,
           "park_ms": args.park_ms, "bystander_timeout_ms": args.bystander_timeout_ms,
           "rlimit_nofile": soft, "server_start": server()}

    trace = aiohttp.TraceConfig()

    async def on_sent(session, ctx, params):
        if "/sync?" in str(params.url) and f"timeout={args.bystander_timeout_ms}" in str(params.url):
            SENT["n"] += 1

    trace.on_request_headers_sent.append(on_sent)
    connector = aiohttp.TCPConnector(ssl=False if args.insecure else None, limit=0,
                                     limit_per_host=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as http:
        byst, since, member, sender, room_id, out["setup"] = await setup(http, args, run_id, t0)
        out["room_id"] = room_id
        out["server_after_setup"] = server()
        await asyncio.sleep(1.0)  # let the setup's aftermath settle

        out["A"] = await measure(args, member, sender, room_id, "A", server, t0)
        out["server_after_A"] = server()

        bys = Bystanders(byst, since, args.bystander_timeout_ms)
        try:
            out["park"] = await park(http, args, bys, server, t0)
            out["server_parked"] = server()
            if args.bystanders and out["park"]["all_parked"] is False:
                raise HSError(f"not all {args.bystanders} polls parked: {out['park']}")
            out["B"] = await measure(args, member, sender, room_id, "B", server, t0, bys)
            out["server_after_B"] = server()
            if args.bystanders:
                m = await metrics(http, args.url)
                if m:
                    out["B"]["in_flight_at_end"] = m["hearth_http_requests_in_flight"]
        finally:
            await bys.stop()
        out["ratelimited_429s"] = sum(c.ratelimited for c in byst + [member, sender])

    a, b = out["A"], out["B"]
    ca, cb = a["throughput"]["server_cpu_ms_per_msg"], b["throughput"]["server_cpu_ms_per_msg"]
    pa, pb = a["wakeup"]["latency"]["p50_ms"], b["wakeup"]["latency"]["p50_ms"]
    out["result"] = {
        "cpu_ms_per_msg_A": ca, "cpu_ms_per_msg_B": cb,
        "cpu_ratio_B_over_A": round(cb / ca, 2) if ca else None,
        "wake_p50_ms_A": pa, "wake_p50_ms_B": pb,
        "wake_p90_ms_A": a["wakeup"]["latency"]["p90_ms"], "wake_p90_ms_B": b["wakeup"]["latency"]["p90_ms"],
        "wake_p50_ratio_B_over_A": round(pb / pa, 2) if pa else None,
        "bystander_returns_B": b.get("bystander_returns"),
        "bystander_returns_B_with_data": b.get("bystander_returns_with_data"),
        "cpu_within_1_5x": bool(ca and cb / ca <= 1.5),
        "rss_mib": {k: out[f"server_{k}"]["VmRSS"] for k in ("start", "after_setup", "after_A", "parked", "after_B")},
    }
    out["total_s"] = round(time.monotonic() - t0, 1)
    return out


def summary(r):
    x = r["result"]
    return (f"CPU/msg A {x['cpu_ms_per_msg_A']} ms, B {x['cpu_ms_per_msg_B']} ms "
            f"(B/A {x['cpu_ratio_B_over_A']}x) | wake-up p50 A {x['wake_p50_ms_A']} ms, "
            f"B {x['wake_p50_ms_B']} ms; p90 A {x['wake_p90_ms_A']}, B {x['wake_p90_ms_B']} ms | "
            f"bystander returns in B {x['bystander_returns_B']} | RSS {x['rss_mib']} | {r['total_s']} s")


def parse_args(argv=None):
    e = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--insecure", action="store_true", help="don't verify TLS certificates")
    p.add_argument("--pid", type=int, required=True, help="server PID (/proc: CPU and RSS)")
    p.add_argument("--bystanders", "-n", type=int, default=int(e("WK_N", 1000)))
    p.add_argument("--quiet", type=int, default=int(e("WK_QUIET", 100)),
                   help="bystanders that get a quiet room of their own")
    p.add_argument("--messages", "-m", type=int, default=int(e("WK_M", 200)))
    p.add_argument("--wakeups", "-w", type=int, default=int(e("WK_W", 50)))
    p.add_argument("--send-concurrency", type=int, default=int(e("WK_SEND_CONC", 1)))
    p.add_argument("--concurrency", type=int, default=int(e("WK_SETUP_CONC", 16)),
                   help="registrations / room creations / initial syncs at a time")
    p.add_argument("--park-ms", type=int, default=int(e("WK_PARK_MS", 100)))
    p.add_argument("--bystander-timeout-ms", type=int, default=int(e("WK_BYSTANDER_TIMEOUT_MS", 240000)))
    p.add_argument("--settle-quiet-s", type=float, default=float(e("WK_SETTLE_S", 6)))
    p.add_argument("--park-deadline-s", type=float, default=120)
    args = p.parse_args(argv)
    args.url = args.url.rstrip("/")
    args.send_concurrency = max(1, args.send_concurrency)
    return args


def run_cli(main_fn, args, prog):
    """Run a benchmark's async main, print its result as JSON on stdout and return it; a
    homeserver error ends the process with a one-line message instead of a traceback."""
    try:
        result = asyncio.run(main_fn(args))
    except HSError as e:
        sys.exit(f"{prog}: homeserver error: {e}")
    json.dump(result, sys.stdout, indent=2)
    print()
    return result


if __name__ == "__main__":
    print(summary(run_cli(main, parse_args(), "wakeups.py")), file=sys.stderr)
