//! The SQL of push rules that run: the evaluator's position and its input (new events, the
//! room's local members, rule sets), the notification rows and counts, pushers and the push
//! queue the sender drains.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension};

use super::{
    queries::{self as q, event_row, EventRow, EVENT_COLS, IN_ROOM},
    Connection,
};
use crate::error::Result;

// ---------------------------------------------------------------- the evaluator

const POS_KEY: &str = "push_pos";

/// Every event at or below this position has been evaluated.
pub fn get_push_pos(conn: &Connection) -> Result<i64> {
    Ok(q::get_meta(conn, POS_KEY)?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

pub fn set_push_pos(conn: &Connection, pos: i64) -> Result<()> {
    q::upsert_meta(conn, POS_KEY, &pos.to_string())
}

/// The room events after `after` (oldest first, at most `limit`) that are part of their room
/// (no outliers, rejected or soft-failed events; backfilled history has negative positions),
/// with their room.
pub fn list_events_after(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> Result<Vec<(String, EventRow)>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLS}, room_id FROM events WHERE pos > ?1 AND {IN_ROOM} ORDER BY pos LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![after, limit as i64], |r| {
        Ok((r.get(11)?, event_row(r)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A joined member of a room as the evaluator needs it.
pub struct Member {
    pub user_id: String,
    /// Position of the join event that began their current stretch of being joined, or (for
    /// a member whose current-state row is at or before the caller's `upto`) any position at
    /// or before that row: all the caller needs to know is that it is at most `upto`.
    pub since: i64,
    pub display_name: Option<String>,
}

/// The joined members of a room whose ID ends with `:server` (the local ones), with the display
/// name of their member event; and the number of joined members (all servers).
///
/// `upto`: the caller only compares `since` with positions at or above `upto` (the evaluator
/// passes its first event's position in the room; `i64::MAX` when `since` is not needed at all).
pub fn list_joined_local(
    conn: &Connection,
    room_id: &str,
    server: &str,
    upto: i64,
) -> Result<(Vec<Member>, u64)> {
    // `since` is where the member's current stretch of being joined began: their first join
    // event after their last membership that was not a join. Not the current state row's
    // position, which a later join event (a display-name change) moves past events the
    // evaluator may not have reached yet. Rejected and outlier events never changed it.
    // That stretch starts at or before the current state row (`since <= cs.pos`), so for a
    // row at or before `upto` the row's position answers as well as the stretch's start, and
    // the costly correlated search (json_extract over the member's history) runs only for
    // the few members whose row moved after `upto`: in a 10,000-member room it took most of
    // the evaluator's time for every event. SQLite evaluates CASE branches lazily.
    let mut stmt = conn.prepare_cached(
        "SELECT cs.state_key,
                CASE WHEN cs.pos <= ?2 THEN cs.pos ELSE
                coalesce((SELECT min(j.pos) FROM events j
                          WHERE j.room_id = cs.room_id AND j.type = 'm.room.member'
                            AND j.state_key = cs.state_key AND j.pos <= cs.pos
                            AND j.rejected_reason IS NULL AND j.outlier = 0
                            AND json_extract(j.json, '$.content.membership') = 'join'
                            AND j.pos > coalesce((SELECT max(o.pos) FROM events o
                                WHERE o.room_id = cs.room_id AND o.type = 'm.room.member'
                                  AND o.state_key = cs.state_key AND o.pos <= cs.pos
                                  AND o.rejected_reason IS NULL AND o.outlier = 0
                                  AND json_extract(o.json, '$.content.membership') <> 'join'),
                                -9223372036854775808)),
                         cs.pos) END,
                json_extract(e.json, '$.content.displayname')
         FROM current_state cs JOIN events e ON e.event_id = cs.event_id
         WHERE cs.room_id = ?1 AND cs.type = 'm.room.member' AND cs.membership = 'join'",
    )?;
    let suffix = format!(":{server}");
    let mut local = Vec::new();
    let mut count = 0;
    let rows = stmt.query_map(params![room_id, upto], |r| {
        Ok(Member {
            user_id: r.get(0)?,
            since: r.get(1)?,
            display_name: r
                .get::<_, Option<rusqlite::types::Value>>(2)?
                .and_then(|v| match v {
                    rusqlite::types::Value::Text(s) => Some(s),
                    _ => None,
                }),
        })
    })?;
    for m in rows {
        let m = m?;
        count += 1;
        if m.user_id.ends_with(&suffix) {
            local.push(m);
        }
    }
    Ok((local, count))
}

/// The positions of the `m.push_rules` account data of a room's joined members who have any
/// (the rule cache's keys), in one query for the whole room instead of one per member.
pub fn list_push_rules_pos(conn: &Connection, room_id: &str) -> Result<HashMap<String, i64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT a.user_id, a.pos FROM current_state cs
         JOIN account_data a ON a.user_id = cs.state_key AND a.room_id = '' AND a.type = 'm.push_rules'
         WHERE cs.room_id = ?1 AND cs.type = 'm.room.member' AND cs.membership = 'join'",
    )?;
    let rows = stmt.query_map([room_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The position of a user's `m.push_rules` account data (a cache key), if they have any.
pub fn get_push_rules_pos(conn: &Connection, user_id: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached(
            "SELECT pos FROM account_data WHERE user_id = ?1 AND room_id = '' AND type = 'm.push_rules'",
        )?
        .query_row([user_id], |r| r.get(0))
        .optional()?)
}

/// One notifying event for one user.
pub struct NewAction<'a> {
    pub user_id: &'a str,
    pub pos: i64,
    pub room_id: &'a str,
    pub event_id: &'a str,
    pub thread_id: &'a str,
    pub highlight: bool,
    pub actions: &'a str,
    pub ts: i64,
}

pub fn insert_push_action(conn: &Connection, a: &NewAction<'_>) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO push_actions (user_id, pos, room_id, event_id, thread_id, highlight, actions, ts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        a.user_id,
        a.pos,
        a.room_id,
        a.event_id,
        a.thread_id,
        a.highlight,
        a.actions,
        a.ts
    ])?;
    Ok(())
}

pub fn upsert_counts_changed(
    conn: &Connection,
    user_id: &str,
    room_id: &str,
    pos: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO push_counts_changed (user_id, room_id, pos) VALUES (?1, ?2, ?3)
         ON CONFLICT (user_id, room_id) DO UPDATE SET pos = excluded.pos",
    )?
    .execute(params![user_id, room_id, pos])?;
    Ok(())
}

/// Whether the evaluator changed the user's counts in the room with `since < pos <= upto`.
pub fn counts_changed_between(
    conn: &Connection,
    user_id: &str,
    room_id: &str,
    since: i64,
    upto: i64,
) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM push_counts_changed WHERE user_id = ?1 AND room_id = ?2 AND pos > ?3 AND pos <= ?4",
        )?
        .query_row(params![user_id, room_id, since, upto], |_| Ok(()))
        .optional()?
        .is_some())
}

