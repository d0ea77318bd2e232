//! SQL for every table, grouped by what it serves. Reads take `&Connection`; writes run inside
//! the writer (they take `&Connection` too, which is the writer's transaction via `Deref`).
//! Names say what they do: `get_*` → `Option`, `list_*` → `Vec`, `insert_*`/`upsert_*`/`delete_*`.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;

/// The largest stream position ever handed out (the writer resumes after it). The writer
/// records it in `meta.stream_high_water` in every batch that takes one, because not every
/// position is kept in `events`: a state reset's is kept only in `current_state`, a sticky
/// event delivered apart from its place in the room only in `sticky_events`, push counts in
/// `push_counts_changed`, and some in no table at all. A restart that handed one out again
/// would put new events at or below a client's `since`, and `/sync` would never send them
/// (seen in `tests/sticky_federation.rs`). The tables are read too, for databases last written
/// before the high-water mark was recorded.
pub fn max_stream_pos(conn: &Connection) -> Result<i64> {
    // `stream_high_water` is what the writer records with every batch that took a position;
    // the tables are read as well for databases last written before it was recorded.
    let pos: i64 = conn.query_row(
        "SELECT max(coalesce((SELECT CAST(value AS INTEGER) FROM meta
                              WHERE key = 'stream_high_water'), 0),
                    coalesce((SELECT max(pos) FROM events), 0),
                    coalesce((SELECT max(pos) FROM account_data), 0),
                    coalesce((SELECT max(pos) FROM receipts), 0),
                    coalesce((SELECT max(pos) FROM current_state), 0),
                    coalesce((SELECT max(pos) FROM sticky_events), 0),
                    coalesce((SELECT max(pos) FROM push_counts_changed), 0),
                    coalesce((SELECT max(pos) FROM partial_state_completed), 0))",
        [],
        |r| r.get(0),
    )?;
    Ok(pos.max(super::e2ee::max_stream_pos(conn)?))
}

// ---------------------------------------------------------------- meta

/// Records the highest stream position handed out (in the batch that took it).
pub fn set_stream_high_water(conn: &Connection, pos: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('stream_high_water', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute([pos.to_string()])?;
    Ok(())
}

pub fn get_meta(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?)
}

pub fn upsert_meta(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

/// What a database says about the server it belongs to: its server name and its signing key
/// (base64 DER, version), each absent in a fresh database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub server_name: Option<String>,
    pub signing_key: Option<(String, String)>,
}

/// Reads the server's identity (a read; see [`init_identity`] for the first start).
pub fn load_identity(conn: &Connection) -> Result<Identity> {
    let signing_key = match (
        get_meta(conn, "signing_key")?,
        get_meta(conn, "signing_key_version")?,
    ) {
        (Some(k), Some(v)) => Some((k, v)),
        _ => None,
    };
    Ok(Identity {
        server_name: get_meta(conn, "server_name")?,
        signing_key,
    })
}

/// Stores the server name and signing key where the database has none yet (a write, run by
/// the writer), and returns what is stored afterwards: whatever was there first wins.
pub fn init_identity(
    conn: &Connection,
    server_name: &str,
    key_b64: &str,
    key_version: &str,
) -> Result<Identity> {
    let mut id = load_identity(conn)?;
    if id.server_name.is_none() {
        upsert_meta(conn, "server_name", server_name)?;
        id.server_name = Some(server_name.to_owned());
    }
    if id.signing_key.is_none() {
        upsert_meta(conn, "signing_key", key_b64)?;
        upsert_meta(conn, "signing_key_version", key_version)?;
        id.signing_key = Some((key_b64.to_owned(), key_version.to_owned()));
    }
    Ok(id)
}

// ---------------------------------------------------------------- users, devices, tokens

