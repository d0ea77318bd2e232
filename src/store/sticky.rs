//! Sticky events (MSC4354): the index of live sticky events. A row exists from the commit of a
//! sticky event that is part of the room (not rejected, soft-failed or an outlier) until it is
//! redacted or the expiry worker removes it after `expires_ts`; readers also compare
//! `expires_ts` with the clock, so an expired row the worker has not reached yet is never
//! served.

use rusqlite::{params, OptionalExtension};

use super::Connection;
use crate::error::Result;

/// A live sticky event: its stream position and expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StickyRow {
    pub event_id: String,
    pub room_id: String,
    pub pos: i64,
    pub expires_ts: i64,
}

pub fn insert_sticky(conn: &Connection, row: &StickyRow) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO sticky_events (event_id, room_id, pos, expires_ts)
         VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![row.event_id, row.room_id, row.pos, row.expires_ts])?;
    Ok(())
}

/// Redaction removes stickiness.
pub fn delete_sticky(conn: &Connection, event_id: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM sticky_events WHERE event_id = ?1")?
        .execute([event_id])?;
    Ok(())
}

/// The rooms with a sticky event live at `now`.
pub fn rooms_with_live_sticky(conn: &Connection, now: i64) -> Result<Vec<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT DISTINCT room_id FROM sticky_events WHERE expires_ts > ?1")?;
    let rows = stmt.query_map([now], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A room's sticky events live at `now` with a stream position up to `upto`, in stream order.
pub fn list_live_sticky(
    conn: &Connection,
    room_id: &str,
    now: i64,
    upto: i64,
) -> Result<Vec<StickyRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT event_id, room_id, pos, expires_ts FROM sticky_events
         WHERE room_id = ?1 AND expires_ts > ?2 AND pos <= ?3 ORDER BY pos",
    )?;
    let rows = stmt.query_map(params![room_id, now, upto], |r| {
        Ok(StickyRow {
            event_id: r.get(0)?,
            room_id: r.get(1)?,
            pos: r.get(2)?,
            expires_ts: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The earliest expiry in the index (what the expiry worker sleeps until).
pub fn next_sticky_expiry(conn: &Connection) -> Result<Option<i64>> {
    Ok(conn
        .query_row("SELECT min(expires_ts) FROM sticky_events", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .optional()?
        .flatten())
}

/// Removes the rows expired at `now`; returns how many.
pub fn delete_expired_sticky(conn: &Connection, now: i64) -> Result<usize> {
    Ok(conn
        .prepare_cached("DELETE FROM sticky_events WHERE expires_ts <= ?1")?
        .execute([now])?)
}

/// Where the user's current run of being joined to the room began: the stream position of the
/// first `join` after their last membership that was not a join (a display-name change is a
/// join after a join, so it does not restart the run). `None` when not joined.
pub fn join_run_start(conn: &Connection, room_id: &str, user_id: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached(
            "SELECT min(pos) FROM events
             WHERE room_id = ?1 AND type = 'm.room.member' AND state_key = ?2
               AND outlier = 0 AND soft_failed = 0 AND rejected_reason IS NULL
               AND json_extract(json, '$.content.membership') = 'join'
               AND pos > coalesce((
                   SELECT max(pos) FROM events
                   WHERE room_id = ?1 AND type = 'm.room.member' AND state_key = ?2
                     AND outlier = 0 AND soft_failed = 0 AND rejected_reason IS NULL
                     AND json_extract(json, '$.content.membership') != 'join'), 0)",
        )?
        .query_row([room_id, user_id], |r| r.get::<_, Option<i64>>(0))?)
}

/// A sticky event's expiry, while it is in the index.
pub fn get_sticky_expiry(conn: &Connection, event_id: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT expires_ts FROM sticky_events WHERE event_id = ?1")?
        .query_row([event_id], |r| r.get(0))
        .optional()?)
}
