//! SQL for room history: the topological order `/messages`, `/context` and backfill walk
//! (`depth`, then `pos`: index `events_room_topo`), backward extremities (where the history
//! we hold stops), and the rows backfill writes.
//!
//! Backfilled events take *negative* stream positions (as Synapse's stream orderings do):
//! `/sync` walks positions after a token, which is never negative, so history fetched later
//! never shows up there as new, while `/messages` still finds it by topology.

use rusqlite::{params, OptionalExtension};

use super::{
    queries::{event_row, EventRow, EVENT_COLS, IN_ROOM},
    Connection,
};
use crate::error::Result;

/// A place in a room's topological order: `(depth, pos)`.
pub type TopoKey = (i64, i64);

/// Bounds on one scan of a room's events: `topo_lo < (depth, pos) <= topo_hi` and
/// `pos_lo < pos <= pos_hi` (stream bounds come from stream tokens: `/sync`'s `prev_batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub topo_lo: TopoKey,
    pub topo_hi: TopoKey,
    pub pos_lo: i64,
    pub pos_hi: i64,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            topo_lo: (i64::MIN, i64::MIN),
            topo_hi: (i64::MAX, i64::MAX),
            pos_lo: i64::MIN,
            pos_hi: i64::MAX,
        }
    }
}

/// Events of a room (part of the room as clients see it) within `b`, newest first by
/// topology when `backward`, else oldest first, at most `limit`; each with its depth.
pub fn list_room_events_topo(
    conn: &Connection,
    room_id: &str,
    b: &Bounds,
    limit: usize,
    backward: bool,
) -> Result<Vec<(i64, EventRow)>> {
    let order = if backward { "DESC" } else { "ASC" };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLS}, depth FROM events
         WHERE room_id = ?1 AND (depth, pos) > (?2, ?3) AND (depth, pos) <= (?4, ?5)
           AND pos > ?6 AND pos <= ?7 AND {IN_ROOM}
         ORDER BY depth {order}, pos {order} LIMIT ?8"
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
            limit as i64
        ],
        |r| Ok((r.get(EVENT_COLS.split(',').count())?, event_row(r)?)),
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The topological key of a room's event, if held and part of the room.
pub fn get_topo_key(conn: &Connection, room_id: &str, event_id: &str) -> Result<Option<TopoKey>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT depth, pos FROM events WHERE event_id = ?1 AND room_id = ?2 AND {IN_ROOM}"
        ))?
        .query_row([event_id, room_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// The topological key of the room's last event at or before stream position `pos` (the
/// event at `pos` itself when there is one).
pub fn get_topo_key_at_or_before(
    conn: &Connection,
    room_id: &str,
    pos: i64,
) -> Result<Option<TopoKey>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT depth, pos FROM events WHERE room_id = ?1 AND pos <= ?2 AND {IN_ROOM}
             ORDER BY pos DESC LIMIT 1"
        ))?
        .query_row(params![room_id, pos], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// The topological key of the room's first event after stream position `pos`.
pub fn get_topo_key_after(conn: &Connection, room_id: &str, pos: i64) -> Result<Option<TopoKey>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT depth, pos FROM events WHERE room_id = ?1 AND pos > ?2 AND {IN_ROOM}
             ORDER BY pos ASC LIMIT 1"
        ))?
        .query_row(params![room_id, pos], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// How many of the room's lowest events (by topology) are searched for backward
/// extremities: a backwards `/messages` asks only once it has scanned down to the bottom of
/// what we hold, so the events below its start are fewer than this (its scan limit).
const EXTREMITY_SCAN: i64 = 2500;

/// Backward extremities at the bottom of the room's history: prev events of
/// events that are part of the room, which we do not hold as part of the room (unknown, or
/// known only as outliers, like the state a join through another server brought). Ordered
/// by the depth of the event that references them, newest first.
pub fn list_backward_extremities(
    conn: &Connection,
    room_id: &str,
    limit: usize,
) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(&format!(
        "WITH low AS (
             SELECT event_id, depth, pos FROM events
             WHERE room_id = ?1 AND {IN_ROOM}
             ORDER BY depth ASC, pos ASC LIMIT ?2
         )
         SELECT ed.prev_event_id FROM low JOIN event_edges ed ON ed.event_id = low.event_id
         WHERE NOT EXISTS (SELECT 1 FROM events p WHERE p.event_id = ed.prev_event_id AND p.outlier = 0)
         GROUP BY ed.prev_event_id
         ORDER BY max(low.depth) DESC, ed.prev_event_id LIMIT ?3"
    ))?;
    let rows = stmt.query_map(params![room_id, EXTREMITY_SCAN, limit as i64], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Whether an event is held only as an outlier.
pub fn is_outlier(conn: &Connection, event_id: &str) -> Result<Option<bool>> {
    Ok(conn
        .prepare_cached("SELECT outlier FROM events WHERE event_id = ?1")?
        .query_row([event_id], |r| r.get(0))
        .optional()?)
}

/// The stream position below every event held (and below 0): where backfilled events go.
pub fn get_backfill_floor(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT min(0, coalesce(min(pos), 0)) FROM events")?
        .query_row([], |r| r.get(0))?)
}

/// Makes an outlier part of the room's history: its state (if known), and a backfill
/// position (negative: see the module doc) so `/sync` never sends it as new.
pub fn promote_outlier(
    conn: &Connection,
    event_id: &str,
    pos: i64,
    state_group: Option<i64>,
    replaces_state: Option<&str>,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE events SET pos = ?2, outlier = 0, state_group = ?3, replaces_state = ?4
         WHERE event_id = ?1 AND outlier = 1",
    )?
    .execute(params![event_id, pos, state_group, replaces_state])?;
    Ok(())
}

/// The `history_visibility` and the memberships of `server`'s users in a state group (for
/// serving history to another server).
pub fn get_server_view_in_group(
    conn: &Connection,
    group: i64,
    server: &str,
) -> Result<(Option<String>, Vec<String>)> {
    let state = super::queries::load_state_group(conn, group)?;
    let suffix = format!(":{server}");
    let mut hv = None;
    let mut memberships = Vec::new();
    for ((kind, key), id) in &state {
        let wanted = match kind.as_str() {
            "m.room.history_visibility" if key.is_empty() => "$.content.history_visibility",
            "m.room.member" if key.ends_with(&suffix) => "$.content.membership",
            _ => continue,
        };
        let v: Option<String> = conn
            .prepare_cached("SELECT json_extract(json, ?2) FROM events WHERE event_id = ?1")?
            .query_row(params![id, wanted], |r| r.get(0))
            .optional()?
            .flatten();
        match (kind.as_str(), v) {
            ("m.room.history_visibility", v) => hv = v,
            (_, Some(m)) => memberships.push(m),
            _ => {}
        }
    }
    Ok((hv, memberships))
}
