//! SQL for partial-state joins (MSC3706): the reduced `/send_join` answer the resident server
//! serves, read by index instead of loading a whole room state.

use rusqlite::{params, OptionalExtension};

use super::Connection;
use crate::error::Result;

/// The entries of state group `group` that a partial-state `/send_join` answer carries:
/// every entry whose type is not `m.room.member`, and the member entries of `members`.
///
/// The group's delta chain is walked in SQL (the nearest group holding a key wins, as
/// `queries::load_state_group` applies deltas), and each group is read by ranges of its
/// primary key `(group_id, type, state_key)`: the member rows of a 10,000-member room are
/// never visited, only the few asked for. (type, state_key, event_id) rows.
pub fn list_state_group_without_members(
    conn: &Connection,
    group: i64,
    members: &[&str],
) -> Result<Vec<(String, String, String)>> {
    let members = serde_json::to_string(members)?;
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE chain(id, d) AS (
             SELECT ?1, 0
             UNION ALL
             SELECT g.prev_group, c.d + 1 FROM chain c JOIN state_groups g ON g.id = c.id
             WHERE g.prev_group IS NOT NULL
         ),
         picked(d, type, state_key, event_id) AS (
             SELECT c.d, e.type, e.state_key, e.event_id FROM chain c
             JOIN state_group_entries e ON e.group_id = c.id AND e.type < 'm.room.member'
             UNION ALL
             SELECT c.d, e.type, e.state_key, e.event_id FROM chain c
             JOIN state_group_entries e ON e.group_id = c.id AND e.type > 'm.room.member'
             UNION ALL
             SELECT c.d, e.type, e.state_key, e.event_id FROM chain c JOIN json_each(?2) m
             JOIN state_group_entries e
               ON e.group_id = c.id AND e.type = 'm.room.member' AND e.state_key = m.value
         )
         SELECT type, state_key, event_id FROM (
             SELECT type, state_key, event_id,
                    row_number() OVER (PARTITION BY type, state_key ORDER BY d) AS rn
             FROM picked
         ) WHERE rn = 1",
    )?;
    let rows = stmt.query_map(params![group, members], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Up to `limit` users other than `except` joined to or invited into the room (current
/// state), in user-ID order: the room's heroes as `/sync`'s summary names them. Walks the
/// `current_state` primary key in order and stops after `limit` matches.
pub fn list_heroes(
    conn: &Connection,
    room_id: &str,
    except: &str,
    limit: usize,
) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT state_key FROM current_state
         WHERE room_id = ?1 AND type = 'm.room.member' AND membership IN ('join', 'invite')
           AND state_key != ?2
         ORDER BY state_key LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![room_id, except, limit as i64], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ------------------------------------------------------------ joiner side

/// A room joined with partial state: its join event and the server joined through.
#[derive(Debug, Clone)]
pub struct PartialRoom {
    pub room_id: String,
    pub join_event_id: String,
    pub joined_via: String,
}

/// Records a partial-state join (in the join's own write): the room and the servers its
/// join answer named.
pub fn insert_partial_state_room(
    conn: &Connection,
    room: &PartialRoom,
    ts: i64,
    servers: &[String],
) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO partial_state_rooms (room_id, join_event_id, joined_via, joined_ts)
         VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        room.room_id,
        room.join_event_id,
        room.joined_via,
        ts
    ])?;
    let mut stmt = conn.prepare_cached(
        "INSERT OR IGNORE INTO partial_state_room_servers (room_id, server) VALUES (?1, ?2)",
    )?;
    for s in servers {
        stmt.execute(params![room.room_id, s])?;
    }
    Ok(())
}

/// Whether the room is joined with partial state (its resync not finished).
pub fn is_partial_state_room(conn: &Connection, room_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM partial_state_rooms WHERE room_id = ?1)")?
        .query_row([room_id], |r| r.get(0))?)
}

