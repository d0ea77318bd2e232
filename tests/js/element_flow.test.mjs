// Client-library interop test: drive a homeserver with matrix-js-sdk, the SDK Element Web is
// built on, making the calls Element makes, in the order it makes them.
//
// Environment:
//   HEARTH_URL          homeserver base URL, e.g. http://127.0.0.1:8008 (required; skipped without)
//   HEARTH_JS_TIMEOUT   ms to wait for any one thing the server should deliver (default 10000)
//   HEARTH_JS_VERBOSE   "1" to print the SDK's own debug log
//
// Run:  tests/js/setup.sh && HEARTH_URL=http://127.0.0.1:8008 node --test tests/js/
//
// One scenario, two users, a step per test. A step whose prerequisite failed is skipped (and
// says which), so the first failure is the one to read. Every wait is bounded, so a server that
// never delivers something fails the step instead of hanging the run. At the end the test
// prints every non-2xx response the SDK got (method, path, status, errcode): some are expected
// from a server without E2EE, presence, media or VoIP; the test fails only on ones listed in
// UNEXPECTED_HTTP_ERRORS below.

import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";

import {
    ClientEvent,
    createClient,
    EventType,
    MsgType,
    Preset,
    RoomEvent,
    RoomMemberEvent,
    SyncState,
} from "matrix-js-sdk";

const URL_BASE = (process.env.HEARTH_URL ?? "").replace(/\/+$/, "");
const TIMEOUT = Number(process.env.HEARTH_JS_TIMEOUT ?? 10000);
const VERBOSE = process.env.HEARTH_JS_VERBOSE === "1";
// Each SDK request (other than /sync, which sets its own) is aborted after this; each step fails
// after STEP_TIMEOUT. A server that accepts and never answers fails the run instead of hanging it.
const REQUEST_TIMEOUT = TIMEOUT * 3;
const STEP_TIMEOUT = TIMEOUT * 6;

// ---------------------------------------------------------------------------------------------
// The SDK logs through `loglevel` at DEBUG straight to the console (looking the console methods
// up at call time). Keep warnings and errors for the summary, drop the rest unless verbose.
const out = { log: console.log.bind(console), error: console.error.bind(console) };
const sdkWarnings = [];
for (const level of ["debug", "info", "log", "trace"]) {
    console[level] = VERBOSE ? console[level].bind(console) : () => {};
}
for (const level of ["warn", "error"]) {
    const orig = console[level].bind(console);
    console[level] = (...args) => {
        const text = args
            .map((a) => (a instanceof Error ? `${a.name}: ${a.message}` : typeof a === "string" ? a : safeJson(a)))
            .join(" ");
        sdkWarnings.push(`${level}: ${text}`);
        if (VERBOSE) orig(...args);
    };
}
function safeJson(v) {
    try {
        return JSON.stringify(v);
    } catch {
        return String(v);
    }
}

// ---------------------------------------------------------------------------------------------
// matrix-js-sdk's timeoutSignal() ponyfill arms a setTimeout for every request (80 s, 110 s for
// /sync) and never clears it; in a browser that is harmless, in Node it keeps the process alive
// for up to 110 s after the last request. Unref those timers (and the REQUEST_TIMEOUT ones it
// arms for us): an in-flight request's socket keeps the process alive anyway. This file's own
// waits use realSetTimeout and stay ref'd.
const realSetTimeout = globalThis.setTimeout;
globalThis.setTimeout = function (fn, ms, ...args) {
    const t = realSetTimeout(fn, ms, ...args);
    if (ms >= 60000 || ms === REQUEST_TIMEOUT) t?.unref?.();
    return t;
};

