// End-to-end encryption with a real encrypting client: matrix-js-sdk (the SDK inside Element
// Web) with its Rust crypto (matrix-sdk-crypto compiled to WebAssembly) in Node. The server
// never decrypts anything; this proves its key, to-device, device-list, cross-signing and
// key-backup endpoints are what the client needs: two users in an encrypted room decrypt each
// other's messages; cross-signing is bootstrapped (and reset with the password); a key backup is
// made, and a new login of the same user decrypts the old message from it.
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

/// Registers a user (or, with `login`, logs in again on a new device) and starts a client with
/// Rust crypto on that device.
async function start(name, login = false) {
    const password = `pw-${name}`;
    const reg = login
        ? await api("POST", "/login", null, {
              type: "m.login.password",
              identifier: { type: "m.id.user", user: name },
              password,
          })
        : await api("POST", "/register", null, { username: name, password, auth: { type: "m.login.dummy" } });
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
    return { client, password, userId: reg.user_id, name };
}

/// Polls `check` every 200 ms until it returns something truthy (returned), for at most TIMEOUT.
async function poll(what, check) {
    const deadline = Date.now() + TIMEOUT;
    for (;;) {
        const v = await check();
        if (v) return v;
        if (Date.now() > deadline) assert.fail(`timed out after ${TIMEOUT} ms waiting for ${what}`);
        await new Promise((r) => realSetTimeout(r, 200));
    }
}

/// Waits until `of`'s device keys, as `by` queries them, are published.
async function publishedKeys(by, of) {
    await poll(`${of.userId}'s device keys`, async () => {
        const keys = await api("POST", "/keys/query", by.client.getAccessToken(), { device_keys: { [of.userId]: [] } });
        return keys.device_keys[of.userId]?.[of.client.getDeviceId()];
    });
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

    it("cross-signing is bootstrapped, and reset with the password", async () => {
        const crypto = alice.client.getCrypto();
        const attempts = [];
        const withPassword = async (makeRequest) => {
            try {
                attempts.push("none");
                return await makeRequest(null);
            } catch (e) {
                if (e?.httpStatus !== 401) throw e;
                attempts.push("password");
                return await makeRequest({
                    type: "m.login.password",
                    identifier: { type: "m.id.user", user: alice.userId },
                    password: alice.password,
                    session: e.data?.session,
                });
            }
        };
        await withTimeout(crypto.bootstrapCrossSigning({ authUploadDeviceSigningKeys: withPassword }), "bootstrap");
        assert.ok(await crypto.isCrossSigningReady(), "cross-signing ready");
        assert.deepEqual(attempts, ["none"], "the first upload needs no password");
        const master1 = await crypto.getCrossSigningKeyId();
        // The upload is a device-list change for alice, so her client re-queries her keys. A
        // query answered between the reset's new keys and their upload would show the client
        // the old master key and make it drop its new private keys (a client-side race, wider
        // here because a debug build's argon2 check takes seconds): let that query finish first.
        await poll("alice's client re-reads her published keys", async () => {
            const s = await crypto.getUserVerificationStatus(alice.userId);
            return s.isCrossSigningVerified();
        });
        await new Promise((r) => realSetTimeout(r, 2000));
        await withTimeout(
            crypto.bootstrapCrossSigning({ setupNewCrossSigning: true, authUploadDeviceSigningKeys: withPassword }),
            "reset cross-signing",
        );
        assert.deepEqual(attempts, ["none", "none", "password"], "replacing the keys needs the password");
        // The client knows its new master key once it has re-queried its own keys (which the
        // server's `device_lists.changed` for the user prompts).
        const master2 = await poll("the client's new master key", async () => {
            const id = await crypto.getCrossSigningKeyId();
            return id && id !== master1 && id;
        });
        // What bob's server answers: alice's new master key, and her device signed by her new
        // self-signing key.
        await poll("alice's cross-signing as bob's server answers it", async () => {
            const keys = await api("POST", "/keys/query", bob.client.getAccessToken(), { device_keys: { [alice.userId]: [] } });
            const master = Object.values(keys.master_keys?.[alice.userId]?.keys ?? {})[0];
            const ssk = Object.values(keys.self_signing_keys?.[alice.userId]?.keys ?? {})[0];
            const sigs = keys.device_keys[alice.userId][alice.client.getDeviceId()]?.signatures?.[alice.userId] ?? {};
            return master === master2 && ssk && sigs[`ed25519:${ssk}`];
        });
    });

    it("a new login decrypts the old message from the key backup", async () => {
        const crypto = alice.client.getCrypto();
        await withTimeout(crypto.resetKeyBackup(), "create a key backup");
        const version = await poll("an active backup version", () => crypto.getActiveSessionBackupVersion());
        // The room key of the first message reaches the server's backup.
        await poll("a key in the backup", async () => {
            const info = await api("GET", "/room_keys/version", alice.client.getAccessToken());
            return info.version === version && info.count >= 1;
        });
        const backupKey = await crypto.getSessionBackupPrivateKey();
        assert.ok(backupKey, "the backup's private key");

        const again = await start(alice.name, true);
        const hello = `hello bob ${suffix}`;
        const seen = decryptedMessage(again.client, roomId, (b) => b === hello);
        const crypto2 = again.client.getCrypto();
        await crypto2.storeSessionBackupPrivateKey(backupKey, version);
        await withTimeout(crypto2.checkKeyBackupAndEnable(), "the new device finds the backup");
        const restored = await withTimeout(crypto2.restoreKeyBackup(), "restore from the backup");
        assert.ok(restored.imported >= 1, `keys imported: ${JSON.stringify(restored)}`);
        assert.equal(await withTimeout(seen, "the new login decrypts the old message"), hello);
    });
});