/// Every room still to resync, oldest join first.
pub fn list_partial_state_rooms(conn: &Connection) -> Result<Vec<PartialRoom>> {
    let mut stmt = conn.prepare_cached(
        "SELECT room_id, join_event_id, joined_via FROM partial_state_rooms ORDER BY joined_ts",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(PartialRoom {
            room_id: r.get(0)?,
            join_event_id: r.get(1)?,
            joined_via: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The servers the join answer named for a partial-state room.
pub fn list_partial_state_servers(conn: &Connection, room_id: &str) -> Result<Vec<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT server FROM partial_state_room_servers WHERE room_id = ?1")?;
    let rows = stmt.query_map([room_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The room is fully stated: forget its partial-state rows.
pub fn delete_partial_state_room(conn: &Connection, room_id: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM partial_state_rooms WHERE room_id = ?1")?
        .execute([room_id])?;
    conn.prepare_cached("DELETE FROM partial_state_room_servers WHERE room_id = ?1")?
        .execute([room_id])?;
    Ok(())
}

/// The room's state groups stored whole (no `prev_group`) from `first` on: the roots every
/// state group made since a partial-state join descends from.
pub fn list_root_groups_since(conn: &Connection, room_id: &str, first: i64) -> Result<Vec<i64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id FROM state_groups WHERE room_id = ?1 AND id >= ?2 AND prev_group IS NULL",
    )?;
    let rows = stmt.query_map(params![room_id, first], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The root of a state group's delta chain.
pub fn get_root_group(conn: &Connection, group: i64) -> Result<i64> {
    Ok(conn
        .prepare_cached(
            "WITH RECURSIVE chain(id) AS (
                 SELECT ?1
                 UNION ALL
                 SELECT g.prev_group FROM chain c JOIN state_groups g ON g.id = c.id
                 WHERE g.prev_group IS NOT NULL
             )
             SELECT min(id) FROM chain",
        )?
        .query_row([group], |r| r.get(0))?)
}

/// Adds the entries a group lacks (keys it has keep their event): completing a state stored
/// from partial state with the full state fetched later. (type, state_key, event_id) rows.
pub fn insert_group_entries_if_absent(
    conn: &Connection,
    group: i64,
    entries: &[(String, String, String)],
) -> Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR IGNORE INTO state_group_entries (group_id, type, state_key, event_id)
         VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (t, k, e) in entries {
        stmt.execute(params![group, t, k, e])?;
    }
    Ok(())
}

/// Adds a current-state entry unless the key has one; true if it was added.
pub fn insert_current_state_if_absent(
    conn: &Connection,
    room_id: &str,
    (kind, state_key, event_id): (&str, &str, &str),
    pos: i64,
) -> Result<bool> {
    let n = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO current_state (room_id, type, state_key, event_id, membership, pos)
             SELECT ?1, ?2, ?3, ?4,
                    CASE WHEN ?2 = 'm.room.member' THEN json_extract(json, '$.content.membership') END, ?5
             FROM events WHERE event_id = ?4",
        )?
        .execute(params![room_id, kind, state_key, event_id, pos])?;
    Ok(n > 0)
}

/// (event_id, type, state_key) of the held events among `ids` (state events only).
pub fn list_state_keys_of(
    conn: &Connection,
    ids: &[String],
) -> Result<Vec<(String, String, String)>> {
    let ids = serde_json::to_string(ids)?;
    let mut stmt = conn.prepare_cached(
        "SELECT e.event_id, e.type, e.state_key FROM json_each(?1) i
         JOIN events e ON e.event_id = i.value
         WHERE e.state_key IS NOT NULL AND e.rejected_reason IS NULL",
    )?;
    let rows = stmt.query_map([ids], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Which of `ids` are held (in any form).
pub fn list_held(conn: &Connection, ids: &[String]) -> Result<Vec<String>> {
    let ids = serde_json::to_string(ids)?;
    let mut stmt = conn.prepare_cached(
        "SELECT e.event_id FROM json_each(?1) i JOIN events e ON e.event_id = i.value",
    )?;
    let rows = stmt.query_map([ids], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Records the position at which a room became fully stated.
pub fn upsert_partial_state_completed(conn: &Connection, room_id: &str, pos: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO partial_state_completed (room_id, pos) VALUES (?1, ?2)
         ON CONFLICT (room_id) DO UPDATE SET pos = excluded.pos",
    )?
    .execute(params![room_id, pos])?;
    Ok(())
}

/// The position at which a room joined with partial state became fully stated, if it did.
pub fn get_partial_state_completed(conn: &Connection, room_id: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT pos FROM partial_state_completed WHERE room_id = ?1")?
        .query_row([room_id], |r| r.get(0))
        .optional()?)
}
