-- Hearth's whole schema. Applied by the migration runner in src/store/migrate.rs:
-- a fresh database gets this file; `meta.schema_version` records what was applied and
-- older databases are upgraded in place by the numbered steps in migrate.rs.
--
-- Stream positions: every row that a client's /sync must notice carries `pos`, taken from one
-- counter owned by the single writer (src/store/writer.rs). One writer means positions become
-- visible in order, so "everything with pos > since" is a complete incremental sync.

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE IF NOT EXISTS users (
    user_id       TEXT PRIMARY KEY,
    password_hash TEXT,
    is_admin      INTEGER NOT NULL DEFAULT 0,
    deactivated   INTEGER NOT NULL DEFAULT 0,
    displayname   TEXT,
    avatar_url    TEXT,
    created_ts    INTEGER NOT NULL
) STRICT;

CREATE TABLE IF NOT EXISTS devices (
    user_id      TEXT NOT NULL REFERENCES users(user_id),
    device_id    TEXT NOT NULL,
    display_name TEXT,
    last_seen_ts INTEGER,
    last_seen_ip TEXT,
    PRIMARY KEY (user_id, device_id)
) STRICT;

-- Access tokens are stored only as a SHA-256 hash; the token itself never touches disk.
CREATE TABLE IF NOT EXISTS access_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    created_ts INTEGER NOT NULL,
    FOREIGN KEY (user_id, device_id) REFERENCES devices(user_id, device_id) ON DELETE CASCADE
) STRICT;

CREATE TABLE IF NOT EXISTS registration_tokens (
    token          TEXT PRIMARY KEY,
    uses_allowed   INTEGER,
    completed      INTEGER NOT NULL DEFAULT 0,
    expiry_ts      INTEGER
) STRICT;

CREATE TABLE IF NOT EXISTS rooms (
    room_id      TEXT PRIMARY KEY,
    room_version TEXT NOT NULL,
    creator      TEXT NOT NULL,
    is_public    INTEGER NOT NULL DEFAULT 0,
    created_ts   INTEGER NOT NULL,
    -- state group of current_state (the state after the forward extremity)
    state_group  INTEGER
) STRICT;

