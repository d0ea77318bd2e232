//! The migration runner. A fresh database gets `schema.sql` whole and is stamped with
//! `SCHEMA_VERSION`; an older one runs the numbered steps after its recorded version (the
//! upgrade from `n` to `n + 1` is the `n`-th, listed in [`migrate`]), each step and its stamp
//! in one transaction.

use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result};

/// The whole schema, compiled into the binary.
pub const SCHEMA: &str = include_str!("../../schema.sql");

/// The version `SCHEMA` describes.
pub const SCHEMA_VERSION: i64 = 6;

/// Version 2: federation (`server_keys`, `outbox`, `destinations`, `received_txns`,
/// `invite_state`); events that are not simply appended (outliers with no state group, rejected
/// with a reason, soft-failed), `received_ts`, the topological index, and the event graph as
/// rows (`event_edges`, `event_auth`), filled from the stored PDUs. SQLite cannot relax a
/// NOT NULL column in place, so `events` is rebuilt.
const V1_TO_V2: &str = "
CREATE TABLE events_v2 (
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
    replaces_state   TEXT,
    redacted_by      TEXT,
    txn_device       TEXT,
    txn_id           TEXT,
    rejected_reason  TEXT,
    soft_failed      INTEGER NOT NULL DEFAULT 0,
    outlier          INTEGER NOT NULL DEFAULT 0
) STRICT;
INSERT INTO events_v2 (pos, event_id, room_id, type, state_key, sender, origin_server_ts,
        received_ts, depth, json, state_group, replaces_state, redacted_by, txn_device, txn_id,
        rejected_reason, soft_failed, outlier)
    SELECT pos, event_id, room_id, type, state_key, sender, origin_server_ts,
        origin_server_ts, depth, json, state_group, replaces_state, redacted_by, txn_device,
        txn_id, CASE WHEN rejected != 0 THEN 'rejected' END, 0, outlier
    FROM events;
