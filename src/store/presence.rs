//! Presence SQL: the persisted copy of the in-memory presence map (`crate::presence`, written
//! in batches by `workers::presence`), and the room-sharing questions presence asks.

use rusqlite::{params, OptionalExtension};

use super::{queries::list_room_servers, Connection};
use crate::error::Result;

/// One user's persisted presence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceRow {
    pub user_id: String,
    pub state: String,
    pub status_msg: Option<String>,
    pub last_active_ts: u64,
    pub last_sync_ts: u64,
}

pub fn list_presence(conn: &Connection) -> Result<Vec<PresenceRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id, state, status_msg, last_active_ts, last_sync_ts FROM presence",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(PresenceRow {
            user_id: r.get(0)?,
            state: r.get(1)?,
            status_msg: r.get(2)?,
            last_active_ts: r.get::<_, i64>(3)?.max(0) as u64,
            last_sync_ts: r.get::<_, i64>(4)?.max(0) as u64,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Writes every row given (one write closure for a whole batch).
pub fn upsert_presence(conn: &Connection, rows: &[PresenceRow]) -> Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO presence (user_id, state, status_msg, last_active_ts, last_sync_ts)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (user_id) DO UPDATE SET state = ?2, status_msg = ?3,
             last_active_ts = ?4, last_sync_ts = ?5",
    )?;
    for r in rows {
        stmt.execute(params![
            r.user_id,
            r.state,
            r.status_msg,
            r.last_active_ts as i64,
            r.last_sync_ts as i64
        ])?;
    }
    Ok(())
}

/// The rooms `user` is joined to (by current state; remote users included).
pub fn list_joined_rooms(conn: &Connection, user: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT room_id FROM current_state
         WHERE type = 'm.room.member' AND state_key = ?1 AND membership = 'join'",
    )?;
    let rows = stmt.query_map([user], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Whether `a` and `b` are both joined to some room (who may see whose presence).
pub fn share_a_room(conn: &Connection, a: &str, b: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM current_state x JOIN current_state y
                 ON y.room_id = x.room_id AND y.type = 'm.room.member'
                 AND y.state_key = ?2 AND y.membership = 'join'
             WHERE x.type = 'm.room.member' AND x.state_key = ?1 AND x.membership = 'join'
             LIMIT 1",
        )?
        .query_row([a, b], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Whether remote `user` is joined to a room that a user of server `us` is joined to (whose
/// presence updates we keep).
pub fn shares_room_with_server(conn: &Connection, user: &str, us: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM current_state x JOIN current_state y
                 ON y.room_id = x.room_id AND y.type = 'm.room.member' AND y.membership = 'join'
                 AND substr(y.state_key, instr(y.state_key, ':') + 1) = ?2
             WHERE x.type = 'm.room.member' AND x.state_key = ?1 AND x.membership = 'join'
             LIMIT 1",
        )?
        .query_row([user, us], |_| Ok(()))
        .optional()?
        .is_some())
}

/// The other servers sharing a room with `user` (the destinations of their presence), in the
/// rooms' server ACLs.
pub fn list_user_destinations(conn: &Connection, user: &str, us: &str) -> Result<Vec<String>> {
    let mut out = std::collections::BTreeSet::new();
    for room in list_joined_rooms(conn, user)? {
        out.extend(list_room_servers(conn, &room, us)?);
    }
    Ok(out.into_iter().collect())
}
