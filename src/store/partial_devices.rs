//! SQL for device-list tracking while rooms are partial-state: which partial rooms a remote
//! server is in, by the servers their join answers named.

use super::Connection;
use crate::error::Result;

/// The partial-state rooms whose join answer named `server` among the servers in the room
/// (one primary-key probe per partial room: there are few).
pub fn list_partial_rooms_with_server(conn: &Connection, server: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.room_id FROM partial_state_rooms p
         WHERE EXISTS (SELECT 1 FROM partial_state_room_servers s
                       WHERE s.room_id = p.room_id AND s.server = ?1)",
    )?;
    let rows = stmt.query_map([server], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
