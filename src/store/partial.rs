//! SQL for partial-state joins (MSC3706): the reduced `/send_join` answer the resident server
//! serves, read by index instead of loading a whole room state.

use rusqlite::params;

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

/// The servers of the room's joined members other than `user` (current state): the
/// `servers_in_room` of a join answer for `user`, who is not in the room before the join.
pub fn list_servers_except_user(
    conn: &Connection,
    room_id: &str,
    user: &str,
) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT substr(state_key, instr(state_key, ':') + 1) FROM current_state
         WHERE room_id = ?1 AND type = 'm.room.member' AND membership = 'join' AND state_key != ?2",
    )?;
    let rows = stmt.query_map([room_id, user], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