DROP TABLE events;
ALTER TABLE events_v2 RENAME TO events;
CREATE INDEX events_room_pos ON events(room_id, pos);
CREATE INDEX events_room_topo ON events(room_id, depth, pos);
CREATE INDEX events_room_state ON events(room_id, type, state_key, pos) WHERE state_key IS NOT NULL;
CREATE TABLE event_edges (
    event_id      TEXT NOT NULL,
    prev_event_id TEXT NOT NULL,
    PRIMARY KEY (event_id, prev_event_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX event_edges_prev ON event_edges(prev_event_id);
CREATE TABLE event_auth (
    event_id      TEXT NOT NULL,
    auth_event_id TEXT NOT NULL,
    PRIMARY KEY (event_id, auth_event_id)
) STRICT, WITHOUT ROWID;
INSERT OR IGNORE INTO event_edges (event_id, prev_event_id)
    SELECT e.event_id, j.value FROM events e, json_each(e.json, '$.prev_events') j;
INSERT OR IGNORE INTO event_auth (event_id, auth_event_id)
    SELECT e.event_id, j.value FROM events e, json_each(e.json, '$.auth_events') j;
CREATE TABLE server_keys (
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
CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    -- 'pdu' (event_id set) or 'edu' (payload set)
    kind        TEXT NOT NULL,
    event_id    TEXT,
    payload     TEXT
) STRICT;
CREATE INDEX outbox_destination ON outbox(destination, id);

-- Per-destination retry state, kept across restarts (neither forgotten nor reset by one).
CREATE TABLE destinations (
    name       TEXT PRIMARY KEY,
    retry_at   INTEGER NOT NULL DEFAULT 0,
    backoff_ms INTEGER NOT NULL DEFAULT 0,
    failures   INTEGER NOT NULL DEFAULT 0
) STRICT;

-- Transactions received from other servers, so a retried one is not applied twice.
CREATE TABLE received_txns (
    origin TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    ts     INTEGER NOT NULL,
    PRIMARY KEY (origin, txn_id)
) STRICT;

-- The stripped state a remote server sent with an invite to one of our users (a room we are
-- not in yet): what `/sync` shows in `invite_state`.
CREATE TABLE invite_state (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    events  TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
) STRICT;
";

/// Version 3, new tables only, so the step is these blocks of `schema.sql` itself (see
/// [`schema_block`]): end-to-end encryption (device and one-time keys, cross-signing keys and
/// signatures, the device-list stream, to-device messages, key backup), sticky events (the
/// live index of MSC4354 sticky events) and media (metadata of stored files and thumbnails).
const V2_TO_V3_BLOCKS: &[&str] = &[
    "-- e2ee (schema v3)",
    "-- sticky (schema v3)",
    "-- media (schema v3)",
];

/// Version 4, blocks of `schema.sql` like version 3: presence (the persisted presence map),
/// partial-state joins (the rooms joined with partial state and the servers their join answer
/// named), full-text search (the FTS5 index, and the statement that fills it from the events
/// already stored), the soft-failed events index (sticky federation: re-evaluating
/// soft-failed sticky events) and push rules that run (`push_actions`, `push_counts_changed`,
/// `pushers`, `push_queue` and the evaluator's position).
const V3_TO_V4_BLOCKS: &[&str] = &[
    "-- presence (schema v4)",
    "-- partial-state (schema v4)",
    "-- search (schema v4)",
    "-- sticky federation (schema v4)",
    "-- push (schema v4)",
];

/// Version 5, blocks of `schema.sql` like version 4 (a change to an existing table is an
/// `ALTER` in its block): pushers tied to their device and the index the notification pruning
/// walks (`pushfix`); the events received or sent while their room was partial-state,
/// re-authorised after its resync (`partial_state_events`).
const V4_TO_V5_BLOCKS: &[&str] = &[
    "-- pushfix (schema v5)",
    "-- partial-state reauth (schema v5)",
];

/// Version 6: the index of the servers with a joined member in a room (`member servers`), and
/// the count of unprocessed sends of an outbox row (`outbox retries`).
const V5_TO_V6_BLOCKS: &[&str] = &[
    "-- member servers (schema v6)",
    "-- outbox retries (schema v6)",
];

/// The block of `SCHEMA` that starts with the comment line `marker` and runs to the next
/// block marked `(schema v…)` or the end: a step that only adds tables is written once.
fn schema_block(marker: &str) -> Result<&'static str> {
    let start = SCHEMA
        .find(marker)
        .ok_or_else(|| Error::internal(format_args!("schema.sql lacks {marker:?}")))?;
    let rest = &SCHEMA[start..];
    let end = rest[marker.len()..]
        .match_indices("\n-- ")
        .map(|(i, _)| i + marker.len() + 1)
        .find(|&i| {
            rest[i..]
                .lines()
                .next()
                .is_some_and(|l| l.contains("(schema v"))
        })
        .unwrap_or(rest.len());
    Ok(&rest[..end])
}

pub fn migrate(conn: &mut Connection) -> Result<()> {
    let blocks = |list: &[&str]| -> Result<String> {
        Ok(list
            .iter()
            .map(|b| schema_block(b))
            .collect::<Result<Vec<_>>>()?
            .concat())
    };
    let (v3, v4) = (blocks(V2_TO_V3_BLOCKS)?, blocks(V3_TO_V4_BLOCKS)?);
    let (v5, v6) = (blocks(V4_TO_V5_BLOCKS)?, blocks(V5_TO_V6_BLOCKS)?);
    let steps = [V1_TO_V2, v3.as_str(), v4.as_str(), v5.as_str(), v6.as_str()];
    migrate_with(conn, SCHEMA, SCHEMA_VERSION, &steps)
}

/// The runner, with the schema and steps as parameters so tests can exercise an upgrade.
fn migrate_with(conn: &mut Connection, schema: &str, target: i64, steps: &[&str]) -> Result<()> {
    let has_meta: bool = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
            [],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false);
    let current: i64 = if has_meta {
        conn.query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
    } else {
        0
    };
    if current > target {
        return Err(Error::internal(format_args!(
            "database schema version {current} is newer than this binary's {target}"
        )));
    }
    if current == 0 {
        let tx = conn.transaction()?;
        tx.execute_batch(schema)?;
        set_version(&tx, target)?;
        tx.commit()?;
        log::info!("created database schema version {target}");
        return Ok(());
    }
    for v in current..target {
        let tx = conn.transaction()?;
        let step = steps
            .get((v - 1) as usize)
            .ok_or_else(|| Error::internal("missing migration step"))?;
        tx.execute_batch(step)?;
        set_version(&tx, v + 1)?;
        tx.commit()?;
        log::info!("migrated database schema to version {}", v + 1);
    }
    Ok(())
}

