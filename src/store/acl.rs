//! Server ACLs (`m.room.server_acl`): the room's current ACL, and whether a server passes it.

use ruma::{events::room::server_acl::RoomServerAclEventContent, ServerName};
use rusqlite::{Connection, OptionalExtension};

use crate::error::Result;

/// The room's current `m.room.server_acl` content, if it has one that parses. Malformed
/// content is no ACL (it cannot be evaluated; Synapse reads missing fields as empty lists,
/// which would deny everyone).
pub fn get_server_acl(
    conn: &Connection,
    room_id: &str,
) -> Result<Option<RoomServerAclEventContent>> {
    let content: Option<String> = conn
        .prepare_cached(
            "SELECT json_extract(e.json, '$.content') FROM current_state c
             JOIN events e ON e.event_id = c.event_id
             WHERE c.room_id = ?1 AND c.type = 'm.room.server_acl' AND c.state_key = ''",
        )?
        .query_row([room_id], |r| r.get(0))
        .optional()?
        .flatten();
    Ok(content.and_then(|c| serde_json::from_str(&c).ok()))
}

/// Whether the room's ACL lets `server` take part (no ACL: yes).
pub fn server_allowed(conn: &Connection, room_id: &str, server: &ServerName) -> Result<bool> {
    Ok(get_server_acl(conn, room_id)?.is_none_or(|acl| acl.is_allowed(server)))
}
