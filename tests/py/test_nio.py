"""Client-library interop test: drive a homeserver with matrix-nio.

Environment:
  HEARTH_URL       homeserver base URL, e.g. http://127.0.0.1:8008 (required)
  HEARTH_INSECURE  "1" to skip TLS certificate verification (self-signed peers)

Run:  tests/py/setup.sh && HEARTH_URL=... /tmp/hearth-pyvenv/bin/pytest -v tests/py

The scenario is one end-to-end flow (two users, a room, an invite, a message
delivered through a parked long-poll /sync, logout).  Each step checks the
server's answer, so any step the server gets wrong fails the test there.
"""

import asyncio
import json
import os
import secrets
import time

import pytest
from nio import (
    AsyncClient,
    AsyncClientConfig,
    InviteMemberEvent,
    InviteNameEvent,
    JoinResponse,
    LoginError,
    LoginResponse,
    LogoutResponse,
    RegisterResponse,
    RoomCreateResponse,
    RoomGetStateEventResponse,
    RoomInviteResponse,
    RoomMemberEvent,
    RoomMessageText,
    RoomNameEvent,
    RoomSendResponse,
    RoomTopicEvent,
    SyncResponse,
    WhoamiError,
    WhoamiResponse,
)

URL = os.environ.get("HEARTH_URL", "").rstrip("/")
SSL = False if os.environ.get("HEARTH_INSECURE") == "1" else None
# nio retries timeouts and 429s forever by default; a broken server must fail
# the test instead of hanging it.
CONFIG = AsyncClientConfig(max_timeouts=2, max_limit_exceeded=3, request_timeout=60)
LONGPOLL_MS = 30000

pytestmark = pytest.mark.skipif(not URL, reason="set HEARTH_URL to the homeserver base URL")


def client(user: str = "") -> AsyncClient:
    return AsyncClient(URL, user, config=CONFIG, ssl=SSL)


async def raw(c: AsyncClient, method: str, path: str, body=None):
    """A request outside nio's typed API: returns (status, parsed JSON)."""
    headers = {"Content-Type": "application/json"}
    if c.access_token:
        headers["Authorization"] = f"Bearer {c.access_token}"
    data = None if body is None else json.dumps(body)
    resp = await c.send(method, path, data, headers)
    return resp.status, await resp.json(content_type=None)


async def register(localpart: str, password: str) -> str:
    """Register through the spec's UIA flow, return the full user ID.

    nio's `register()` sends m.login.dummy without a session, which only
    works if the server starts a session implicitly.  A strict server wants
    the 401 round trip first, so do that by hand and then let nio finish
    the dummy stage with the session ID the server handed out.
    """
    c = client()
    try:
        status, body = await raw(
            c, "POST", "/_matrix/client/v3/register",
            {"username": localpart, "password": password},
        )
        assert status == 401, f"register without auth: expected 401 UIA, got {status} {body}"
        assert body.get("session"), f"401 has no session: {body}"
        stages = [f.get("stages") for f in body.get("flows", [])]
        assert ["m.login.dummy"] in stages, f"no single-stage m.login.dummy flow: {body}"

        resp = await c.register(localpart, password, device_name="nio-test",
                                session_token=body["session"])
        assert isinstance(resp, RegisterResponse), f"register {localpart}: {resp}"
        assert resp.user_id.startswith(f"@{localpart}:"), resp.user_id
        assert resp.access_token and resp.device_id, resp
        return resp.user_id
    finally:
        await c.close()


async def login(user_id: str, password: str) -> AsyncClient:
    c = client(user_id)
    resp = await c.login(password, device_name="nio-test-login")
    assert isinstance(resp, LoginResponse), f"login {user_id}: {resp}"
    assert resp.user_id == user_id, (resp.user_id, user_id)
    assert resp.access_token and resp.device_id, resp
    who = await c.whoami()
    assert isinstance(who, WhoamiResponse) and who.user_id == user_id, who
    return c


async def sync(c: AsyncClient, since, timeout_ms: int = 0) -> SyncResponse:
    resp = await c.sync(timeout=timeout_ms, since=since)
    assert isinstance(resp, SyncResponse), f"sync: {resp}"
    assert resp.next_batch, "sync returned no next_batch"
    return resp


async def sync_until(c: AsyncClient, since, found, deadline_s: float = 20.0):
    """Sync (long-poll) from `since` until `found(resp)` is truthy.

    Returns (value, next_batch).  Fails if the server never delivers it.
    """
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        resp = await sync(c, since, timeout_ms=2000)
        value = found(resp)
        since = resp.next_batch
        if value:
            return value, since
    pytest.fail(f"not seen in /sync within {deadline_s}s")


# Events are checked through nio's typed event classes (what a nio client
# sees).  Don't inspect `.source` instead: nio pops "content" out of it for
# some event types.

def timeline(resp: SyncResponse, room_id: str) -> list:
    room = resp.rooms.join.get(room_id)
    return list(room.timeline.events) if room else []


