#!/usr/bin/env python3
"""Search latency of a Matrix homeserver over N messages (client-server API only).

Phases:
  load     one user creates ROOMS rooms and sends N m.room.message events into them
           (CONC concurrent senders; bodies from a seeded generator, identical for every
           server): msgs/s.
  search   for each planted term (rare: 1 in 10,000 messages; medium: 1 in 100; frequent:
           1 in 10) and each order (rank, recent), QUERIES sequential POST /search with the
           default page (10 results): p50/p90/mean latency, results and count seen, and, with
           --pid, the server's CPU per search (/proc/PID/stat utime+stime).
  pages    PAGES pages of the frequent term in `recent` order following next_batch.

Output: a JSON document on stdout, one summary line per measurement on stderr.

Resumable loads (for Synapse, whose client-API load takes hours at 100,000): with --state FILE
the user's token, the rooms and the number of messages loaded so far (a contiguous prefix of the
seeded sequence) are kept in FILE, and a later run with the same FILE and server picks up where
the last stopped. Message i always has transaction id m{i} from the same access token, so a
message sent twice around an interruption is deduplicated by the server. --phase load stops
after loading (--load-until EPOCH stops it early, at a clean prefix); --phase search only
searches what FILE says is loaded, with the planted counts expected for that many messages.

  /tmp/hearth-pyvenv/bin/python bench/search.py --url http://127.0.0.1:8008 --messages 100000 --pid PID
"""

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import time
import urllib.parse

import aiohttp

from benchutil import cpu_s, pct

CLIENT = "/_matrix/client/v3"
TERMS = {"rare": ("zephyrine", 10_000), "medium": ("harbour", 100), "frequent": ("lantern", 10)}


def ms(x):
    return None if x is None else round(x * 1000, 2)


def vocabulary(rng, n=3000):
    """Pseudo-words of 3-9 letters, none of them a planted term or a prefix of one."""
    planted = [t for t, _ in TERMS.values()]
    words = set()
    while len(words) < n:
        w = "".join(rng.choice("abcdefghijklmnoprstuvwy") for _ in range(rng.randint(3, 9)))
        if not any(p.startswith(w) or w.startswith(p) for p in planted):
            words.add(w)
    return sorted(words)


def body(i, rng, vocab):
    words = [rng.choice(vocab) for _ in range(rng.randint(6, 14))]
    for term, every in TERMS.values():
        if i % every == every // 2:
            words.insert(rng.randrange(len(words) + 1), term)
    return " ".join(words)