-- Every PDU we hold. `json` is the canonical PDU as signed (redacted in place on redaction).
--
-- Two orders: `pos` is the stream order (when this server learnt of the event; what /sync
-- walks), `depth` then `pos` the topological order (what /messages and backfill walk), so
-- history fetched later can sort before what users have already seen.
--
-- Not every event we hold is part of the room as clients see it:
-- - an *outlier* (`outlier = 1`) is known without its state: an auth event fetched to check
--   another, an invite to a remote room. `state_group` is NULL.
-- - a *rejected* event (`rejected_reason` set) failed the auth rules against its auth events
--   or the state before it: kept so it is not fetched again, never served as part of the room.
-- - a *soft-failed* event (`soft_failed = 1`) passed those but not the current state: stored
--   and referenced by the graph, but not in current state and not sent to clients.
-- `state_group` is the room state *after* the event; `received_ts` is when it reached us.
CREATE TABLE IF NOT EXISTS events (
    pos              INTEGER PRIMARY KEY,
    event_id         TEXT NOT NULL UNIQUE,
    room_id          TEXT NOT NULL,
    type             TEXT NOT NULL,
    state_key        TEXT,
    sender           TEXT NOT NULL,
    origin_server_ts INTEGER NOT NULL,
    received_ts      INTEGER NOT NULL,
    depth            INTEGER NOT NULL,
    json             TEXT NOT NULL,
    state_group      INTEGER,
    -- the event this state event replaced, for unsigned.prev_content / replaces_state
    replaces_state   TEXT,
    redacted_by      TEXT,
    -- set for events sent by a local device, for unsigned.transaction_id
    txn_device       TEXT,
    txn_id           TEXT,
    rejected_reason  TEXT,
    soft_failed      INTEGER NOT NULL DEFAULT 0,
    outlier          INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX IF NOT EXISTS events_room_pos ON events(room_id, pos);
-- Topological order within a room (/messages, backfill).
CREATE INDEX IF NOT EXISTS events_room_topo ON events(room_id, depth, pos);
-- Membership history of a user in a room (visibility checks) without scanning the room.
CREATE INDEX IF NOT EXISTS events_room_state ON events(room_id, type, state_key, pos) WHERE state_key IS NOT NULL;

-- The event graph as rows: prev events (for missing-event walks and extremities) and auth
-- events (auth chains are a recursive query, not JSON parsed one event at a time). The
-- referenced event need not be held (yet).
CREATE TABLE IF NOT EXISTS event_edges (
    event_id      TEXT NOT NULL,
    prev_event_id TEXT NOT NULL,
    PRIMARY KEY (event_id, prev_event_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS event_edges_prev ON event_edges(prev_event_id);
CREATE TABLE IF NOT EXISTS event_auth (
    event_id      TEXT NOT NULL,
    auth_event_id TEXT NOT NULL,
    PRIMARY KEY (event_id, auth_event_id)
) STRICT, WITHOUT ROWID;

-- Dedupe of client sends: a retried txnId returns the first event ID.
CREATE TABLE IF NOT EXISTS txn_ids (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    txn_id    TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
) STRICT;

CREATE TABLE IF NOT EXISTS forward_extremities (
    room_id  TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, event_id)
) STRICT;

-- State groups stored as deltas against `prev_group` (chains are capped in length), so a
-- membership change in a 10,000-member room writes one row, not 10,000.
CREATE TABLE IF NOT EXISTS state_groups (
    id         INTEGER PRIMARY KEY,
    room_id    TEXT NOT NULL,
    prev_group INTEGER REFERENCES state_groups(id),
    chain_len  INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS state_group_entries (
    group_id  INTEGER NOT NULL REFERENCES state_groups(id),
    type      TEXT NOT NULL,
    state_key TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    PRIMARY KEY (group_id, type, state_key)
) STRICT;

-- The resolved state at the room's forward extremities, kept in step by the writer.
-- `membership` is filled for m.room.member rows so "rooms of a user" is one index lookup.
CREATE TABLE IF NOT EXISTS current_state (
    room_id    TEXT NOT NULL,
    type       TEXT NOT NULL,
    state_key  TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    membership TEXT,
    pos        INTEGER NOT NULL,
    PRIMARY KEY (room_id, type, state_key)
) STRICT;
CREATE INDEX IF NOT EXISTS current_state_member ON current_state(state_key, membership) WHERE type = 'm.room.member';

-- Rooms a local user has forgotten (hidden from the leave section of /sync).
CREATE TABLE IF NOT EXISTS forgotten_rooms (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    PRIMARY KEY (user_id, room_id)
) STRICT;

CREATE TABLE IF NOT EXISTS room_aliases (
    alias   TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    creator TEXT NOT NULL
) STRICT;

-- Account data, global (room_id = '') and per room. Push rules live here as m.push_rules.
CREATE TABLE IF NOT EXISTS account_data (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    type    TEXT NOT NULL,
    content TEXT NOT NULL,
    pos     INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id, type)
) STRICT;
CREATE INDEX IF NOT EXISTS account_data_pos ON account_data(user_id, pos);

CREATE TABLE IF NOT EXISTS receipts (
    room_id      TEXT NOT NULL,
    receipt_type TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    thread_id    TEXT NOT NULL DEFAULT '',
    event_id     TEXT NOT NULL,
    ts           INTEGER NOT NULL,
    pos          INTEGER NOT NULL,
    PRIMARY KEY (room_id, receipt_type, user_id, thread_id)
) STRICT;
CREATE INDEX IF NOT EXISTS receipts_room_pos ON receipts(room_id, pos);

CREATE TABLE IF NOT EXISTS filters (
    filter_id INTEGER PRIMARY KEY,
    user_id   TEXT NOT NULL,
    json      TEXT NOT NULL
) STRICT;

-- Signing keys of remote servers, as fetched from them and checked (`fed::keys`).
-- `expired_ts` is set for keys a server lists as old (still valid for what they signed
-- before that time).
CREATE TABLE IF NOT EXISTS server_keys (
    server_name    TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    key            TEXT NOT NULL,
    valid_until_ts INTEGER NOT NULL,
    expired_ts     INTEGER,
    PRIMARY KEY (server_name, key_id)
) STRICT;

-- The federation outbox: one row per (destination, PDU or EDU), written in the same
-- transaction as the event or EDU that causes it; the sender (`workers::federation`)
-- deletes exactly the rows a destination acknowledged. Rows are sent in `id` order.
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    -- 'pdu' (event_id set) or 'edu' (payload set)
    kind        TEXT NOT NULL,
    event_id    TEXT,
    payload     TEXT
) STRICT;
CREATE INDEX IF NOT EXISTS outbox_destination ON outbox(destination, id);

-- Per-destination retry state, kept across restarts (neither forgotten nor reset by one).
CREATE TABLE IF NOT EXISTS destinations (
    name       TEXT PRIMARY KEY,
    retry_at   INTEGER NOT NULL DEFAULT 0,
    backoff_ms INTEGER NOT NULL DEFAULT 0,
    failures   INTEGER NOT NULL DEFAULT 0
) STRICT;

-- Transactions received from other servers, so a retried one is not applied twice.
CREATE TABLE IF NOT EXISTS received_txns (
    origin TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    ts     INTEGER NOT NULL,
    PRIMARY KEY (origin, txn_id)
) STRICT;

-- The stripped state a remote server sent with an invite to one of our users (a room we are
-- not in yet): what `/sync` shows in `invite_state`.
CREATE TABLE IF NOT EXISTS invite_state (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    events  TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
) STRICT;

-- e2ee (schema v3)
-- The device keys a device uploaded (`/keys/upload`), as signed by it (the `signatures`
-- others add later live in `e2e_signatures`).
CREATE TABLE IF NOT EXISTS e2e_device_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    keys      TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
) STRICT;