def room_state(resp: SyncResponse, room_id: str) -> list:
    """State + timeline events for room_id in this response."""
    room = resp.rooms.join.get(room_id)
    return list(room.state) + list(room.timeline.events) if room else []


async def scenario():
    run = secrets.token_hex(4)
    pw_a, pw_b = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    name, topic = f"Hearth interop {run}", f"topic {run}"

    # -- two users: register (UIA dummy), then password login -------------
    id_a = await register(f"niotest_a_{run}", pw_a)
    id_b = await register(f"niotest_b_{run}", pw_b)
    assert id_a != id_b

    bad = client(id_a)
    wrong = await bad.login("not-" + pw_a)
    await bad.close()
    assert isinstance(wrong, LoginError), f"login with wrong password succeeded: {wrong}"
    assert wrong.status_code == "M_FORBIDDEN", wrong

    a = await login(id_a, pw_a)
    b = await login(id_b, pw_b)
    try:
        # Initial syncs give us since tokens.
        b_since = (await sync(b, None)).next_batch

        # -- A creates a room with name + topic and invites B -------------
        created = await a.room_create(name=name, topic=topic)
        assert isinstance(created, RoomCreateResponse), f"createRoom: {created}"
        room_id = created.room_id
        assert room_id.startswith("!"), room_id

        invited = await a.room_invite(room_id, id_b)
        assert isinstance(invited, RoomInviteResponse), f"invite: {invited}"

        # -- B sees the invite (with stripped state) through /sync --------
        def invite_of(resp):
            info = resp.rooms.invite.get(room_id)
            return list(info.invite_state) if info else None

        invite_state, b_since = await sync_until(b, b_since, invite_of)
        me = [e for e in invite_state
              if isinstance(e, InviteMemberEvent) and e.state_key == id_b]
        assert me and me[0].membership == "invite", invite_state
        assert me[0].sender == id_a, me
        names = [e.name for e in invite_state if isinstance(e, InviteNameEvent)]
        assert names == [name], f"invite_state lacks m.room.name: {invite_state}"

        # -- B joins; its next sync shows the room with name/topic --------
        joined = await b.join(room_id)
        assert isinstance(joined, JoinResponse) and joined.room_id == room_id, joined

        def joined_state(resp):
            return room_state(resp, room_id) or None

        state, b_since = await sync_until(b, b_since, joined_state)
        assert [e.name for e in state if isinstance(e, RoomNameEvent)] == [name], state
        assert [e.topic for e in state if isinstance(e, RoomTopicEvent)] == [topic], state
        me = [e.membership for e in state
              if isinstance(e, RoomMemberEvent) and e.state_key == id_b]
        assert me and me[-1] == "join", state
        # nio's room model, built from that sync, agrees.
        assert room_id in b.rooms, "nio did not record the joined room"
        assert b.rooms[room_id].name == name and b.rooms[room_id].topic == topic
        assert id_a in b.rooms[room_id].users and id_b in b.rooms[room_id].users
        # And the state API.
        got = await b.room_get_state_event(room_id, "m.room.topic")
        assert isinstance(got, RoomGetStateEventResponse), got
        assert got.content.get("topic") == topic, got.content

        # -- wake-up: B parks a long-poll sync, then A sends a message ----
        body = f"hello from A {run}"
        parked = asyncio.create_task(sync(b, b_since, timeout_ms=LONGPOLL_MS))
        await asyncio.sleep(0.5)  # let the request reach the server and park
        sent = await a.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body})
        assert isinstance(sent, RoomSendResponse), f"send: {sent}"
        assert sent.event_id.startswith("$"), sent.event_id
        t_sent = time.monotonic()

        def message_of(resp):
            return [e for e in timeline(resp, room_id) if e.event_id == sent.event_id]

        resp = await parked
        woke_after = time.monotonic() - t_sent
        # New data must wake the parked request promptly, not at the end of
        # its 30 s timeout.  (It may also have returned earlier for something
        # else, e.g. presence; then woke_after is small or negative.)
        assert woke_after < 5, f"parked /sync returned {woke_after:.1f}s after the send"
        got_msg = message_of(resp)
        if not got_msg:
            got_msg, _ = await sync_until(b, resp.next_batch, message_of)
        ev = got_msg[0]
        assert isinstance(ev, RoomMessageText), f"not parsed as m.text: {ev}"
        assert ev.sender == id_a and ev.body == body, ev

        # -- logout: the token stops working -------------------------------
        token = a.access_token
        out = await a.logout()
        assert isinstance(out, LogoutResponse), f"logout: {out}"
        a.access_token = token  # nio clears it; put it back to prove it is dead
        who = await a.whoami()
        assert isinstance(who, WhoamiError), f"token still valid after logout: {who}"
        assert who.status_code == "M_UNKNOWN_TOKEN", who
    finally:
        await a.close()
        await b.close()


def test_nio_two_users_invite_join_message():
    asyncio.run(scenario())