// ---------------------------------------------------------------- counts and notifications

/// The positions of the user's read receipts (`m.read`, `m.read.private`, the later of the
/// two) in a room, by thread (`""` for unthreaded receipts).
const RECEIPTS: &str = "SELECT rc.thread_id, MAX(e.pos) AS pos FROM receipts rc
    JOIN events e ON e.event_id = rc.event_id
    WHERE rc.room_id = ?2 AND rc.user_id = ?1 AND rc.receipt_type IN ('m.read', 'm.read.private')
    GROUP BY rc.thread_id";

/// Per thread (`main` for the main timeline): (thread, notifications, highlights) after the
/// user's read receipts: an unthreaded receipt covers every thread, a threaded one its thread.
/// Without an unthreaded receipt, counting starts after the user's member event (as Synapse
/// does: what came before the join, such as the invite, is not unread).
pub fn list_unread_counts(
    conn: &Connection,
    user_id: &str,
    room_id: &str,
) -> Result<Vec<(String, u64, u64)>> {
    let mut stmt = conn.prepare_cached(&format!(
        "WITH r AS ({RECEIPTS})
         SELECT a.thread_id, COUNT(*), SUM(a.highlight) FROM push_actions a
         WHERE a.user_id = ?1 AND a.room_id = ?2
           AND a.pos > COALESCE((SELECT pos FROM r WHERE thread_id = ''),
               (SELECT pos FROM current_state
                WHERE room_id = ?2 AND type = 'm.room.member' AND state_key = ?1), 0)
           AND a.pos > COALESCE((SELECT pos FROM r WHERE thread_id = a.thread_id), 0)
         GROUP BY a.thread_id"
    ))?;
    let rows = stmt.query_map([user_id, room_id], |r| {
        Ok((
            r.get(0)?,
            r.get::<_, i64>(1)? as u64,
            r.get::<_, i64>(2)? as u64,
        ))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The rooms where the user has notifications (any room, joined or not: the caller filters).
pub fn list_rooms_with_notifications(conn: &Connection, user_id: &str) -> Result<Vec<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT DISTINCT room_id FROM push_actions WHERE user_id = ?1")?;
    let rows = stmt.query_map([user_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// One row of `GET /notifications`.
pub struct NotificationRow {
    pub pos: i64,
    pub room_id: String,
    pub thread_id: String,
    pub actions: String,
    pub ts: i64,
    pub event: EventRow,
}

/// The user's notifications before `before`, newest first, at most `limit`.
pub fn list_notifications(
    conn: &Connection,
    user_id: &str,
    before: i64,
    limit: usize,
    only_highlight: bool,
) -> Result<Vec<NotificationRow>> {
    let cols = EVENT_COLS
        .split(", ")
        .map(|c| format!("e.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {cols}, a.room_id, a.thread_id, a.actions, a.ts FROM push_actions a
         JOIN events e ON e.pos = a.pos
         WHERE a.user_id = ?1 AND a.pos < ?2 AND (?3 = 0 OR a.highlight = 1)
         ORDER BY a.pos DESC LIMIT ?4"
    ))?;
    let rows = stmt.query_map(
        params![user_id, before, only_highlight, limit as i64],
        |r| {
            let event = event_row(r)?;
            Ok(NotificationRow {
                pos: event.pos,
                room_id: r.get(11)?,
                thread_id: r.get(12)?,
                actions: r.get(13)?,
                ts: r.get(14)?,
                event,
            })
        },
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The user's read-receipt positions in a room by thread (`""` unthreaded), for `read`.
pub fn list_receipt_positions(
    conn: &Connection,
    user_id: &str,
    room_id: &str,
) -> Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare_cached(RECEIPTS)?;
    let rows = stmt.query_map([user_id, room_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---------------------------------------------------------------- pushers

/// A stored pusher as the sender needs it.
pub struct PusherRow {
    pub id: i64,
    pub user_id: String,
    pub url: String,
    /// The pusher as the client API shows it (JSON).
    pub pusher: String,
    pub backoff_ms: i64,
    /// When the pushkey was set (ms).
    pub created_ts: i64,
}

/// Adds or replaces the user's pusher for (app ID, pushkey); unless `append`, other users'
/// pushers with the same app ID and pushkey go (the spec: a pushkey belongs to one account
/// unless the client asks otherwise).
#[allow(clippy::too_many_arguments)] // one argument per column of the row
pub fn upsert_pusher(
    conn: &Connection,
    user_id: &str,
    app_id: &str,
    pushkey: &str,
    url: &str,
    pusher: &str,
    append: bool,
    now: i64,
) -> Result<()> {
    if !append {
        conn.prepare_cached(
            "DELETE FROM pushers WHERE app_id = ?1 AND pushkey = ?2 AND user_id != ?3",
        )?
        .execute([app_id, pushkey, user_id])?;
    }
    conn.prepare_cached(
        "INSERT INTO pushers (user_id, app_id, pushkey, url, pusher, created_ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (app_id, pushkey, user_id) DO UPDATE SET url = excluded.url, pusher = excluded.pusher,
             created_ts = excluded.created_ts, retry_at = 0, backoff_ms = 0",
    )?
    .execute(params![user_id, app_id, pushkey, url, pusher, now])?;
    Ok(())
}

/// Removes a user's pusher (and its queue); whether there was one.
pub fn delete_pusher(
    conn: &Connection,
    user_id: &str,
    app_id: &str,
    pushkey: &str,
) -> Result<bool> {
    Ok(conn
        .prepare_cached("DELETE FROM pushers WHERE user_id = ?1 AND app_id = ?2 AND pushkey = ?3")?
        .execute([user_id, app_id, pushkey])?
        > 0)
}

/// The user's pushers as the client API shows them (JSON each), oldest first.
pub fn list_pushers(conn: &Connection, user_id: &str) -> Result<Vec<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT pusher FROM pushers WHERE user_id = ?1 ORDER BY id")?;
    let rows = stmt.query_map([user_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The IDs of the user's pushers.
pub fn list_pusher_ids(conn: &Connection, user_id: &str) -> Result<Vec<i64>> {
    let mut stmt = conn.prepare_cached("SELECT id FROM pushers WHERE user_id = ?1")?;
    let rows = stmt.query_map([user_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn insert_push_queue(conn: &Connection, pusher_id: i64, user_id: &str, pos: i64) -> Result<()> {
    conn.prepare_cached("INSERT INTO push_queue (pusher_id, user_id, pos) VALUES (?1, ?2, ?3)")?
        .execute(params![pusher_id, user_id, pos])?;
    Ok(())
}

// ---------------------------------------------------------------- the sender

/// Pushers with queued notifications whose retry time has come.
pub fn list_due_pushers(conn: &Connection, now: i64) -> Result<Vec<PusherRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, user_id, url, pusher, backoff_ms, created_ts FROM pushers p
         WHERE retry_at <= ?1 AND EXISTS (SELECT 1 FROM push_queue q WHERE q.pusher_id = p.id)
         ORDER BY id",
    )?;
    let rows = stmt.query_map([now], |r| {
        Ok(PusherRow {
            id: r.get(0)?,
            user_id: r.get(1)?,
            url: r.get(2)?,
            pusher: r.get(3)?,
            backoff_ms: r.get(4)?,
            created_ts: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The earliest retry time of a pusher with queued notifications.
pub fn next_push_retry(conn: &Connection) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached(
            "SELECT MIN(retry_at) FROM pushers p WHERE EXISTS (SELECT 1 FROM push_queue q WHERE q.pusher_id = p.id)",
        )?
        .query_row([], |r| r.get(0))?)
}

/// A queued notification: (queue row ID, the action row, the event).
pub type QueuedPush = (i64, NotificationRow);

/// The oldest queued notification of a pusher, with its action row and event; a row whose
/// event or action is gone (it cannot be sent) is skipped and deleted by the next write.
pub fn get_queue_head(
    conn: &Connection,
    pusher_id: i64,
) -> Result<Option<(i64, Option<NotificationRow>)>> {
    let Some((id, user, pos)) = conn
        .prepare_cached(
            "SELECT id, user_id, pos FROM push_queue WHERE pusher_id = ?1 ORDER BY id LIMIT 1",
        )?
        .query_row([pusher_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .optional()?
    else {
        return Ok(None);
    };
    let row = list_notifications(conn, &user, pos + 1, 1, false)?
        .into_iter()
        .find(|n| n.pos == pos);
    Ok(Some((id, row)))
}

/// After the gateway's answer: the queue row goes and the backoff is reset.
pub fn delete_queued_push(conn: &Connection, queue_id: i64, pusher_id: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM push_queue WHERE id = ?1")?
        .execute([queue_id])?;
    conn.prepare_cached("UPDATE pushers SET retry_at = 0, backoff_ms = 0 WHERE id = ?1")?
        .execute([pusher_id])?;
    Ok(())
}

pub fn set_pusher_backoff(
    conn: &Connection,
    pusher_id: i64,
    retry_at: i64,
    backoff_ms: i64,
) -> Result<()> {
    conn.prepare_cached("UPDATE pushers SET retry_at = ?2, backoff_ms = ?3 WHERE id = ?1")?
        .execute(params![pusher_id, retry_at, backoff_ms])?;
    Ok(())
}

/// A pusher the gateway rejected goes, with its queue.
pub fn delete_pusher_by_id(conn: &Connection, pusher_id: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM pushers WHERE id = ?1")?
        .execute([pusher_id])?;
    Ok(())
}