pub struct UserRow {
    pub password_hash: Option<String>,
    pub is_admin: bool,
    pub deactivated: bool,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

pub fn get_user(conn: &Connection, user_id: &str) -> Result<Option<UserRow>> {
    Ok(conn
        .query_row(
            "SELECT password_hash, is_admin, deactivated, displayname, avatar_url FROM users WHERE user_id = ?1",
            [user_id],
            |r| {
                Ok(UserRow {
                    password_hash: r.get(0)?,
                    is_admin: r.get(1)?,
                    deactivated: r.get(2)?,
                    displayname: r.get(3)?,
                    avatar_url: r.get(4)?,
                })
            },
        )
        .optional()?)
}

pub fn insert_user(
    conn: &Connection,
    user_id: &str,
    password_hash: Option<&str>,
    admin: bool,
    displayname: &str,
    now: u64,
) -> Result<()> {
    conn.execute(
        "INSERT INTO users (user_id, password_hash, is_admin, displayname, created_ts) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![user_id, password_hash, admin, displayname, now as i64],
    )?;
    Ok(())
}

pub fn update_password(conn: &Connection, user_id: &str, hash: &str) -> Result<()> {
    conn.execute(
        "UPDATE users SET password_hash = ?2 WHERE user_id = ?1",
        [user_id, hash],
    )?;
    Ok(())
}

pub fn update_profile(
    conn: &Connection,
    user_id: &str,
    displayname: Option<&str>,
    avatar_url: Option<&str>,
) -> Result<()> {
    conn.execute(
        "UPDATE users SET displayname = ?2, avatar_url = ?3 WHERE user_id = ?1",
        params![user_id, displayname, avatar_url],
    )?;
    Ok(())
}

pub fn upsert_device(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    display_name: Option<&str>,
    now: u64,
) -> Result<()> {
    conn.execute(
        "INSERT INTO devices (user_id, device_id, display_name, last_seen_ts) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (user_id, device_id) DO UPDATE SET
           display_name = coalesce(excluded.display_name, devices.display_name), last_seen_ts = excluded.last_seen_ts",
        params![user_id, device_id, display_name, now as i64],
    )?;
    Ok(())
}

pub struct DeviceRow {
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ts: Option<i64>,
    pub last_seen_ip: Option<String>,
}

pub fn list_devices(
    conn: &Connection,
    user_id: &str,
    only: Option<&str>,
) -> Result<Vec<DeviceRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT device_id, display_name, last_seen_ts, last_seen_ip FROM devices
         WHERE user_id = ?1 AND (?2 IS NULL OR device_id = ?2) ORDER BY device_id",
    )?;
    let rows = stmt.query_map(params![user_id, only], |r| {
        Ok(DeviceRow {
            device_id: r.get(0)?,
            display_name: r.get(1)?,
            last_seen_ts: r.get(2)?,
            last_seen_ip: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn update_device_name(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    name: Option<&str>,
) -> Result<bool> {
    Ok(conn.execute(
        "UPDATE devices SET display_name = ?3 WHERE user_id = ?1 AND device_id = ?2",
        params![user_id, device_id, name],
    )? > 0)
}

/// Which of a user's devices an operation applies to.
#[derive(Clone, Copy)]
pub enum Devices<'a> {
    One(&'a str),
    All,
    AllBut(&'a str),
}

/// Deletes access tokens (and, with `and_devices`, the devices themselves) and returns the
/// hashes of the tokens removed, so the caller can evict exactly those from the token cache
/// without a separate read.
pub fn delete_sessions(
    conn: &Connection,
    user_id: &str,
    which: Devices<'_>,
    and_devices: bool,
) -> Result<Vec<String>> {
    let (device, all_but) = match which {
        Devices::One(d) => (Some(d), false),
        Devices::All => (None, false),
        Devices::AllBut(d) => (Some(d), true),
    };
    let filter = "user_id = ?1 AND (?2 IS NULL OR (device_id = ?2) != ?3)";
    let mut stmt = conn.prepare_cached(&format!(
        "DELETE FROM access_tokens WHERE {filter} RETURNING token_hash"
    ))?;
    let hashes = stmt
        .query_map(params![user_id, device, all_but], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if and_devices {
        conn.execute(
            &format!("DELETE FROM devices WHERE {filter}"),
            params![user_id, device, all_but],
        )?;
    }
    Ok(hashes)
}

pub fn insert_token(
    conn: &Connection,
    token_hash: &str,
    user_id: &str,
    device_id: &str,
    now: u64,
) -> Result<()> {
    conn.execute(
        "INSERT INTO access_tokens (token_hash, user_id, device_id, created_ts) VALUES (?1, ?2, ?3, ?4)",
        params![token_hash, user_id, device_id, now as i64],
    )?;
    Ok(())
}

pub fn get_token(conn: &Connection, token_hash: &str) -> Result<Option<(String, String)>> {
    Ok(conn
        .query_row(
            "SELECT t.user_id, t.device_id FROM access_tokens t JOIN users u ON u.user_id = t.user_id
             WHERE t.token_hash = ?1 AND u.deactivated = 0",
            [token_hash],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

// ---------------------------------------------------------------- rooms and state

pub fn get_room_version(conn: &Connection, room_id: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT room_version FROM rooms WHERE room_id = ?1",
            [room_id],
            |r| r.get(0),
        )
        .optional()?)
}

pub fn get_room_state_group(conn: &Connection, room_id: &str) -> Result<Option<i64>> {
    Ok(conn
        .query_row(
            "SELECT state_group FROM rooms WHERE room_id = ?1",
            [room_id],
            |r| r.get(0),
        )
        .optional()?
        .flatten())
}

pub fn get_current_state(
    conn: &Connection,
    room_id: &str,
    kind: &str,
    state_key: &str,
) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT event_id FROM current_state WHERE room_id = ?1 AND type = ?2 AND state_key = ?3",
            [room_id, kind, state_key],
            |r| r.get(0),
        )
        .optional()?)
}

/// A user's membership in a room (`join`, `invite`, `leave`, `ban`, `knock`), if any.
pub fn get_membership(conn: &Connection, room_id: &str, user_id: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT membership FROM current_state WHERE room_id = ?1 AND type = 'm.room.member' AND state_key = ?2",
            [room_id, user_id],
            |r| r.get(0),
        )
        .optional()?
        .flatten())
}

/// (room_id, membership, pos of the member event) for every room a user has a membership in.
pub fn list_user_rooms(conn: &Connection, user_id: &str) -> Result<Vec<(String, String, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT room_id, membership, pos FROM current_state WHERE type = 'm.room.member' AND state_key = ?1",
    )?;
    let rows = stmt.query_map([user_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// (user_id, membership) of every member event in a room's current state.
pub fn list_members(conn: &Connection, room_id: &str) -> Result<Vec<(String, String, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT state_key, membership, event_id FROM current_state WHERE room_id = ?1 AND type = 'm.room.member'",
    )?;
    let rows = stmt.query_map([room_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// (type, state_key, event_id, pos) of the room's current state.
pub fn list_current_state(
    conn: &Connection,
    room_id: &str,
) -> Result<Vec<(String, String, String, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT type, state_key, event_id, pos FROM current_state WHERE room_id = ?1",
    )?;
    let rows = stmt.query_map([room_id], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub type StateMap = BTreeMap<(String, String), String>;

/// The full state of a state group: walks the delta chain to its root and applies the deltas
/// from the root down.
pub fn load_state_group(conn: &Connection, group: i64) -> Result<StateMap> {
    let mut chain = vec![group];
    let mut cur = group;
    while let Some(prev) = conn
        .query_row(
            "SELECT prev_group FROM state_groups WHERE id = ?1",
            [cur],
            |r| r.get::<_, Option<i64>>(0),
        )
        .optional()?
        .flatten()
    {
        chain.push(prev);
        cur = prev;
    }
    let mut state = StateMap::new();
    let mut stmt = conn.prepare_cached(
        "SELECT type, state_key, event_id FROM state_group_entries WHERE group_id = ?1",
    )?;
    for g in chain.iter().rev() {
        let rows = stmt.query_map([g], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?;
        for row in rows {
            let (k, v) = row?;
            state.insert(k, v);
        }
    }
    Ok(state)
}

/// Longest delta chain before a group is stored whole again.
const MAX_CHAIN: i64 = 50;

/// Stores the state `parent` + `delta` as a new group and returns its id.
pub fn insert_state_group(
    conn: &Connection,
    room_id: &str,
    parent: Option<i64>,
    delta: &[(&str, &str, &str)],
) -> Result<i64> {
    let parent_chain: Option<i64> = match parent {
        Some(p) => conn
            .query_row(
                "SELECT chain_len FROM state_groups WHERE id = ?1",
                [p],
                |r| r.get(0),
            )
            .optional()?,
        None => None,
    };
    let (prev, chain_len, entries): (Option<i64>, i64, Vec<(String, String, String)>) =
        match (parent, parent_chain) {
            (Some(p), Some(len)) if len < MAX_CHAIN => (
                Some(p),
                len + 1,
                delta
                    .iter()
                    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
                    .collect(),
            ),
            (Some(p), _) => {
                let mut full = load_state_group(conn, p)?;
                for (t, k, e) in delta {
                    full.insert((t.to_string(), k.to_string()), e.to_string());
                }
                (
                    None,
                    0,
                    full.into_iter().map(|((t, k), e)| (t, k, e)).collect(),
                )
            }
            (None, _) => (
                None,
                0,
                delta
                    .iter()
                    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
                    .collect(),
            ),
        };
    conn.execute(
        "INSERT INTO state_groups (room_id, prev_group, chain_len) VALUES (?1, ?2, ?3)",
        params![room_id, prev, chain_len],
    )?;
    let id = conn.last_insert_rowid();
    let mut stmt = conn.prepare_cached("INSERT INTO state_group_entries (group_id, type, state_key, event_id) VALUES (?1, ?2, ?3, ?4)")?;
    for (t, k, e) in entries {
        stmt.execute(params![id, t, k, e])?;
    }
    Ok(id)
}

// ---------------------------------------------------------------- events

/// One stored event, as the client-facing formatter needs it.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub pos: i64,
    pub event_id: String,
    pub json: String,
    /// `None` for outliers (known without their state).
    pub state_group: Option<i64>,
    pub replaces_state: Option<String>,
    pub redacted_by: Option<String>,
    pub txn_device: Option<String>,
    pub txn_id: Option<String>,
    pub sender: String,
    pub kind: String,
    pub state_key: Option<String>,
}

pub(crate) const EVENT_COLS: &str =
    "pos, event_id, json, state_group, replaces_state, redacted_by, txn_device, txn_id, sender, type, state_key";

pub(crate) fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        pos: r.get(0)?,
        event_id: r.get(1)?,
        json: r.get(2)?,
        state_group: r.get(3)?,
        replaces_state: r.get(4)?,
        redacted_by: r.get(5)?,
        txn_device: r.get(6)?,
        txn_id: r.get(7)?,
        sender: r.get(8)?,
        kind: r.get(9)?,
        state_key: r.get(10)?,
    })
}

pub fn get_event(conn: &Connection, event_id: &str) -> Result<Option<EventRow>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLS} FROM events WHERE event_id = ?1"
    ))?;
    Ok(stmt.query_row([event_id], event_row).optional()?)
}

