//! SQL for re-authorising, once a partial-state room is complete, the events received or sent
//! while it was partial (`partial_state_events`).

use rusqlite::params;

use super::Connection;
use crate::error::Result;

/// Records `event_id` (just stored, in this write) if its room is partial-state.
pub fn record_if_partial(conn: &Connection, room_id: &str, event_id: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO partial_state_events (room_id, pos, event_id)
         SELECT room_id, pos, event_id FROM events
         WHERE event_id = ?2 AND room_id = ?1
           AND EXISTS (SELECT 1 FROM partial_state_rooms WHERE room_id = ?1)",
    )?
    .execute([room_id, event_id])?;
    Ok(())
}

/// Rooms no longer partial with recorded events still to re-authorise.
pub fn list_reauth_rooms(conn: &Connection) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT room_id FROM partial_state_events
         WHERE room_id NOT IN (SELECT room_id FROM partial_state_rooms)",
    )?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The next `limit` recorded events of a room, in stream order: (pos, event_id).
pub fn list_partial_state_events(
    conn: &Connection,
    room_id: &str,
    limit: usize,
) -> Result<Vec<(i64, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT pos, event_id FROM partial_state_events WHERE room_id = ?1 ORDER BY pos LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![room_id, limit as i64], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Whether a room has recorded events left.
pub fn has_partial_state_events(conn: &Connection, room_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM partial_state_events WHERE room_id = ?1)")?
        .query_row([room_id], |r| r.get(0))?)
}

/// One recorded event re-authorised.
pub fn delete_partial_state_event(conn: &Connection, room_id: &str, pos: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM partial_state_events WHERE room_id = ?1 AND pos = ?2")?
        .execute(params![room_id, pos])?;
    Ok(())
}

/// Marks an event that was part of the room as rejected (it leaves the timeline).
pub fn set_event_rejected(conn: &Connection, event_id: &str, reason: &str) -> Result<()> {
    conn.prepare_cached("UPDATE events SET rejected_reason = ?2 WHERE event_id = ?1")?
        .execute([event_id, reason])?;
    Ok(())
}

/// A rejected event is not a prev event of anything we send (spec, "Rejection"): if
/// `event_id`, just found rejected, is a forward extremity of the room, it stops being one, and
/// the events before it take its place, each that is part of the room (accepted, with state)
/// and that no event of the room still accepted names as a prev event. Rejected events before
/// it are walked through to theirs. Returns whether the extremities changed.
pub fn drop_rejected_extremity(conn: &Connection, room_id: &str, event_id: &str) -> Result<bool> {
    let removed = conn
        .prepare_cached("DELETE FROM forward_extremities WHERE room_id = ?1 AND event_id = ?2")?
        .execute([room_id, event_id])?;
    if removed == 0 {
        return Ok(false);
    }
    conn.prepare_cached(
        "WITH RECURSIVE back(id) AS (
             SELECT prev_event_id FROM event_edges WHERE event_id = ?2
             UNION
             SELECT ed.prev_event_id FROM back
             JOIN events b ON b.event_id = back.id AND b.rejected_reason IS NOT NULL
             JOIN event_edges ed ON ed.event_id = back.id
         )
         INSERT OR IGNORE INTO forward_extremities (room_id, event_id)
         SELECT ?1, back.id FROM back JOIN events p ON p.event_id = back.id
         WHERE p.room_id = ?1 AND p.rejected_reason IS NULL AND p.outlier = 0
           AND p.state_group IS NOT NULL
           AND NOT EXISTS (
               SELECT 1 FROM event_edges c JOIN events ce ON ce.event_id = c.event_id
               WHERE c.prev_event_id = back.id AND ce.room_id = ?1
                 AND ce.rejected_reason IS NULL AND ce.outlier = 0 AND ce.soft_failed = 0)",
    )?
    .execute([room_id, event_id])?;
    Ok(true)
}

/// Deletes a rejected event's row and edges, so it can be stored again as accepted.
pub fn delete_rejected_event(conn: &Connection, event_id: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM events WHERE event_id = ?1 AND rejected_reason IS NOT NULL")?
        .execute([event_id])?;
    conn.prepare_cached("DELETE FROM event_edges WHERE event_id = ?1")?
        .execute([event_id])?;
    conn.prepare_cached("DELETE FROM event_auth WHERE event_id = ?1")?
        .execute([event_id])?;
    Ok(())
}

/// In every state group of the room from `first` on, the entry `(kind, state_key)` that names
/// `event_id` is made to name `replacement` instead (removed if none): a state event found
/// rejected no longer counts in any state after it. Each group is one primary-key probe.
pub fn replace_state_entry(
    conn: &Connection,
    room_id: &str,
    first: i64,
    (kind, state_key, event_id): (&str, &str, &str),
    replacement: Option<&str>,
) -> Result<()> {
    let groups: Vec<i64> = conn
        .prepare_cached("SELECT id FROM state_groups WHERE id >= ?1 AND room_id = ?2")?
        .query_map(params![first, room_id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut update = conn.prepare_cached(
        "UPDATE state_group_entries SET event_id = ?5
         WHERE group_id = ?1 AND type = ?2 AND state_key = ?3 AND event_id = ?4",
    )?;
    let mut delete = conn.prepare_cached(
        "DELETE FROM state_group_entries
         WHERE group_id = ?1 AND type = ?2 AND state_key = ?3 AND event_id = ?4",
    )?;
    for g in groups {
        match replacement {
            Some(r) => update.execute(params![g, kind, state_key, event_id, r])?,
            None => delete.execute(params![g, kind, state_key, event_id])?,
        };
    }
    Ok(())
}