-- One-time keys, each handed out once (`/keys/claim` deletes the row it returns).
CREATE TABLE IF NOT EXISTS e2e_one_time_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    key       TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm, key_id)
) STRICT;

-- One fallback key per device and algorithm, handed out when the one-time keys run out;
-- `used` once it was (the device then uploads a new one).
CREATE TABLE IF NOT EXISTS e2e_fallback_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    key       TEXT NOT NULL,
    used      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, device_id, algorithm)
) STRICT;

-- Cross-signing keys (`master`, `self_signing`, `user_signing`), as uploaded; `public_key` is
-- the unpadded base64 key, which is also the key's ID when others sign it.
CREATE TABLE IF NOT EXISTS e2e_cross_signing_keys (
    user_id    TEXT NOT NULL,
    key_type   TEXT NOT NULL,
    public_key TEXT NOT NULL,
    keys       TEXT NOT NULL,
    PRIMARY KEY (user_id, key_type)
) STRICT;

-- Signatures uploaded with `/keys/signatures/upload`, merged into the signed keys by
-- `/keys/query`. `target_key` is a device ID or a cross-signing public key.
CREATE TABLE IF NOT EXISTS e2e_signatures (
    target_user   TEXT NOT NULL,
    target_key    TEXT NOT NULL,
    signer_user   TEXT NOT NULL,
    signer_key_id TEXT NOT NULL,
    signature     TEXT NOT NULL,
    PRIMARY KEY (target_user, target_key, signer_user, signer_key_id)
) STRICT;

