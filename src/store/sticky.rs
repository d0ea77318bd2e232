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

// The federation half: pushing our own sticky events to a server that joins, and giving
// soft-failed sticky events a second chance when the room's state changes.

/// The room's sticky events live at `now` sent by users of `ours`, that are not already
/// queued for `dest`, in stream order: what a server joining the room must be pushed.
pub fn list_own_live_sticky_unqueued(
    conn: &Connection,
    room_id: &str,
    ours: &str,
    now: i64,
    dest: &str,
) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT s.event_id FROM sticky_events s JOIN events e ON e.event_id = s.event_id
         WHERE s.room_id = ?1 AND s.expires_ts > ?3
           AND substr(e.sender, instr(e.sender, ':') + 1) = ?2
           AND NOT EXISTS (SELECT 1 FROM outbox o
                           WHERE o.destination = ?4 AND o.kind = 'pdu' AND o.event_id = s.event_id)
         ORDER BY s.pos",
    )?;
    let rows = stmt.query_map(params![room_id, ours, now, dest], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A soft-failed message event that may be sticky: its ID, JSON and both timestamps.
pub struct SoftFailed {
    pub event_id: String,
    pub json: String,
    pub origin_server_ts: i64,
    pub received_ts: i64,
}

/// The room's soft-failed message events received after `since_ts` whose JSON names the
/// sticky key (the caller parses it): by the partial index `events_soft_failed`, so a state
/// change in a room without recent soft-failed events costs one index probe.
pub fn list_recent_soft_failed_sticky(
    conn: &Connection,
    room_id: &str,
    since_ts: i64,
) -> Result<Vec<SoftFailed>> {
    let mut stmt = conn.prepare_cached(
        "SELECT event_id, json, origin_server_ts, received_ts FROM events
         WHERE room_id = ?1 AND soft_failed = 1 AND received_ts > ?2
           AND state_key IS NULL AND outlier = 0 AND rejected_reason IS NULL
           AND instr(json, 'msc4354_sticky') > 0
         ORDER BY pos",
    )?;
    let rows = stmt.query_map(params![room_id, since_ts], |r| {
        Ok(SoftFailed {
            event_id: r.get(0)?,
            json: r.get(1)?,
            origin_server_ts: r.get(2)?,
            received_ts: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A soft-failed event passes the current state now: it joins the room at a new stream
/// position (so `/sync` sends it as new).
pub fn un_soft_fail(conn: &Connection, event_id: &str, pos: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE events SET soft_failed = 0, pos = ?2 WHERE event_id = ?1 AND soft_failed = 1",
    )?
    .execute(params![event_id, pos])?;
    Ok(())
}

/// A sticky event committed as history that fails the room's current state: soft-failed, so
/// a later state change re-evaluates it (see `un_soft_fail`).
pub fn set_soft_failed(conn: &Connection, event_id: &str) -> Result<()> {
    conn.prepare_cached("UPDATE events SET soft_failed = 1 WHERE event_id = ?1")?
        .execute([event_id])?;
    Ok(())
}

/// An event's rejection reason and arrival time, if it is held.
pub fn event_status(conn: &Connection, event_id: &str) -> Result<Option<(Option<String>, i64)>> {
    Ok(conn
        .prepare_cached("SELECT rejected_reason, received_ts FROM events WHERE event_id = ?1")?
        .query_row([event_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// Up to `limit` of a room's sticky events live at `now` within `b`, with their depth, in the
/// topological order (newest first when `backward`): what `/messages` adds below the history a
/// joined user may see (history visibility does not apply to sticky events).
pub fn list_live_sticky_topo(
    conn: &Connection,
    room_id: &str,
    b: &super::history::Bounds,
    limit: usize,
    now: i64,
    backward: bool,
) -> Result<Vec<(i64, super::queries::EventRow)>> {
    use super::queries::{event_row, EVENT_COLS, IN_ROOM};
    let order = if backward {
        "depth DESC, pos DESC"
    } else {
        "depth, pos"
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLS}, depth FROM events
         WHERE event_id IN (SELECT event_id FROM sticky_events
                            WHERE room_id = ?1 AND expires_ts > ?9)
           AND (depth, pos) > (?2, ?3) AND (depth, pos) <= (?4, ?5)
           AND pos > ?6 AND pos <= ?7 AND {IN_ROOM}
         ORDER BY {order} LIMIT ?8"
    ))?;
    let rows = stmt.query_map(
        params![
            room_id,
            b.topo_lo.0,
            b.topo_lo.1,
            b.topo_hi.0,
            b.topo_hi.1,
            b.pos_lo,
            b.pos_hi,
            limit as i64,
            now
        ],
        |r| Ok((r.get(EVENT_COLS.split(',').count())?, event_row(r)?)),
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Whether an event is part of its room as clients see it (not an outlier, rejected or
/// soft-failed): `/event` and `/context` serve nothing else, so a soft-failed sticky event
/// stays out of sight until it is re-evaluated.
pub fn is_in_room(conn: &Connection, event_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT 1 FROM events WHERE event_id = ?1 AND {}",
            super::queries::IN_ROOM
        ))?
        .query_row([event_id], |_| Ok(()))
        .optional()?
        .is_some())
}