// ---------------------------------------------------------------------------------------------
// Every HTTP response the SDK gets passes through this fetch; non-2xx ones are recorded.
const httpErrors = [];
function recordingFetch(who) {
    return async (input, init = {}) => {
        const url = new URL(typeof input === "string" ? input : input.url ?? String(input));
        const method = (init.method ?? (typeof input === "object" && input.method) ?? "GET").toUpperCase();
        let res;
        try {
            res = await fetch(input, init);
        } catch (e) {
            if (e?.name !== "AbortError") {
                httpErrors.push({ who, method, path: url.pathname, status: `network error: ${e?.message}`, errcode: "" });
            }
            throw e;
        }
        if (!res.ok) {
            let errcode = "";
            try {
                const body = await res.clone().json();
                errcode = body?.errcode ?? "";
                // The UIA 401 carries no errcode; name it by its session instead.
                if (!errcode && res.status === 401 && body?.session) errcode = "(UIA: flows + session)";
            } catch {
                errcode = "(non-JSON body)";
            }
            httpErrors.push({ who, method, path: url.pathname, status: res.status, errcode });
        }
        return res;
    };
}

// Non-2xx responses that are NOT acceptable from a server that only lacks E2EE/presence/media/
// VoIP: the SDK's core sync/room calls must never fail. Anything matching fails the last step.
const UNEXPECTED_HTTP_ERRORS = [
    /\/sync$/,
    /\/user\/[^/]+\/filter/,
    /\/pushrules\/?$/,
    /\/capabilities$/,
    /\/rooms\/[^/]+\/(messages|members|send|state|receipt|typing|redact|leave|invite|join|read_markers)/,
    /\/join\//,
    /\/createRoom$/,
    /\/profile\//,
];

// ---------------------------------------------------------------------------------------------
// Bounded waiting: resolve when `check()` is truthy, re-checking after each listed emitter event.
// `check` gets the event's arguments (none for the initial check).
function waitUntil(what, on, check, ms = TIMEOUT) {
    const p = new Promise((resolve, reject) => {
        const listeners = [];
        let done = false;
        const finish = (fn, v) => {
            if (done) return;
            done = true;
            clearTimeout(timer);
            for (const [em, ev, f] of listeners) em.off(ev, f);
            fn(v);
        };
        const attempt = (...args) => {
            try {
                const v = check(...args);
                if (v) finish(resolve, v);
            } catch (e) {
                finish(reject, e);
            }
        };
        const timer = realSetTimeout(
            () => finish(reject, new Error(`timed out after ${ms} ms waiting for ${what}`)),
            ms,
        );
        for (const [em, ev] of on) {
            const f = (...a) => attempt(...a);
            em.on(ev, f);
            listeners.push([em, ev, f]);
        }
        attempt();
    });
    p.catch(() => {}); // awaited later; don't let Node call it unhandled meanwhile
    return p;
}

function withTimeout(promise, what, ms = TIMEOUT) {
    let timer;
    return Promise.race([
        promise.finally(() => clearTimeout(timer)),
        new Promise((_, reject) => {
            timer = realSetTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
        }),
    ]);
}

const bodyOf = (ev) => ev?.getContent()?.body;
const timelineEvents = (room) => room.getLiveTimeline().getEvents();
const findByBody = (room, body) => timelineEvents(room).filter((e) => bodyOf(e) === body);

// ---------------------------------------------------------------------------------------------
// Element's account and session steps.

// Registration as Element's InteractiveAuth does it: the first request (no `auth`) is answered
// 401 with the flows and a session; the client completes m.login.dummy with that session.
async function register(username, password) {
    const anon = createClient({
        baseUrl: URL_BASE,
        localTimeoutMs: REQUEST_TIMEOUT,
        fetchFn: recordingFetch(`register ${username}`),
    });
    const params = { username, password, initial_device_display_name: "hearth js-sdk test (register)" };
    let uia;
    try {
        await anon.registerRequest(params);
        assert.fail("the first /register without auth must be answered 401 with a UIA session");
    } catch (e) {
        if (e?.code === "ERR_ASSERTION") throw e;
        assert.equal(e.httpStatus, 401, `first /register: expected 401 UIA, got ${e.httpStatus} ${e.message}`);
        uia = e.data;
    }
    assert.equal(typeof uia?.session, "string", `401 body has a session: ${safeJson(uia)}`);
    assert.ok(Array.isArray(uia.flows), `401 body has flows: ${safeJson(uia)}`);
    assert.ok(
        uia.flows.some((f) => f.stages?.length === 1 && f.stages[0] === "m.login.dummy"),
        `a flow of just m.login.dummy is offered: ${safeJson(uia.flows)}`,
    );
    const res = await anon.registerRequest({ ...params, auth: { type: "m.login.dummy", session: uia.session } });
    assert.match(res.user_id, new RegExp(`^@${username}:`), `registered user_id: ${safeJson(res)}`);
    assert.equal(typeof res.access_token, "string");
    assert.equal(typeof res.device_id, "string");
    return res;
}