-- The device-list stream: a row per change of a user's devices or keys, at a stream position
-- (the writer's one counter), so `/sync` and `/keys/changes` see it in order with the rest.
CREATE TABLE IF NOT EXISTS e2e_device_list_changes (
    pos     INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (user_id, pos)
) STRICT, WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS e2e_device_list_changes_pos ON e2e_device_list_changes(pos);

-- To-device messages waiting for their device, in stream-position order; deleted once a
-- `/sync` of that device acknowledges them (a `since` at or past their position).
CREATE TABLE IF NOT EXISTS e2e_to_device (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    pos       INTEGER NOT NULL,
    sender    TEXT NOT NULL,
    type      TEXT NOT NULL,
    content   TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, pos)
) STRICT, WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS e2e_to_device_pos ON e2e_to_device(pos);

-- Transaction IDs of `/sendToDevice`, per sending device, so a retry is not delivered twice.
CREATE TABLE IF NOT EXISTS e2e_to_device_txns (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    txn_id    TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
) STRICT, WITHOUT ROWID;

-- Server-side key backup versions; a deleted version keeps its row (its number is not reused).
CREATE TABLE IF NOT EXISTS e2e_backup_versions (
    user_id   TEXT NOT NULL,
    version   INTEGER NOT NULL,
    algorithm TEXT NOT NULL,
    auth_data TEXT NOT NULL,
    etag      INTEGER NOT NULL DEFAULT 0,
    deleted   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, version)
) STRICT;

CREATE TABLE IF NOT EXISTS e2e_backup_keys (
    user_id             TEXT NOT NULL,
    version             INTEGER NOT NULL,
    room_id             TEXT NOT NULL,
    session_id          TEXT NOT NULL,
    first_message_index INTEGER NOT NULL,
    forwarded_count     INTEGER NOT NULL,
    is_verified         INTEGER NOT NULL,
    session_data        TEXT NOT NULL,
    PRIMARY KEY (user_id, version, room_id, session_id)
) STRICT;