/// The stored events among `ids` (unknown IDs are skipped), in the order given.
pub fn get_events<I, S>(conn: &Connection, ids: I) -> Result<Vec<EventRow>>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = Vec::new();
    for id in ids {
        if let Some(row) = get_event(conn, id.as_ref())? {
            out.push(row);
        }
    }
    Ok(out)
}

pub fn get_event_room(conn: &Connection, event_id: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT room_id FROM events WHERE event_id = ?1",
            [event_id],
            |r| r.get(0),
        )
        .optional()?)
}

/// The condition for an event that is part of the room as clients see it: not an outlier,
/// not rejected, not soft-failed.
pub const IN_ROOM: &str = "rejected_reason IS NULL AND soft_failed = 0 AND outlier = 0";

/// Events of a room with `after < pos <= upto`, the newest `limit` of them when `newest_first`,
/// else the oldest; always returned in the order asked.
pub fn list_room_events(
    conn: &Connection,
    room_id: &str,
    after: i64,
    upto: i64,
    limit: usize,
    newest_first: bool,
) -> Result<Vec<EventRow>> {
    let order = if newest_first { "DESC" } else { "ASC" };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLS} FROM events WHERE room_id = ?1 AND pos > ?2 AND pos <= ?3 AND {IN_ROOM}
         ORDER BY pos {order} LIMIT ?4"
    ))?;
    let rows = stmt.query_map(params![room_id, after, upto, limit as i64], event_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The state group after the last event of the room at or before `pos` (the state at `pos`).
pub fn get_state_group_at(conn: &Connection, room_id: &str, pos: i64) -> Result<Option<i64>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT state_group FROM events WHERE room_id = ?1 AND pos <= ?2 AND {IN_ROOM} ORDER BY pos DESC LIMIT 1"
    ))?;
    Ok(stmt
        .query_row(params![room_id, pos], |r| r.get(0))
        .optional()?
        .flatten())
}