async def call(session, method, url, token=None, body=None, ssl=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.request(method, url, json=body, headers=headers, ssl=ssl) as r:
        data = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"{method} {url} -> {r.status} {data}")
        return data


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--rooms", type=int, default=4)
    p.add_argument("--conc", type=int, default=16)
    p.add_argument("--queries", type=int, default=30, help="searches per term and order")
    p.add_argument("--pages", type=int, default=10)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--pid", type=int)
    p.add_argument("--state", help="JSON file keeping token, rooms and messages loaded (resume)")
    p.add_argument("--phase", choices=("all", "load", "search"), default="all")
    p.add_argument("--load-until", type=float, help="stop loading at this Unix time")
    a = p.parse_args()
    ssl = False if a.insecure else None
    base = a.url.rstrip("/") + CLIENT
    out = {"messages": a.messages, "rooms": a.rooms, "queries": a.queries}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=a.conc + 4)) as s:
        st = None
        if a.state and os.path.exists(a.state):
            with open(a.state) as f:
                st = json.load(f)
            if st["url"] != a.url or st["rooms"] != a.rooms or st["seed"] != a.seed:
                raise SystemExit(f"{a.state} is for {st['url']} ({st['rooms']} rooms, seed {st['seed']})")
        if st is None:
            name = "searcher" + secrets.token_hex(4)
            reg = await call(s, "POST", f"{base}/register", body={
                "username": name, "password": "bench-" + name, "auth": {"type": "m.login.dummy"}}, ssl=ssl)
            st = {"url": a.url, "rooms": a.rooms, "seed": a.seed, "token": reg["access_token"], "loaded": 0}
            st["room_ids"] = [
                (await call(s, "POST", f"{base}/createRoom", st["token"], {"name": f"bench {i}"}, ssl=ssl))["room_id"]
                for i in range(a.rooms)
            ]
        tok, rooms = st["token"], st["room_ids"]

        def save_state():
            if a.state:
                with open(a.state + ".tmp", "w") as f:
                    json.dump(st, f)
                os.replace(a.state + ".tmp", a.state)

        save_state()
        # ---- load
        rng = random.Random(a.seed)
        vocab = vocabulary(rng)
        bodies = [body(i, rng, vocab) for i in range(a.messages)]
        start = nxt = st["loaded"]
        done = set()
        t0, c0 = time.monotonic(), cpu_s(a.pid)
        last_save = t0

        async def sender():
            nonlocal nxt, last_save
            while nxt < a.messages and not (a.load_until and time.time() >= a.load_until):
                i = nxt
                nxt += 1
                room = rooms[i % len(rooms)]
                await call(s, "PUT", f"{base}/rooms/{room}/send/m.room.message/m{i}", tok,
                           {"msgtype": "m.text", "body": bodies[i]}, ssl=ssl)
                done.add(i)
                while st["loaded"] in done:  # advance the contiguous prefix
                    done.discard(st["loaded"])
                    st["loaded"] += 1
                if time.monotonic() - last_save > 10:
                    last_save = time.monotonic()
                    save_state()
                if i and i % 10_000 == 0:
                    print(f"  loaded {i} ({(i - start) / (time.monotonic() - t0):.1f} msgs/s)", file=sys.stderr)

        if a.phase != "search":
            await asyncio.gather(*(sender() for _ in range(a.conc)))
        save_state()
        sent = st["loaded"] - start
        dt = time.monotonic() - t0
        out["messages"] = st["loaded"]
        out["load"] = {"sent_this_run": sent, "seconds": round(dt, 1), "msgs_per_s": round(sent / dt, 1)}
        if a.pid and sent:
            out["load"]["server_cpu_ms_per_msg"] = round((cpu_s(a.pid) - c0) * 1000 / sent, 3)
        print(f"load: {sent} messages in {dt:.1f} s ({sent / dt:.1f} msgs/s), {st['loaded']} loaded",
              file=sys.stderr)
        if a.phase == "load":
            json.dump(out, sys.stdout, indent=1)
            print()
            return
        n_loaded = st["loaded"]
        await asyncio.sleep(2)  # let background work (Synapse's search index update) settle

        # ---- search
        out["search"] = {}
        for label, (term, every) in TERMS.items():
            for order in ("rank", "recent"):
                lat, counts, nres = [], set(), set()
                c0 = cpu_s(a.pid)
                for _ in range(a.queries):
                    t = time.monotonic()
                    r = await call(s, "POST", f"{base}/search", tok, {"search_categories": {
                        "room_events": {"search_term": term, "order_by": order}}}, ssl=ssl)
                    lat.append(time.monotonic() - t)
                    ev = r["search_categories"]["room_events"]
                    counts.add(ev.get("count"))
                    nres.add(len(ev.get("results", [])))
                m = {
                    "term": term, "expected": sum(1 for i in range(n_loaded) if i % every == every // 2),
                    "count": sorted(counts, key=str), "results_per_page": sorted(nres),
                    "p50_ms": ms(pct(lat, 50)), "p90_ms": ms(pct(lat, 90)),
                    "mean_ms": ms(sum(lat) / len(lat)),
                }
                if a.pid:
                    m["server_cpu_ms_per_search"] = round((cpu_s(a.pid) - c0) * 1000 / a.queries, 2)
                out["search"][f"{label}/{order}"] = m
                print(f"search {label:8} {order:6}: p50 {m['p50_ms']} ms, p90 {m['p90_ms']} ms, "
                      f"count {m['count']}, cpu {m.get('server_cpu_ms_per_search')} ms", file=sys.stderr)

        # ---- pages
        term = TERMS["frequent"][0]
        lat, seen, batch = [], [], None
        for _ in range(a.pages):
            t = time.monotonic()
            q = f"?next_batch={urllib.parse.quote(batch, safe='')}" if batch else ""
            r = await call(s, "POST", f"{base}/search{q}", tok, {"search_categories": {
                "room_events": {"search_term": term, "order_by": "recent"}}}, ssl=ssl)
            lat.append(time.monotonic() - t)
            ev = r["search_categories"]["room_events"]
            seen += [x["result"]["event_id"] for x in ev.get("results", [])]
            batch = ev.get("next_batch")
            if not batch:
                break
        out["pages"] = {"pages": len(lat), "results": len(seen), "distinct": len(set(seen)),
                        "p50_ms": ms(pct(lat, 50)), "max_ms": ms(max(lat))}
        print(f"pages: {len(lat)} pages, {len(seen)} results ({len(set(seen))} distinct), "
              f"p50 {out['pages']['p50_ms']} ms", file=sys.stderr)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    asyncio.run(main())