-- sticky (schema v3)
-- Live sticky events (MSC4354): one row per sticky event that is part of the room, from its
-- commit until it is redacted or expires (`expires_ts` = min(received_ts, origin_server_ts) +
-- min(duration_ms, 1 h)). Small by construction: nothing stays sticky for more than an hour.
CREATE TABLE IF NOT EXISTS sticky_events (
    event_id   TEXT PRIMARY KEY,
    room_id    TEXT NOT NULL,
    pos        INTEGER NOT NULL,
    expires_ts INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS sticky_events_room ON sticky_events(room_id, pos);
CREATE INDEX IF NOT EXISTS sticky_events_expiry ON sticky_events(expires_ts);

-- media (schema v3)
-- Uploaded media and cached remote media. A row is written only after its file is durable in
-- media/ (temp file, fsync, rename, directory fsync), so a row always has its file; a file
-- with no row (a kill between the rename and the commit) is removed by the start-up sweep.
-- `file` is the file's name in media/, chosen by the server, never taken from a request.
-- A row reserved by `POST /_matrix/media/v1/create` has no file until its upload.
-- `authenticated` = 0 only for uploads made while the legacy unauthenticated download
-- endpoints were enabled (Synapse's `authenticated` column): only those are served there.
CREATE TABLE IF NOT EXISTS media (
    origin        TEXT NOT NULL,
    media_id      TEXT NOT NULL,
    file          TEXT UNIQUE,
    size          INTEGER NOT NULL DEFAULT 0,
    content_type  TEXT,
    filename      TEXT,
    uploader      TEXT,
    created_ts    INTEGER NOT NULL,
    expires_ts    INTEGER,
    authenticated INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (origin, media_id)
) STRICT;
CREATE INDEX IF NOT EXISTS media_uploader ON media(uploader) WHERE uploader IS NOT NULL;

-- Thumbnails, generated on first request at one of the standard sizes and kept.
CREATE TABLE IF NOT EXISTS media_thumbnails (
    origin       TEXT NOT NULL,
    media_id     TEXT NOT NULL,
    width        INTEGER NOT NULL,
    height       INTEGER NOT NULL,
    method       TEXT NOT NULL,
    file         TEXT NOT NULL UNIQUE,
    size         INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    PRIMARY KEY (origin, media_id, width, height, method)
) STRICT;

-- presence (schema v4)
-- The persisted copy of the in-memory presence map (`crate::presence`): written in batches by
-- the presence worker (once a minute and at shutdown), read once at start, so a restart keeps
-- status messages while a sync never costs a write.
CREATE TABLE IF NOT EXISTS presence (
    user_id        TEXT PRIMARY KEY,
    state          TEXT NOT NULL,
    status_msg     TEXT,
    last_active_ts INTEGER NOT NULL,
    last_sync_ts   INTEGER NOT NULL
) STRICT;

-- partial-state (schema v4)
-- Rooms joined with partial state (MSC3706): the join event, the server joined through, and
-- when. The row goes in the write that un-partial-states the room after its resync, so a
-- restart finds every room still to resync here.
CREATE TABLE IF NOT EXISTS partial_state_rooms (
    room_id       TEXT PRIMARY KEY,
    join_event_id TEXT NOT NULL,
    joined_via    TEXT NOT NULL,
    joined_ts     INTEGER NOT NULL
) STRICT;
-- The servers in the room according to the join answer (`servers_in_room`): while the room
-- is partial, events go to these as well as to the servers of the members we know of.
CREATE TABLE IF NOT EXISTS partial_state_room_servers (
    room_id TEXT NOT NULL,
    server  TEXT NOT NULL,
    PRIMARY KEY (room_id, server)
) STRICT, WITHOUT ROWID;
-- When a room joined with partial state became fully stated (its stream position): a
-- `/sync` that is not lazy-loading members leaves the room out until then, and sends it
-- whole at that position.
CREATE TABLE IF NOT EXISTS partial_state_completed (
    room_id TEXT PRIMARY KEY,
    pos     INTEGER NOT NULL
) STRICT;

-- search (schema v4)
-- Full-text index of what `/search` looks in (SQLite FTS5; the bundled SQLite is built with
-- it): one row per event that is part of its room and has text under one of the keys the spec
-- names: `content.body` of `m.room.message`, `content.name` of `m.room.name`, `content.topic`
-- of `m.room.topic`. The rowid is the event's stream position (`events.pos`). A row is written
-- in the event's own transaction (`room::search`) and deleted with its redaction; encrypted
-- events have nothing to index. Porter stemming over unicode61, diacritics folded.
CREATE VIRTUAL TABLE IF NOT EXISTS event_search USING fts5(
    value,
    key UNINDEXED,
    tokenize = 'porter unicode61 remove_diacritics 2'
);
-- Events stored before the index existed (an upgraded database; nothing on a fresh one).
INSERT INTO event_search (rowid, value, key)
    SELECT e.pos, json_extract(e.json, '$.content.' || k.field), 'content.' || k.field
    FROM events e
    JOIN (SELECT 'm.room.message' AS type, 'body' AS field
          UNION ALL SELECT 'm.room.name', 'name'
          UNION ALL SELECT 'm.room.topic', 'topic') k ON k.type = e.type
    WHERE e.outlier = 0 AND e.rejected_reason IS NULL AND e.soft_failed = 0
      AND e.redacted_by IS NULL
      AND json_type(e.json, '$.content.' || k.field) = 'text';

-- sticky federation (schema v4)
-- Soft-failed events by room and arrival (MSC4354): a state change re-evaluates the room's
-- soft-failed sticky events received within the last hour (none can be sticky longer), and
-- this partial index keeps that to one probe in a room without any.
CREATE INDEX IF NOT EXISTS events_soft_failed ON events(room_id, received_ts) WHERE soft_failed = 1;

-- push (schema v4)
-- Push-rule results (`workers::push`): one row per (local user, event) whose actions notify,
-- written with the evaluator's position in one write, so an event is counted exactly once.
-- `thread_id` is the thread root for events in a thread, else 'main'. Counts for `/sync` are
-- the rows after the user's read receipt; `/notifications` lists them newest first.
CREATE TABLE IF NOT EXISTS push_actions (
    user_id   TEXT NOT NULL,
    pos       INTEGER NOT NULL,
    room_id   TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    highlight INTEGER NOT NULL,
    actions   TEXT NOT NULL,
    ts        INTEGER NOT NULL,
    PRIMARY KEY (user_id, pos)
) STRICT, WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS push_actions_room ON push_actions(user_id, room_id, pos);

-- When a (user, room)'s counts last changed by evaluation (a stream position taken by the
-- evaluator's write): an incremental `/sync` sends the room again with its new counts.
CREATE TABLE IF NOT EXISTS push_counts_changed (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    pos     INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id)
) STRICT, WITHOUT ROWID;

-- HTTP pushers (`POST /pushers/set`). `pusher` is the pusher as the client API shows it
-- (JSON); the retry state of its gateway is kept here across restarts.
CREATE TABLE IF NOT EXISTS pushers (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    TEXT NOT NULL,
    app_id     TEXT NOT NULL,
    pushkey    TEXT NOT NULL,
    url        TEXT NOT NULL,
    pusher     TEXT NOT NULL,
    created_ts INTEGER NOT NULL,
    retry_at   INTEGER NOT NULL DEFAULT 0,
    backoff_ms INTEGER NOT NULL DEFAULT 0,
    UNIQUE (app_id, pushkey, user_id)
) STRICT;
CREATE INDEX IF NOT EXISTS pushers_user ON pushers(user_id);

-- The push queue: one row per (pusher, notifying event), written with the evaluation; the
-- push sender deletes a row after the gateway's 200 (or when its pusher goes).
CREATE TABLE IF NOT EXISTS push_queue (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    pusher_id INTEGER NOT NULL REFERENCES pushers(id) ON DELETE CASCADE,
    user_id   TEXT NOT NULL,
    pos       INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS push_queue_pusher ON push_queue(pusher_id, id);

-- The evaluator's durable position: every event at or below it has been evaluated. A database
-- from before push rules ran starts at its newest event (old history is not notified).
INSERT OR IGNORE INTO meta (key, value)
    SELECT 'push_pos', CAST(COALESCE(MAX(pos), 0) AS TEXT) FROM events;

-- pushfix (schema v5)
-- The device whose access token set a pusher: logging that device out (or deleting it) removes
-- its pushers, as Synapse does (`remove_pushers_by_devices`). NULL for pushers set before v5.
ALTER TABLE pushers ADD COLUMN device_id TEXT;
-- The pruning job walks notifications oldest first (`workers::push_prune`).
CREATE INDEX IF NOT EXISTS push_actions_ts ON push_actions(ts, user_id, pos);

-- partial-state reauth (schema v5)
-- Events received or sent while their room was partial-state (written in the event's own
-- write, `pos` its stream position): once the resync completes the room, each is checked
-- again against the full state before it, in `pos` order, and its row deleted in the same
-- write as the verdict it gets (so a restart resumes where the last batch ended).
CREATE TABLE IF NOT EXISTS partial_state_events (
    room_id  TEXT NOT NULL,
    pos      INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, pos)
) STRICT, WITHOUT ROWID;

-- member servers (schema v6)
-- The servers with a joined member in a room, by index: `queries::list_room_servers` (every
-- send's destinations, a join's `servers_in_room`) seeks from one server to the next instead
-- of reading every member of a 10,000-member room, and "has this server a joined member" is
-- one seek. The expression is the server part of a user ID (localparts hold no ':').
CREATE INDEX IF NOT EXISTS current_state_member_server
    ON current_state(room_id, substr(state_key, instr(state_key, ':') + 1))
    WHERE type = 'm.room.member' AND membership = 'join';

-- outbox retries (schema v6)
-- How many times the row's PDU already went out in a transaction the destination answered 200
-- without processing it (no entry for it in the answer's `pdus`, as Synapse answers for a room
-- it is still joining). Only sticky events are sent again (`workers::federation::resends`):
-- they were pushed out of band, so nothing later in the room leads the destination to them.
ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