/// A PDU to store, with what the store records about it besides its JSON.
pub struct NewEventRow<'a> {
    pub pos: i64,
    pub event_id: &'a str,
    pub room_id: &'a str,
    pub kind: &'a str,
    pub state_key: Option<&'a str>,
    pub sender: &'a str,
    pub origin_server_ts: i64,
    pub received_ts: i64,
    pub depth: i64,
    pub json: &'a str,
    pub state_group: Option<i64>,
    pub replaces_state: Option<&'a str>,
    /// (device, txn ID) of a local client send.
    pub txn: Option<(&'a str, &'a str)>,
    pub outlier: bool,
    pub rejected_reason: Option<&'a str>,
    pub soft_failed: bool,
    pub prev_events: &'a [&'a str],
    pub auth_events: &'a [&'a str],
}

/// Inserts an event with its graph edges (prev and auth events).
pub fn insert_event(conn: &Connection, e: &NewEventRow<'_>) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO events (pos, event_id, room_id, type, state_key, sender, origin_server_ts,
             received_ts, depth, json, state_group, replaces_state, txn_device, txn_id, outlier,
             rejected_reason, soft_failed)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )?
    .execute(params![
        e.pos,
        e.event_id,
        e.room_id,
        e.kind,
        e.state_key,
        e.sender,
        e.origin_server_ts,
        e.received_ts,
        e.depth,
        e.json,
        e.state_group,
        e.replaces_state,
        e.txn.map(|t| t.0),
        e.txn.map(|t| t.1),
        e.outlier,
        e.rejected_reason,
        e.soft_failed,
    ])?;
    let mut edge = conn.prepare_cached(
        "INSERT OR IGNORE INTO event_edges (event_id, prev_event_id) VALUES (?1, ?2)",
    )?;
    for p in e.prev_events {
        edge.execute([e.event_id, p])?;
    }
    let mut auth = conn.prepare_cached(
        "INSERT OR IGNORE INTO event_auth (event_id, auth_event_id) VALUES (?1, ?2)",
    )?;
    for a in e.auth_events {
        auth.execute([e.event_id, a])?;
    }
    Ok(())
}

/// Replaces the stored JSON of a redacted event.
pub fn set_event_redacted(conn: &Connection, event_id: &str, json: &str, by: &str) -> Result<()> {
    conn.execute(
        "UPDATE events SET json = ?2, redacted_by = ?3 WHERE event_id = ?1",
        params![event_id, json, by],
    )?;
    Ok(())
}

/// The room's forward extremities with their depths.
pub fn list_forward_extremities(conn: &Connection, room_id: &str) -> Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT f.event_id, e.depth FROM forward_extremities f JOIN events e ON e.event_id = f.event_id
         WHERE f.room_id = ?1",
    )?;
    let rows = stmt.query_map([room_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// An event's depth, if held.
pub fn get_event_depth(conn: &Connection, event_id: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT depth FROM events WHERE event_id = ?1")?
        .query_row([event_id], |r| r.get(0))
        .optional()?)
}

/// Makes `event_id` a forward extremity in place of the `prev_events` it references.
pub fn advance_forward_extremities(
    conn: &Connection,
    room_id: &str,
    event_id: &str,
    prev_events: &[&str],
) -> Result<()> {
    let mut del = conn
        .prepare_cached("DELETE FROM forward_extremities WHERE room_id = ?1 AND event_id = ?2")?;
    for p in prev_events {
        del.execute([room_id, p])?;
    }
    conn.prepare_cached("INSERT INTO forward_extremities (room_id, event_id) VALUES (?1, ?2)")?
        .execute([room_id, event_id])?;
    Ok(())
}

pub fn insert_txn_id(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    txn_id: &str,
    event_id: &str,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO txn_ids (user_id, device_id, txn_id, event_id) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute([user_id, device_id, txn_id, event_id])?;
    Ok(())
}

/// Sets one entry of the room's current state; `membership` is taken from the event's
/// content for member events.
pub fn upsert_current_state(
    conn: &Connection,
    room_id: &str,
    kind: &str,
    state_key: &str,
    event_id: &str,
    pos: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO current_state (room_id, type, state_key, event_id, membership, pos)
         SELECT ?1, ?2, ?3, ?4,
                CASE WHEN ?2 = 'm.room.member' THEN json_extract(json, '$.content.membership') END, ?5
         FROM events WHERE event_id = ?4
         ON CONFLICT (room_id, type, state_key) DO UPDATE SET event_id = excluded.event_id,
           membership = excluded.membership, pos = excluded.pos",
    )?
    .execute(params![room_id, kind, state_key, event_id, pos])?;
    Ok(())
}