// Element's password login: GET /login for the flows, then m.login.password with an m.id.user
// identifier and a device display name.
async function login(username, password) {
    const anon = createClient({
        baseUrl: URL_BASE,
        localTimeoutMs: REQUEST_TIMEOUT,
        fetchFn: recordingFetch(`login ${username}`),
    });
    const flows = await anon.loginFlows();
    assert.ok(
        flows.flows.some((f) => f.type === "m.login.password"),
        `m.login.password offered: ${safeJson(flows)}`,
    );
    const res = await anon.login("m.login.password", {
        identifier: { type: "m.id.user", user: username },
        password,
        initial_device_display_name: "hearth js-sdk test",
    });
    assert.match(res.user_id, new RegExp(`^@${username}:`));
    assert.equal(typeof res.access_token, "string");
    assert.equal(typeof res.device_id, "string");
    return res;
}

const allClients = [];

// The client as Element builds it (timelineSupport on) and started with Element's options.
async function startSyncedClient(who, session) {
    const client = createClient({
        baseUrl: URL_BASE,
        accessToken: session.access_token,
        userId: session.user_id,
        deviceId: session.device_id,
        timelineSupport: true,
        localTimeoutMs: REQUEST_TIMEOUT, // not Element's: it bounds every request here
        fetchFn: recordingFetch(who),
    });
    allClients.push(client);
    const prepared = waitUntil(`${who}'s first sync to reach PREPARED`, [[client, ClientEvent.Sync]], (state, _prev, data) => {
        if (state === SyncState.Error) {
            throw new Error(`${who}'s sync went to ERROR: ${data?.error?.message ?? safeJson(data)}`);
        }
        return state === SyncState.Prepared || client.getSyncState() === SyncState.Prepared;
    });
    await client.startClient({
        lazyLoadMembers: true,
        initialSyncLimit: 20,
        // The rest of Element's startClient options.
        pendingEventOrdering: "detached",
        threadSupport: true,
    });
    await prepared;
    return client;
}

// ---------------------------------------------------------------------------------------------