fn set_version(conn: &Connection, v: i64) -> Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [v.to_string()],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_database_is_stamped_and_rerun_is_a_no_op() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: String = conn
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION.to_string());
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name='events'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn older_database_is_upgraded_in_place_step_by_step() {
        let mut conn = Connection::open_in_memory().unwrap();
        let v1 = "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL); CREATE TABLE t (a INTEGER);";
        migrate_with(&mut conn, v1, 1, &[]).unwrap();
        conn.execute("INSERT INTO t (a) VALUES (7)", []).unwrap();
        let steps = [
            "ALTER TABLE t ADD COLUMN b TEXT DEFAULT 'x';",
            "CREATE INDEX t_b ON t(b);",
        ];
        migrate_with(&mut conn, "unused for an existing database", 3, &steps).unwrap();
        let (a, b): (i64, String) = conn
            .query_row("SELECT a, b FROM t", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert_eq!((a, b.as_str()), (7, "x"), "existing rows are kept");
        let v: String = conn
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(v, "3");
        // A failing step leaves the database at the last good version.
        let bad = ["ALTER TABLE t ADD COLUMN b TEXT;"];
        assert!(migrate_with(&mut conn, "", 4, &[steps[0], steps[1], bad[0]]).is_err());
        let v: String = conn
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(v, "3");
    }

    #[test]
    fn version_2_database_gets_the_media_and_sticky_tables() {
        let mut conn = Connection::open_in_memory().unwrap();
        let media = schema_block("-- media (schema v3)").unwrap();
        assert!(media.contains("CREATE TABLE IF NOT EXISTS media_thumbnails"));
        let mut v2 = SCHEMA.to_owned();
        for b in V2_TO_V3_BLOCKS
            .iter()
            .chain(V4_TO_V5_BLOCKS)
            .chain(V5_TO_V6_BLOCKS)
        {
            v2 = v2.replace(schema_block(b).unwrap(), "");
        }
        migrate_with(&mut conn, &v2, 2, &[]).unwrap();
        let tables = |c: &Connection| -> i64 {
            c.query_row(
                "SELECT count(*) FROM sqlite_master WHERE name IN ('media', 'media_thumbnails', 'sticky_events')",
                [],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(tables(&conn), 0);
        migrate(&mut conn).unwrap();
        assert_eq!(tables(&conn), 3);
    }

    #[test]
    fn version_3_database_gets_a_search_index_of_its_events() {
        let mut conn = Connection::open_in_memory().unwrap();
        let mut v3 = SCHEMA.replace(schema_block(V3_TO_V4_BLOCKS[0]).unwrap(), "");
        for b in V4_TO_V5_BLOCKS.iter().chain(V5_TO_V6_BLOCKS) {
            v3 = v3.replace(schema_block(b).unwrap(), "");
        }
        migrate_with(&mut conn, &v3, 3, &[]).unwrap();
        let ev = |pos: i64, kind: &str, content: &str, outlier: i64, rejected: Option<&str>| {
            conn.execute(
                "INSERT INTO events (pos, event_id, room_id, type, sender, origin_server_ts,
                     received_ts, depth, json, outlier, rejected_reason)
                 VALUES (?1, ?2, '!r:x', ?3, '@a:x', 0, 0, ?1, ?4, ?5, ?6)",
                rusqlite::params![
                    pos,
                    format!("$e{pos}"),
                    kind,
                    format!("{{\"content\":{content}}}"),
                    outlier,
                    rejected
                ],
            )
            .unwrap();
        };
        ev(1, "m.room.message", r#"{"body":"hello there"}"#, 0, None);
        ev(2, "m.room.topic", r#"{"topic":"hello topic"}"#, 0, None);
        ev(3, "m.room.encrypted", r#"{"ciphertext":"hello"}"#, 0, None);
        ev(4, "m.room.message", r#"{"body":"hello outlier"}"#, 1, None);
        ev(
            5,
            "m.room.message",
            r#"{"body":"hello rejected"}"#,
            0,
            Some("no"),
        );
        ev(6, "m.room.message", r#"{"body":["hello"]}"#, 0, None);
        migrate(&mut conn).unwrap();
        let mut stmt = conn
            .prepare("SELECT rowid, key FROM event_search WHERE event_search MATCH 'hello' ORDER BY rowid")
            .unwrap();
        let hits: Vec<(i64, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            hits,
            vec![(1, "content.body".into()), (2, "content.topic".into())]
        );
    }

    #[test]
    fn version_4_database_keeps_its_pushers_and_ties_new_ones_to_a_device() {
        let mut conn = Connection::open_in_memory().unwrap();
        let mut v4 = SCHEMA.to_owned();
        for b in V4_TO_V5_BLOCKS.iter().chain(V5_TO_V6_BLOCKS) {
            v4 = v4.replace(schema_block(b).unwrap(), "");
        }
        migrate_with(&mut conn, &v4, 4, &[]).unwrap();
        conn.execute(
            "INSERT INTO pushers (user_id, app_id, pushkey, url, pusher, created_ts)
             VALUES ('@a:x', 'app', 'key', 'http://gw/_matrix/push/v1/notify', '{}', 1)",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let device: Option<String> = conn
            .query_row(
                "SELECT device_id FROM pushers WHERE user_id = '@a:x'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(device, None, "the old pusher is kept, without a device");
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'push_actions_ts'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn version_5_database_gets_the_member_server_index_and_the_server_list_uses_it() {
        let mut conn = Connection::open_in_memory().unwrap();
        let mut v5 = SCHEMA.to_owned();
        for b in V5_TO_V6_BLOCKS {
            v5 = v5.replace(schema_block(b).unwrap(), "");
        }
        migrate_with(&mut conn, &v5, 5, &[]).unwrap();
        let member = |c: &Connection, user: &str, membership: &str| {
            c.execute(
                "INSERT OR REPLACE INTO current_state (room_id, type, state_key, event_id, membership, pos)
                 VALUES ('!r:a', 'm.room.member', ?1, '$' || ?1, ?2, 1)",
                [user, membership],
            )
            .unwrap();
        };
        for (u, m) in [
            ("@x:a", "join"),
            ("@y:a", "join"),
            ("@z:b.example:8448", "join"),
            ("@w:c", "leave"),
            ("@v:d", "invite"),
            ("@u:e", "join"),
        ] {
            member(&conn, u, m);
        }
        migrate(&mut conn).unwrap();
        let plan: Vec<String> = conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT 1 FROM current_state WHERE room_id = '!r:a'
                   AND type = 'm.room.member' AND membership = 'join'
                   AND substr(state_key, instr(state_key, ':') + 1) > 'a'",
            )
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|p| p.contains("current_state_member_server")),
            "{plan:?}"
        );
        use crate::store::queries as q;
        let mut servers = q::list_room_servers(&conn, "!r:a", "").unwrap();
        servers.sort();
        assert_eq!(servers, ["a", "b.example:8448", "e"]);
        assert_eq!(q::list_room_servers(&conn, "!r:a", "e").unwrap().len(), 2);
        assert!(q::server_has_joined_member(&conn, "!r:a", "a", "@x:a").unwrap());
        member(&conn, "@y:a", "leave");
        assert!(!q::server_has_joined_member(&conn, "!r:a", "a", "@x:a").unwrap());
        assert!(q::server_has_joined_member(&conn, "!r:a", "a", "").unwrap());
        assert!(!q::server_has_joined_member(&conn, "!r:a", "c", "").unwrap());
        assert!(!q::server_has_joined_member(&conn, "!r:a", "d", "").unwrap());
        member(&conn, "@x:a", "ban");
        let mut servers = q::list_room_servers(&conn, "!r:a", "").unwrap();
        servers.sort();
        assert_eq!(servers, ["b.example:8448", "e"]);
    }

    #[test]
    fn newer_database_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        conn.execute(
            "UPDATE meta SET value = '999' WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
        assert!(migrate(&mut conn).is_err());
    }
}
