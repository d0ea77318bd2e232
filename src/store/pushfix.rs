//! The SQL of the push and presence details of issue 13: a redaction taking its event's
//! notifications along, pushers tied to the device that set them, pruning old notifications,
//! and the joins that bring presence to new members.

use rusqlite::params;

use super::{queries::IN_ROOM, Connection};
use crate::error::Result;

// ---------------------------------------------------------------- redactions

/// Removes every user's notification for `event_id` (its redaction was persisted), as
/// Synapse's `_remove_push_actions_for_event_id_txn` does.
pub fn delete_push_actions_for_event(
    conn: &Connection,
    room_id: &str,
    event_id: &str,
) -> Result<()> {
    conn.prepare_cached("DELETE FROM push_actions WHERE room_id = ?1 AND event_id = ?2")?
        .execute([room_id, event_id])?;
    Ok(())
}

// ---------------------------------------------------------------- pushers and devices

/// Records the device whose access token set (or last replaced) the pusher.
pub fn set_pusher_device(
    conn: &Connection,
    user_id: &str,
    app_id: &str,
    pushkey: &str,
    device_id: &str,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE pushers SET device_id = ?4 WHERE user_id = ?1 AND app_id = ?2 AND pushkey = ?3",
    )?
    .execute([user_id, app_id, pushkey, device_id])?;
    Ok(())
}

/// Removes the user's pushers set from these devices (with their queues).
pub fn delete_pushers_of_devices(
    conn: &Connection,
    user_id: &str,
    devices: &[String],
) -> Result<()> {
    let mut stmt =
        conn.prepare_cached("DELETE FROM pushers WHERE user_id = ?1 AND device_id = ?2")?;
    for d in devices {
        stmt.execute([user_id, d])?;
    }
    Ok(())
}

// ---------------------------------------------------------------- pruning

/// A notification the pruning job looks at, keyed by (ts, user, pos) for its cursor.
pub struct OldAction {
    pub ts: i64,
    pub user_id: String,
    pub pos: i64,
    pub room_id: String,
    pub thread_id: String,
    pub highlight: bool,
}

/// The next `limit` notifications older than `before_ts`, after the cursor `after` (ts, user,
/// pos), oldest first (an index walk: `push_actions_ts`).
pub fn list_old_push_actions(
    conn: &Connection,
    after: (i64, &str, i64),
    before_ts: i64,
    limit: usize,
) -> Result<Vec<OldAction>> {
    let mut stmt = conn.prepare_cached(
        "SELECT ts, user_id, pos, room_id, thread_id, highlight FROM push_actions
         WHERE ts < ?4 AND (ts, user_id, pos) > (?1, ?2, ?3)
         ORDER BY ts, user_id, pos LIMIT ?5",
    )?;
    let rows = stmt.query_map(
        params![after.0, after.1, after.2, before_ts, limit as i64],
        |r| {
            Ok(OldAction {
                ts: r.get(0)?,
                user_id: r.get(1)?,
                pos: r.get(2)?,
                room_id: r.get(3)?,
                thread_id: r.get(4)?,
                highlight: r.get(5)?,
            })
        },
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Deletes the given notifications (user, pos).
pub fn delete_push_actions(conn: &Connection, keys: &[(String, i64)]) -> Result<()> {
    let mut stmt =
        conn.prepare_cached("DELETE FROM push_actions WHERE user_id = ?1 AND pos = ?2")?;
    for (user, pos) in keys {
        stmt.execute(params![user, pos])?;
    }
    Ok(())
}

// ---------------------------------------------------------------- joins and presence

/// A membership that became `join` (from anything else) at `pos`.
pub struct Join {
    pub pos: i64,
    /// When it reached us (ms).
    pub received_ts: i64,
    pub room_id: String,
    pub user_id: String,
}

/// The joins with `after < pos <= upto` (at most `limit`, oldest first): member events whose
/// membership is `join` and whose predecessor's was not (profile changes are not joins).
pub fn list_joins_between(
    conn: &Connection,
    after: i64,
    upto: i64,
    limit: usize,
) -> Result<Vec<Join>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT e.pos, e.room_id, e.state_key, e.received_ts FROM events e
         LEFT JOIN events p ON p.event_id = e.replaces_state
         WHERE e.pos > ?1 AND e.pos <= ?2 AND e.type = 'm.room.member'
           AND e.{} AND json_extract(e.json, '$.content.membership') = 'join'
           AND (p.event_id IS NULL OR json_extract(p.json, '$.content.membership') IS NOT 'join')
         ORDER BY e.pos LIMIT ?3",
        IN_ROOM.replace(" AND ", " AND e.")
    ))?;
    let rows = stmt.query_map(params![after, upto, limit as i64], |r| {
        Ok(Join {
            pos: r.get(0)?,
            room_id: r.get(1)?,
            user_id: r.get(2)?,
            received_ts: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