pub fn delete_current_state(
    conn: &Connection,
    room_id: &str,
    kind: &str,
    state_key: &str,
) -> Result<()> {
    conn.prepare_cached(
        "DELETE FROM current_state WHERE room_id = ?1 AND type = ?2 AND state_key = ?3",
    )?
    .execute([room_id, kind, state_key])?;
    Ok(())
}

pub fn set_room_state_group(conn: &Connection, room_id: &str, group: i64) -> Result<()> {
    conn.prepare_cached("UPDATE rooms SET state_group = ?2 WHERE room_id = ?1")?
        .execute(params![room_id, group])?;
    Ok(())
}

/// Every event in the auth chains of `roots` (not the roots themselves), by a recursive walk
/// of `event_auth`. Auth events we do not hold are included (the caller decides whether a
/// gap matters).
pub fn list_auth_chain<I, S>(conn: &Connection, roots: I) -> Result<Vec<String>>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let roots: Vec<String> = roots.into_iter().map(|s| s.as_ref().to_owned()).collect();
    let roots = serde_json::to_string(&roots)?;
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE chain(id) AS (
             SELECT a.auth_event_id FROM json_each(?1) r JOIN event_auth a ON a.event_id = r.value
             UNION
             SELECT a.auth_event_id FROM chain c JOIN event_auth a ON a.event_id = c.id
         )
         SELECT id FROM chain",
    )?;
    let rows = stmt.query_map([roots], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Events reachable backwards from `latest` through prev-event edges, stopping at `earliest`
/// (not included), newest first by depth, at most `limit` — the walk behind federation's
/// `/get_missing_events`. Only events we hold and that are part of the room are returned.
pub fn list_missing_events(
    conn: &Connection,
    room_id: &str,
    earliest: &[&str],
    latest: &[&str],
    limit: usize,
) -> Result<Vec<EventRow>> {
    let earliest = serde_json::to_string(earliest)?;
    let latest = serde_json::to_string(latest)?;
    let mut stmt = conn.prepare_cached(&format!(
        "WITH RECURSIVE walk(id, steps) AS (
             SELECT e.prev_event_id, 1 FROM json_each(?2) l JOIN event_edges e ON e.event_id = l.value
             UNION
             SELECT e.prev_event_id, w.steps + 1 FROM walk w JOIN event_edges e ON e.event_id = w.id
             WHERE w.id NOT IN (SELECT value FROM json_each(?1)) AND w.steps < ?4
         )
         SELECT {EVENT_COLS} FROM events
         WHERE event_id IN (SELECT id FROM walk) AND event_id NOT IN (SELECT value FROM json_each(?1))
           AND room_id = ?3 AND {IN_ROOM}
         ORDER BY depth DESC, pos DESC LIMIT ?4"
    ))?;
    let rows = stmt.query_map(params![earliest, latest, room_id, limit as i64], event_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn get_txn(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    txn_id: &str,
) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT event_id FROM txn_ids WHERE user_id = ?1 AND device_id = ?2 AND txn_id = ?3",
            [user_id, device_id, txn_id],
            |r| r.get(0),
        )
        .optional()?)
}

/// Whether a room has an event or a receipt with `since < pos <= upto` (two index probes:
/// `events_room_pos`, `receipts_room_pos`).
pub fn room_changed_between(
    conn: &Connection,
    room_id: &str,
    since: i64,
    upto: i64,
) -> Result<bool> {
    let mut stmt = conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM events WHERE room_id = ?1 AND pos > ?2 AND pos <= ?3)
             OR EXISTS (SELECT 1 FROM receipts WHERE room_id = ?1 AND pos > ?2 AND pos <= ?3)",
    )?;
    Ok(stmt.query_row(params![room_id, since, upto], |r| r.get(0))?)
}

