// End-to-end encryption with a real encrypting client: matrix-js-sdk (the SDK inside Element
// Web) with its Rust crypto (matrix-sdk-crypto compiled to WebAssembly) in Node. The server
// never decrypts anything; this proves its key, to-device and device-list endpoints are what
// the client needs: two users in an encrypted room decrypt each other's messages.
//
// Environment: HEARTH_URL (required; skipped without), HEARTH_JS_TIMEOUT (ms per wait, default
// 20000), HEARTH_JS_VERBOSE=1 for the SDK's own log.
//
// Run:  tests/js/setup.sh && HEARTH_URL=http://127.0.0.1:8008 node --test tests/js/

import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";

import { ClientEvent, createClient, MatrixEventEvent, RoomEvent, SyncState } from "matrix-js-sdk";

const URL_BASE = (process.env.HEARTH_URL ?? "").replace(/\/+$/, "");
const TIMEOUT = Number(process.env.HEARTH_JS_TIMEOUT ?? 20000);
const VERBOSE = process.env.HEARTH_JS_VERBOSE === "1";

if (!VERBOSE) {
    for (const level of ["debug", "info", "log", "trace", "warn"]) console[level] = () => {};
}

// The SDK arms long timers per request and never clears them: unref those so Node can exit.
const realSetTimeout = globalThis.setTimeout;
globalThis.setTimeout = function (fn, ms, ...args) {
    const t = realSetTimeout(fn, ms, ...args);
    if (ms >= 60000) t?.unref?.();
    return t;
};

function withTimeout(promise, what, ms = TIMEOUT) {
    let timer;
    return Promise.race([
        promise.finally(() => clearTimeout(timer)),
        new Promise((_, reject) => {
            timer = realSetTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
        }),
    ]);
}

async function api(method, path, token, body) {
    const res = await fetch(`${URL_BASE}/_matrix/client/v3${path}`, {
        method,
        headers: { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) },
        body: body === undefined ? undefined : JSON.stringify(body),
    });
    const json = await res.json();
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(json)}`);
    return json;
}

const clients = [];

/// Registers a user and starts a client with Rust crypto on a new device.
async function start(name) {
    const password = `pw-${name}`;
    const reg = await api("POST", "/register", null, { username: name, password, auth: { type: "m.login.dummy" } });
    const client = createClient({
        baseUrl: URL_BASE,
        userId: reg.user_id,
        accessToken: reg.access_token,
        deviceId: reg.device_id,
    });
    await client.initRustCrypto({ useIndexedDB: false });
    const prepared = new Promise((resolve) => {
        client.on(ClientEvent.Sync, (state) => {
            if (state === SyncState.Prepared || state === SyncState.Syncing) resolve();
        });
    });
    await client.startClient({ initialSyncLimit: 20 });
    await withTimeout(prepared, `${name}'s first sync`);
    clients.push(client);
    return { client, password, userId: reg.user_id };
}

/// Waits (bounded) until `of`'s device keys, as `by` queries them, are published.
async function publishedKeys(by, of) {
    const deadline = Date.now() + TIMEOUT;
    for (;;) {
        const keys = await api("POST", "/keys/query", by.client.getAccessToken(), { device_keys: { [of.userId]: [] } });
        if (keys.device_keys[of.userId]?.[of.client.getDeviceId()]) return;
        if (Date.now() > deadline) assert.fail(`${of.userId}'s device keys were never published`);
        await new Promise((r) => realSetTimeout(r, 200));
    }
}

/// Resolves with the decrypted body of the first event in `roomId` whose clear text satisfies
/// `want`, seen by `client` (live or already in the timeline).
function decryptedMessage(client, roomId, want) {
    return new Promise((resolve, reject) => {
        const check = (ev) => {
            if (ev.getRoomId() !== roomId || ev.getType() !== "m.room.message") return false;
            if (ev.isDecryptionFailure()) return false;
            const body = ev.getContent()?.body;
            if (ev.getWireType() === "m.room.encrypted" && typeof body === "string" && want(body)) {
                resolve(body);
                return true;
            }
            return false;
        };
        client.on(MatrixEventEvent.Decrypted, check);
        client.on(RoomEvent.Timeline, (ev) => check(ev));
        const room = client.getRoom(roomId);
        for (const ev of room?.getLiveTimeline().getEvents() ?? []) check(ev);
        void reject;
    });
}

after(() => {
    for (const c of clients) c.stopClient();
});

describe("E2EE with matrix-js-sdk's Rust crypto", { skip: !URL_BASE && "HEARTH_URL is not set" }, () => {
    const suffix = randomBytes(4).toString("hex");
    let alice, bob, roomId;

    it("two users with device keys share an encrypted room", async () => {
        alice = await start(`e2ealice${suffix}`);
        bob = await start(`e2ebob${suffix}`);
        // Each client uploads its device keys soon after its first sync.
        await publishedKeys(alice, bob);
        await publishedKeys(bob, alice);
        const created = await alice.client.createRoom({
            invite: [bob.userId],
            initial_state: [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }],
        });
        roomId = created.room_id;
        await withTimeout(
            new Promise((resolve) => {
                const tryJoin = () => bob.client.getRoom(roomId) && resolve();
                bob.client.on(ClientEvent.Room, tryJoin);
                tryJoin();
            }),
            "bob sees the invite",
        );
        await bob.client.joinRoom(roomId);
        await withTimeout(
            new Promise((resolve) => {
                const check = () => {
                    const m = alice.client.getRoom(roomId)?.getMember(bob.userId);
                    if (m?.membership === "join") resolve();
                };
                alice.client.on(RoomEvent.Timeline, check);
                check();
            }),
            "alice sees bob join",
        );
        assert.ok(await alice.client.getCrypto().isEncryptionEnabledInRoom(roomId));
    });

    it("each decrypts the other's message", async () => {
        const hello = `hello bob ${suffix}`;
        const bobSees = decryptedMessage(bob.client, roomId, (b) => b === hello);
        const sent = await withTimeout(
            alice.client.sendMessage(roomId, { msgtype: "m.text", body: hello }),
            "alice sends",
        );
        const raw = await api("GET", `/rooms/${encodeURIComponent(roomId)}/event/${encodeURIComponent(sent.event_id)}`, alice.client.getAccessToken());
        assert.equal(raw.type, "m.room.encrypted", "the server stored ciphertext");
        assert.equal(await withTimeout(bobSees, "bob decrypts alice's message"), hello);

        const reply = `hello alice ${suffix}`;
        const aliceSees = decryptedMessage(alice.client, roomId, (b) => b === reply);
        await withTimeout(bob.client.sendMessage(roomId, { msgtype: "m.text", body: reply }), "bob sends");
        assert.equal(await withTimeout(aliceSees, "alice decrypts bob's message"), reply);
    });
});