describe("matrix-js-sdk (Element's client library) against Hearth", { skip: !URL_BASE && "set HEARTH_URL" }, () => {
    const tag = randomBytes(4).toString("hex");
    const users = { A: `alice_${tag}`, B: `bob_${tag}` };
    const password = `pw-${randomBytes(8).toString("hex")}`;
    const ROOM_NAME = `Hearth js-sdk room ${tag}`;
    const ROOM_TOPIC = "Testing Hearth the way Element does";
    const HELLO = `Hello from Alice ${tag}`;
    const NEW_NAME = `Alice Renamed ${tag}`;
    const BULK = (i) => `bulk ${i} ${tag}`;
    const N_BULK = 30;

    const s = {}; // what the steps produced
    let A, B; // MatrixClients
    let roomId;

    const step = (name, fn) => it(name, { timeout: STEP_TIMEOUT }, fn);

    function needs(t, ...keys) {
        const missing = keys.filter((k) => !s[k]);
        if (missing.length) {
            t.skip(`prerequisite failed: ${missing.join(", ")}`);
            return false;
        }
        return true;
    }

    after(() => {
        for (const c of allClients) c.stopClient();
        printHttpErrors();
    });

    step("registers two users through the m.login.dummy UIA flow", async () => {
        s.regA = await register(users.A, password);
        s.regB = await register(users.B, password);
        s.registered = true;
    });

    step("logs both users in with m.login.password", async (t) => {
        if (!needs(t, "registered")) return;
        s.sessA = await login(users.A, password);
        s.sessB = await login(users.B, password);
        assert.equal(s.sessA.user_id, s.regA.user_id);
        assert.notEqual(s.sessA.device_id, s.regA.device_id, "a login makes a new device");
        s.loggedIn = true;
    });

    step("starts both clients and reaches the PREPARED sync state", async (t) => {
        if (!needs(t, "loggedIn")) return;
        A = await startSyncedClient("A", s.sessA);
        B = await startSyncedClient("B", s.sessB);
        assert.equal(A.getUserId(), s.sessA.user_id);
        // Element reads push rules and capabilities at startup.
        assert.ok(A.pushRules?.global, "push rules loaded at startup");
        s.started = true;
    });

    // In a browser Element also makes these calls around startup (the rust crypto init, VoIP's
    // TURN check, presence, the settings and notification panels); the SDK in Node makes none of
    // them by itself. They are made here only so the list at the end shows which of them Hearth
    // answers: a 4xx is recorded, not failed (no E2EE, presence, media or VoIP yet); a 5xx or a
    // connection error fails.
    step("makes Element's other startup calls (recorded, not asserted beyond 'no 5xx')", async (t) => {
        if (!needs(t, "started")) return;
        const me = A.getUserId();
        const calls = {
            "GET /voip/turnServer": () => A.turnServer(),
            "PUT /presence/{me}/status": () => A.setPresence({ presence: "online" }),
            "GET /presence/{me}/status": () => A.getPresence(me),
            "GET /thirdparty/protocols": () => A.getThirdpartyProtocols(),
            "GET /pushers": () => A.getPushers(),
            "GET /devices": () => A.getDevices(),
            "GET /account/3pid": () => A.getThreePids(),
            "GET /media/config (v1 authenticated)": () => A.getMediaConfig(true),
            "POST /keys/upload {}": () => A.http.authedRequest("POST", "/keys/upload", undefined, {}),
            "POST /keys/query": () => A.http.authedRequest("POST", "/keys/query", undefined, { device_keys: { [me]: [] } }),
            "GET /room_keys/version": () => A.http.authedRequest("GET", "/room_keys/version"),
        };
        const serverErrors = [];
        for (const [name, call] of Object.entries(calls)) {
            try {
                await withTimeout(call(), name);
            } catch (e) {
                if (!(e?.httpStatus >= 400 && e.httpStatus < 500)) serverErrors.push(`${name}: ${e?.httpStatus ?? ""} ${e?.message}`);
            }
        }
        assert.deepEqual(serverErrors, [], "no 5xx or connection errors");
    });

    step("A creates a private_chat room with a name and topic; it comes down A's sync", async (t) => {
        if (!needs(t, "started")) return;
        const res = await A.createRoom({ name: ROOM_NAME, topic: ROOM_TOPIC, preset: Preset.PrivateChat });
        roomId = res.room_id;
        assert.match(roomId, /^!/);
        const room = await waitUntil("A's client to have the room with its name, topic and A joined", [
            [A, ClientEvent.Room],
            [A, RoomEvent.Name],
            [A, RoomEvent.Timeline],
        ], () => {
            const r = A.getRoom(roomId);
            return r && r.getMyMembership() === "join" && r.name === ROOM_NAME &&
                r.currentState.getStateEvents(EventType.RoomTopic, "")?.getContent().topic === ROOM_TOPIC && r;
        });
        assert.equal(room.currentState.getStateEvents(EventType.RoomJoinRules, "")?.getContent().join_rule, "invite");
        s.room = true;
    });

    step("A invites B; B's client sees the invite (with the room's name)", async (t) => {
        if (!needs(t, "room")) return;
        let memberEventSeen = false;
        const onMember = (ev, member) => {
            if (member.roomId === roomId && member.userId === B.getUserId() && member.membership === "invite") memberEventSeen = true;
        };
        B.on(RoomMemberEvent.Membership, onMember);
        try {
            const seen = waitUntil("B's client to list the room with membership invite", [
                [B, ClientEvent.Room],
                [B, RoomMemberEvent.Membership],
                [B, RoomEvent.MyMembership],
            ], () => B.getRooms().find((r) => r.roomId === roomId && r.getMyMembership() === "invite"));
            await A.invite(roomId, B.getUserId());
            await seen;
        } finally {
            B.off(RoomMemberEvent.Membership, onMember);
        }
        assert.ok(memberEventSeen, "B's client emitted RoomMember.membership (invite) for B");
        s.invited = true;
        // Element lists the invite under the room's name, which comes from the stripped state.
        const inviteRoom = B.getRoom(roomId);
        assert.equal(inviteRoom.name, ROOM_NAME, "invite shows the room name (m.room.name in invite_state)");
        const inviter = inviteRoom.getMember(B.getUserId())?.events.member?.getSender();
        assert.equal(inviter, A.getUserId(), "the invite's sender is A");
    });

    step("B joins; both clients see B joined, and B sees the name and topic", async (t) => {
        if (!needs(t, "invited")) return;
        const aSees = waitUntil("A's client to see B join", [[A, RoomMemberEvent.Membership]], () =>
            A.getRoom(roomId)?.getMember(B.getUserId())?.membership === "join");
        await B.joinRoom(roomId);
        await waitUntil("B's client to have the room as joined with name and topic", [
            [B, ClientEvent.Room],
            [B, RoomEvent.MyMembership],
            [B, RoomEvent.Timeline],
            [B, RoomEvent.Name],
        ], () => {
            const r = B.getRoom(roomId);
            return r?.getMyMembership() === "join" && r.name === ROOM_NAME &&
                r.currentState.getStateEvents(EventType.RoomTopic, "")?.getContent().topic === ROOM_TOPIC;
        });
        await aSees;
        s.joined = true;
    });

    step("A sends a text message; B receives it live as Room.timeline, A's local echo is replaced", async (t) => {
        if (!needs(t, "joined")) return;
        const bGets = waitUntil("B's Room.timeline event with A's message", [[B, RoomEvent.Timeline]],
            (ev, room, toStart, removed, data) =>
                ev && room?.roomId === roomId && !toStart && data?.liveEvent &&
                ev.getType() === EventType.RoomMessage && bodyOf(ev) === HELLO && ev);
        const res = await A.sendMessage(roomId, { msgtype: MsgType.Text, body: HELLO });
        const ev = await bGets;
        assert.equal(ev.getSender(), A.getUserId());
        assert.equal(ev.getId(), res.event_id);
        assert.equal(ev.getContent().msgtype, MsgType.Text);
        s.helloB = ev;
        s.message = true;
        // The sender's sync must carry unsigned.transaction_id so the SDK swaps its local echo for
        // the remote event; otherwise Element shows the message twice or stuck as "sending".
        const roomA = A.getRoom(roomId);
        await waitUntil("A's local echo to be replaced by the synced event (one copy, sent)", [[A, RoomEvent.Timeline], [A, RoomEvent.LocalEchoUpdated]], () => {
            const copies = findByBody(roomA, HELLO);
            return copies.length === 1 && copies[0].getId() === res.event_id && copies[0].status === null &&
                roomA.getPendingEvents().length === 0;
        });
    });

    step("B sends a read receipt; A's client sees it (Room.receipt)", async (t) => {
        if (!needs(t, "message")) return;
        const roomA = A.getRoom(roomId);
        const aSees = waitUntil("A's Room.receipt showing B read A's message", [[A, RoomEvent.Receipt]], () => {
            const ev = roomA.findEventById(s.helloB.getId());
            return ev && roomA.getReceiptsForEvent(ev).some((r) => r.userId === B.getUserId() && r.type === "m.read");
        });
        await B.sendReadReceipt(s.helloB);
        await aSees;
        assert.equal(roomA.getEventReadUpTo(B.getUserId()), s.helloB.getId());
    });

    step("A starts and stops typing; B sees RoomMember.typing both ways", async (t) => {
        if (!needs(t, "joined")) return;
        const isA = (member) => member?.roomId === roomId && member.userId === A.getUserId();
        const starts = waitUntil("B's RoomMember.typing for A (typing=true)", [[B, RoomMemberEvent.Typing]],
            (ev, member) => isA(member) && member.typing);
        await A.sendTyping(roomId, true, 30000);
        await starts;
        const stops = waitUntil("B's RoomMember.typing for A (typing=false)", [[B, RoomMemberEvent.Typing]],
            (ev, member) => isA(member) && !member.typing);
        await A.sendTyping(roomId, false, 0);
        await stops;
    });

    step("A changes display name; B sees the member's new name", async (t) => {
        if (!needs(t, "joined")) return;
        const roomB = B.getRoom(roomId);
        const bSees = waitUntil("B's room member for A to be named the new display name",
            [[B, RoomMemberEvent.Name], [B, RoomMemberEvent.Membership], [B, RoomEvent.Timeline]],
            () => roomB.getMember(A.getUserId())?.name === NEW_NAME);
        await A.setDisplayName(NEW_NAME);
        await bSees;
        assert.equal(roomB.getMember(A.getUserId()).rawDisplayName, NEW_NAME);
        // And the profile itself.
        const profile = await B.getProfileInfo(A.getUserId());
        assert.equal(profile.displayname, NEW_NAME);
    });

    it(`A sends ${N_BULK} messages; B receives them all live`, async (t) => {
        if (!needs(t, "joined")) return;
        const roomB = B.getRoom(roomId);
        const bGetsAll = waitUntil(`B to receive all ${N_BULK} messages`, [[B, RoomEvent.Timeline]],
            () => findByBody(roomB, BULK(N_BULK - 1)).length === 1, TIMEOUT * 3);
        for (let i = 0; i < N_BULK; i++) {
            await withTimeout(A.sendMessage(roomId, { msgtype: MsgType.Text, body: BULK(i) }), `A sends ${BULK(i)}`);
        }
        await bGetsAll;
        s.bulkSent = true;
    });

    step("B reopens (fresh client, initialSyncLimit 20) and paginates back to the first messages", async (t) => {
        if (!needs(t, "bulkSent")) return;
        // Like a reload of Element without a cache: a new client for the same session, which
        // only gets the last 20 events of the room and has to paginate for the rest.
        B.stopClient();
        B = await startSyncedClient("B (reopened)", s.sessB);
        s.reopened = true;
        const room = await waitUntil("B's reopened client to have the room", [[B, ClientEvent.Room]], () => B.getRoom(roomId));
        const first = BULK(0);
        assert.equal(findByBody(room, first).length, 0, "the initial sync (limit 20) must not already hold the first message");
        let rounds = 0;
        while (findByBody(room, first).length === 0) {
            assert.ok(++rounds <= 10, "found the first message within 10 back-paginations of 20");
            const more = await withTimeout(
                B.paginateEventTimeline(room.getLiveTimeline(), { backwards: true, limit: 20 }),
                "paginateEventTimeline backwards");
            if (!more && findByBody(room, first).length === 0) assert.fail("pagination ended before the first message");
        }
        // All of them, once each, in order.
        const order = timelineEvents(room).map(bodyOf).filter((b) => b?.startsWith("bulk "));
        assert.deepEqual(order, Array.from({ length: N_BULK }, (_, i) => BULK(i)));
        assert.equal(findByBody(room, HELLO).length, 1, "the earlier message is there once too");
        s.paginated = true;
    });

    step("B keeps paginating to the start of the room (m.room.create) and the SDK sees the end", async (t) => {
        if (!needs(t, "paginated")) return;
        const room = B.getRoom(roomId);
        let more = true;
        let rounds = 0;
        while (more) {
            assert.ok(++rounds <= 10, "pagination reports the start of the room within 10 more rounds");
            more = await withTimeout(
                B.paginateEventTimeline(room.getLiveTimeline(), { backwards: true, limit: 20 }),
                "paginateEventTimeline backwards");
        }
        const evs = timelineEvents(room);
        assert.equal(evs[0].getType(), EventType.RoomCreate, `first event is m.room.create (got ${evs[0].getType()})`);
        const ids = evs.map((e) => e.getId());
        assert.equal(new Set(ids).size, ids.length, "no event appears twice in the timeline");
    });

    step("A redacts a message; B sees Room.redaction and the event redacted", async (t) => {
        if (!needs(t, "reopened")) return;
        const roomB = B.getRoom(roomId);
        const target = findByBody(roomB, BULK(N_BULK - 1))[0];
        assert.ok(target, "B has the last message to be redacted");
        const targetId = target.getId();
        const bSees = waitUntil("B's Room.redaction for the message", [[B, RoomEvent.Redaction]],
            (ev, room) => ev && room?.roomId === roomId && ev.getAssociatedId() === targetId);
        const res = await A.redactEvent(roomId, targetId, undefined, { reason: "test" });
        assert.match(res.event_id, /^\$/);
        await bSees;
        const redacted = roomB.findEventById(targetId);
        assert.ok(redacted.isRedacted(), "B's copy of the event is redacted");
        assert.equal(bodyOf(redacted), undefined, "the redacted event lost its body");
    });

    step("B leaves; A sees B's leave and B's client moves the room to left", async (t) => {
        if (!needs(t, "reopened")) return;
        const aSees = waitUntil("A's RoomMember.membership for B = leave", [[A, RoomMemberEvent.Membership]],
            (ev, member) => (member?.roomId === roomId && member.userId === B.getUserId() && member.membership === "leave") ||
                A.getRoom(roomId)?.getMember(B.getUserId())?.membership === "leave");
        await B.leave(roomId);
        await aSees;
        await waitUntil("B's own client to show the room as left (rooms.leave in B's sync)",
            [[B, RoomEvent.MyMembership], [B, ClientEvent.Room], [B, RoomEvent.Timeline]],
            () => B.getRoom(roomId)?.getMyMembership() === "leave");
    });

    step("the SDK's calls got no unexpected HTTP errors", () => {
        const bad = httpErrors.filter((e) => UNEXPECTED_HTTP_ERRORS.some((re) => re.test(e.path)));
        assert.deepEqual(bad.map(fmtError), [], "core SDK requests failed");
    });

    function fmtError(e) {
        return `${e.method} ${templatePath(e.path)} -> ${e.status}${e.errcode ? ` ${e.errcode}` : ""}`;
    }

    // Replace the run's IDs with placeholders so the list groups by endpoint.
    function templatePath(p) {
        p = decodeURIComponent(p);
        if (roomId) p = p.split(roomId).join("{roomId}");
        for (const [k, u] of [["A", s.sessA?.user_id], ["B", s.sessB?.user_id]]) if (u) p = p.split(u).join(`{user${k}}`);
        return p
            .replace(/\$[A-Za-z0-9_+\/=-]+/g, "{eventId}")
            .replace(/\/(m\.[a-z.]+)\/[^/]+$/, "/$1/{txnId}")
            .replace(/\/filter\/\d+$/, "/filter/{id}");
    }

    function printHttpErrors() {
        const counts = new Map();
        for (const e of httpErrors) {
            const k = fmtError(e);
            const v = counts.get(k) ?? { n: 0, who: new Set() };
            v.n++;
            v.who.add(e.who);
            counts.set(k, v);
        }
        const lines = [...counts].map(([k, v]) => `  ${k}   x${v.n}   (${[...v.who].join(", ")})`);
        out.log(`\n== non-2xx HTTP responses the SDK got (${httpErrors.length} total, ${counts.size} distinct) ==`);
        out.log(lines.length ? lines.join("\n") : "  (none)");
        const warn = [...new Set(sdkWarnings.map((w) => w.slice(0, 300)))];
        out.log(`== SDK warnings/errors logged (${sdkWarnings.length} total, ${warn.length} distinct) ==`);
        out.log(warn.length ? warn.map((w) => `  ${w}`).join("\n") : "  (none)");
    }
});