/// Event IDs of the room's current state that changed with `since < pos <= upto`.
pub fn list_current_state_ids_between(
    conn: &Connection,
    room_id: &str,
    since: i64,
    upto: i64,
) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT event_id FROM current_state WHERE room_id = ?1 AND pos > ?2 AND pos <= ?3",
    )?;
    let rows = stmt.query_map(params![room_id, since, upto], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Rooms a user has forgotten.
pub fn list_forgotten_rooms(conn: &Connection, user_id: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT room_id FROM forgotten_rooms WHERE user_id = ?1")?;
    let rows = stmt.query_map([user_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---------------------------------------------------------------- aliases and directory

pub fn get_alias(conn: &Connection, alias: &str) -> Result<Option<(String, String)>> {
    Ok(conn
        .query_row(
            "SELECT room_id, creator FROM room_aliases WHERE alias = ?1",
            [alias],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

pub fn insert_alias(conn: &Connection, alias: &str, room_id: &str, creator: &str) -> Result<bool> {
    Ok(conn.execute(
        "INSERT OR IGNORE INTO room_aliases (alias, room_id, creator) VALUES (?1, ?2, ?3)",
        [alias, room_id, creator],
    )? > 0)
}

pub fn delete_alias(conn: &Connection, alias: &str) -> Result<bool> {
    Ok(conn.execute("DELETE FROM room_aliases WHERE alias = ?1", [alias])? > 0)
}

pub fn list_aliases(conn: &Connection, room_id: &str) -> Result<Vec<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT alias FROM room_aliases WHERE room_id = ?1 ORDER BY alias")?;
    let rows = stmt.query_map([room_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn set_room_public(conn: &Connection, room_id: &str, public: bool) -> Result<bool> {
    Ok(conn.execute(
        "UPDATE rooms SET is_public = ?2 WHERE room_id = ?1",
        params![room_id, public],
    )? > 0)
}

pub fn get_room_public(conn: &Connection, room_id: &str) -> Result<Option<bool>> {
    Ok(conn
        .query_row(
            "SELECT is_public FROM rooms WHERE room_id = ?1",
            [room_id],
            |r| r.get(0),
        )
        .optional()?)
}

pub fn list_public_rooms(conn: &Connection) -> Result<Vec<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT room_id FROM rooms WHERE is_public = 1 ORDER BY created_ts")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---------------------------------------------------------------- account data, receipts, filters

pub fn upsert_account_data(
    conn: &Connection,
    user_id: &str,
    room_id: &str,
    kind: &str,
    content: &str,
    pos: i64,
) -> Result<()> {
    conn.execute(
        "INSERT INTO account_data (user_id, room_id, type, content, pos) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (user_id, room_id, type) DO UPDATE SET content = excluded.content, pos = excluded.pos",
        params![user_id, room_id, kind, content, pos],
    )?;
    Ok(())
}

pub fn get_account_data(
    conn: &Connection,
    user_id: &str,
    room_id: &str,
    kind: &str,
) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT content FROM account_data WHERE user_id = ?1 AND room_id = ?2 AND type = ?3",
            [user_id, room_id, kind],
            |r| r.get(0),
        )
        .optional()?)
}

/// (room_id, type, content) changed with `since < pos <= upto`.
pub fn list_account_data_between(
    conn: &Connection,
    user_id: &str,
    since: i64,
    upto: i64,
) -> Result<Vec<(String, String, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT room_id, type, content FROM account_data WHERE user_id = ?1 AND pos > ?2 AND pos <= ?3",
    )?;
    let rows = stmt.query_map(params![user_id, since, upto], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[allow(clippy::too_many_arguments)] // one argument per column of the row
pub fn upsert_receipt(
    conn: &Connection,
    room_id: &str,
    kind: &str,
    user_id: &str,
    thread_id: &str,
    event_id: &str,
    ts: u64,
    pos: i64,
) -> Result<()> {
    conn.execute(
        "INSERT INTO receipts (room_id, receipt_type, user_id, thread_id, event_id, ts, pos) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (room_id, receipt_type, user_id, thread_id) DO UPDATE SET event_id = excluded.event_id, ts = excluded.ts, pos = excluded.pos",
        params![room_id, kind, user_id, thread_id, event_id, ts as i64, pos],
    )?;
    Ok(())
}

pub struct ReceiptRow {
    pub kind: String,
    pub user_id: String,
    pub thread_id: String,
    pub event_id: String,
    pub ts: i64,
}

/// Receipts of a room with `since < pos <= upto`.
pub fn list_receipts_between(
    conn: &Connection,
    room_id: &str,
    since: i64,
    upto: i64,
) -> Result<Vec<ReceiptRow>> {
    let mut stmt = conn.prepare_cached("SELECT receipt_type, user_id, thread_id, event_id, ts FROM receipts WHERE room_id = ?1 AND pos > ?2 AND pos <= ?3")?;
    let rows = stmt.query_map(params![room_id, since, upto], |r| {
        Ok(ReceiptRow {
            kind: r.get(0)?,
            user_id: r.get(1)?,
            thread_id: r.get(2)?,
            event_id: r.get(3)?,
            ts: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn insert_filter(conn: &Connection, user_id: &str, json: &str) -> Result<i64> {
    conn.execute(
        "INSERT INTO filters (user_id, json) VALUES (?1, ?2)",
        [user_id, json],
    )?;
    Ok(conn.last_insert_rowid())
}

pub fn get_filter(conn: &Connection, user_id: &str, filter_id: i64) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT json FROM filters WHERE user_id = ?1 AND filter_id = ?2",
            params![user_id, filter_id],
            |r| r.get(0),
        )
        .optional()?)
}

// ---------------------------------------------------------------- federation

/// A remote server's key as stored.
pub struct ServerKeyRow {
    pub key_id: String,
    /// Unpadded base64.
    pub key: String,
    pub valid_until_ts: i64,
    pub expired_ts: Option<i64>,
}

/// A remote server's known keys.
pub fn list_server_keys(conn: &Connection, server: &str) -> Result<Vec<ServerKeyRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT key_id, key, valid_until_ts, expired_ts FROM server_keys WHERE server_name = ?1",
    )?;
    let rows = stmt.query_map([server], |r| {
        Ok(ServerKeyRow {
            key_id: r.get(0)?,
            key: r.get(1)?,
            valid_until_ts: r.get(2)?,
            expired_ts: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Records a remote key; a later answer extends (never shortens) a key's validity.
pub fn upsert_server_key(
    conn: &Connection,
    server: &str,
    key_id: &str,
    key: &str,
    valid_until_ts: i64,
    expired_ts: Option<i64>,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO server_keys (server_name, key_id, key, valid_until_ts, expired_ts)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (server_name, key_id) DO UPDATE SET key = excluded.key,
           valid_until_ts = max(valid_until_ts, excluded.valid_until_ts),
           expired_ts = excluded.expired_ts",
    )?
    .execute(params![server, key_id, key, valid_until_ts, expired_ts])?;
    Ok(())
}

/// Queues a PDU for each destination (one row each) and wakes the federation sender after the
/// commit. Runs in the same write as the event, so a stored event is never left unsent.
pub fn insert_outbox_pdu(
    tx: &mut super::Tx<'_>,
    destinations: &[String],
    event_id: &str,
) -> Result<()> {
    if destinations.is_empty() {
        return Ok(());
    }
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO outbox (destination, kind, event_id) VALUES (?1, 'pdu', ?2)",
        )?;
        for d in destinations {
            stmt.execute([d.as_str(), event_id])?;
        }
    }
    tx.wake(crate::notify::Topic::FederationOutbox);
    Ok(())
}

/// Queues an EDU (its JSON) for each destination; see [`insert_outbox_pdu`].
pub fn insert_outbox_edu(tx: &mut super::Tx<'_>, destinations: &[String], edu: &str) -> Result<()> {
    if destinations.is_empty() {
        return Ok(());
    }
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO outbox (destination, kind, payload) VALUES (?1, 'edu', ?2)",
        )?;
        for d in destinations {
            stmt.execute([d.as_str(), edu])?;
        }
    }
    tx.wake(crate::notify::Topic::FederationOutbox);
    Ok(())
}

/// Servers other than `us` with a joined member in the room (current state; while the room
/// is partial-state, also the servers its join answer named), minus those the
/// room's server ACL denies: this is the list events are sent to, so a denied server gets
/// nothing from us.
///
/// A loose index scan over `current_state_member_server`: one seek per server, so the cost
/// follows the number of servers, not of members (every send in a room pays it).
pub fn list_room_servers(conn: &Connection, room_id: &str, us: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE s(server) AS (
             SELECT min(substr(state_key, instr(state_key, ':') + 1)) FROM current_state
             WHERE room_id = ?1 AND type = 'm.room.member' AND membership = 'join'
             UNION ALL
             SELECT (SELECT min(substr(state_key, instr(state_key, ':') + 1)) FROM current_state
                     WHERE room_id = ?1 AND type = 'm.room.member' AND membership = 'join'
                       AND substr(state_key, instr(state_key, ':') + 1) > s.server)
             FROM s WHERE s.server IS NOT NULL
         )
         SELECT server FROM s WHERE server IS NOT NULL
         UNION SELECT server FROM partial_state_room_servers WHERE room_id = ?1",
    )?;
    let rows = stmt.query_map([room_id], |r| r.get::<_, String>(0))?;
    let mut out: Vec<String> = rows.collect::<rusqlite::Result<_>>()?;
    let acl = super::acl::get_server_acl(conn, room_id)?;
    out.retain(|s| {
        s != us
            && acl.as_ref().is_none_or(|a| {
                <&ruma::ServerName>::try_from(s.as_str()).is_ok_and(|n| a.is_allowed(n))
            })
    });
    Ok(out)
}

/// Whether a user of `server` other than `except` (`""` for nobody) is joined to the room
/// (current state): one seek in `current_state_member_server`.
pub fn server_has_joined_member(
    conn: &Connection,
    room_id: &str,
    server: &str,
    except: &str,
) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM current_state WHERE room_id = ?1 AND type = 'm.room.member'
               AND membership = 'join'
               AND substr(state_key, instr(state_key, ':') + 1) = ?2 AND state_key != ?3
             LIMIT 1",
        )?
        .query_row([room_id, server, except], |_| Ok(()))
        .optional()?
        .is_some())
}

pub fn get_received_txn(conn: &Connection, origin: &str, txn_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM received_txns WHERE origin = ?1 AND txn_id = ?2")?
        .query_row([origin, txn_id], |_| Ok(()))
        .optional()?
        .is_some())
}

pub fn insert_received_txn(conn: &Connection, origin: &str, txn_id: &str, ts: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO received_txns (origin, txn_id, ts) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![origin, txn_id, ts])?;
    Ok(())
}

/// Whether `server` may see the room's events: it has or had a member there (any membership
/// event of one of its users), or the room is `world_readable`.
pub fn server_may_see_room(conn: &Connection, room_id: &str, server: &str) -> Result<bool> {
    let suffix = format!("%:{server}");
    let member: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM events WHERE room_id = ?1 AND type = 'm.room.member'
                 AND state_key LIKE ?2)",
        )?
        .query_row(params![room_id, suffix], |r| r.get(0))?;
    if member {
        return Ok(true);
    }
    let hv: Option<String> = conn
        .prepare_cached(
            "SELECT json_extract(e.json, '$.content.history_visibility') FROM current_state c
             JOIN events e ON e.event_id = c.event_id
             WHERE c.room_id = ?1 AND c.type = 'm.room.history_visibility' AND c.state_key = ''",
        )?
        .query_row([room_id], |r| r.get(0))
        .optional()?
        .flatten();
    Ok(hv.as_deref() == Some("world_readable"))
}

/// Records a room we learn of through federation (a join via another server).
pub fn insert_room_if_absent(
    conn: &Connection,
    room_id: &str,
    version: &str,
    creator: &str,
    now_ms: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO rooms (room_id, room_version, creator, is_public, created_ts)
         VALUES (?1, ?2, ?3, 0, ?4)",
    )?
    .execute(params![room_id, version, creator, now_ms])?;
    Ok(())
}

/// Records a remote invite of a local user: the stripped state it came with, and the
/// membership row that puts the room in the user's `/sync` `invite` section.
pub fn upsert_remote_invite(
    conn: &Connection,
    room_id: &str,
    user_id: &str,
    event_id: &str,
    stripped: &str,
    pos: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO invite_state (room_id, user_id, events) VALUES (?1, ?2, ?3)
         ON CONFLICT (room_id, user_id) DO UPDATE SET events = excluded.events",
    )?
    .execute([room_id, user_id, stripped])?;
    upsert_current_state(conn, room_id, "m.room.member", user_id, event_id, pos)
}

/// The stripped state a remote invite came with, if the room is known to us only by it.
pub fn get_invite_state(conn: &Connection, room_id: &str, user_id: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT events FROM invite_state WHERE room_id = ?1 AND user_id = ?2")?
        .query_row([room_id, user_id], |r| r.get(0))
        .optional()?)
}

// ---------------------------------------------------------------- moved from handlers

pub fn insert_room(
    conn: &Connection,
    room_id: &str,
    version: &str,
    creator: &str,
    public: bool,
    now_ms: i64,
) -> Result<()> {
    conn.execute(
        "INSERT INTO rooms (room_id, room_version, creator, is_public, created_ts) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![room_id, version, creator, public, now_ms],
    )?;
    Ok(())
}

pub fn delete_forgotten_room(conn: &Connection, user_id: &str, room_id: &str) -> Result<()> {
    conn.execute(
        "DELETE FROM forgotten_rooms WHERE user_id = ?1 AND room_id = ?2",
        [user_id, room_id],
    )?;
    Ok(())
}

pub fn insert_forgotten_room(conn: &Connection, user_id: &str, room_id: &str) -> Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO forgotten_rooms (user_id, room_id) VALUES (?1, ?2)",
        [user_id, room_id],
    )?;
    Ok(())
}

/// A user's membership row in the current state: (membership, pos).
pub fn get_membership_pos(
    conn: &Connection,
    room_id: &str,
    user_id: &str,
) -> Result<Option<(String, i64)>> {
    Ok(conn
        .query_row(
            "SELECT membership, pos FROM current_state WHERE room_id = ?1 AND type = 'm.room.member' AND state_key = ?2",
            [room_id, user_id],
            |r| Ok((r.get::<_, Option<String>>(0)?.unwrap_or_default(), r.get(1)?)),
        )
        .optional()?)
}

/// The stream position of a user's first membership event in the room whose membership is
/// `wanted` or `join`.
pub fn get_first_membership_pos(
    conn: &Connection,
    room_id: &str,
    user_id: &str,
    wanted: &str,
) -> Result<Option<i64>> {
    Ok(conn.query_row(
        "SELECT min(pos) FROM events WHERE room_id = ?1 AND type = 'm.room.member' AND state_key = ?2
         AND (json_extract(json, '$.content.membership') = ?3 OR json_extract(json, '$.content.membership') = 'join')",
        params![room_id, user_id, wanted],
        |r| r.get::<_, Option<i64>>(0),
    )?)
}

/// Whether the user was ever joined to the room.
pub fn was_ever_joined(conn: &Connection, room_id: &str, user_id: &str) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM events WHERE room_id = ?1 AND type = 'm.room.member' AND state_key = ?2
             AND json_extract(json, '$.content.membership') = 'join' LIMIT 1",
            [room_id, user_id],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false))
}

/// Uses one registration token if it is valid now; false if it is unknown, used up or expired.
pub fn use_registration_token(conn: &Connection, token: &str, now_ms: i64) -> Result<bool> {
    let n = conn.execute(
        "UPDATE registration_tokens SET completed = completed + 1
         WHERE token = ?1 AND (uses_allowed IS NULL OR completed < uses_allowed) AND (expiry_ts IS NULL OR expiry_ts > ?2)",
        params![token, now_ms],
    )?;
    Ok(n > 0)
}

/// A user directory hit.
pub struct DirectoryUser {
    pub user_id: String,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

/// Users who share a room with `me` or are in a public room, matching `term` (lowercase) in
/// their ID or display name, at most `limit`.
pub fn search_user_directory(
    conn: &Connection,
    me: &str,
    term: &str,
    limit: usize,
) -> Result<Vec<DirectoryUser>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT u.user_id, u.displayname, u.avatar_url
         FROM users u JOIN current_state m ON m.type = 'm.room.member' AND m.state_key = u.user_id AND m.membership = 'join'
         WHERE u.deactivated = 0
           AND (m.room_id IN (SELECT room_id FROM current_state WHERE type = 'm.room.member' AND state_key = ?1 AND membership = 'join')
                OR m.room_id IN (SELECT room_id FROM rooms WHERE is_public = 1))
           AND (instr(lower(u.user_id), ?2) > 0 OR instr(lower(coalesce(u.displayname, '')), ?2) > 0)
         ORDER BY u.user_id LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![me, term, limit as i64], |r| {
        Ok(DirectoryUser {
            user_id: r.get(0)?,
            displayname: r.get(1)?,
            avatar_url: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
