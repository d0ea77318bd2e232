//! Server ACLs on what other servers send us and ask of us: a server the room's
//! `m.room.server_acl` denies gets 403 `M_FORBIDDEN` for anything about that room. (Sending
//! to denied servers is stopped where destinations are listed: `store::queries::list_room_servers`.)

use ruma::ServerName;

use crate::{
    error::{Error, Result},
    store::acl,
    App,
};

/// Fails with 403 `M_FORBIDDEN` when the room's server ACL denies `server`.
pub async fn check(app: &App, room_id: &str, server: &ServerName) -> Result<()> {
    let (r, s) = (room_id.to_owned(), server.to_owned());
    let allowed = app
        .store
        .read(move |c| acl::server_allowed(c, &r, &s))
        .await?;
    if allowed {
        Ok(())
    } else {
        Err(denied(server))
    }
}

/// The refusal for a server the room's ACL denies.
pub fn denied(server: &ServerName) -> Error {
    Error::forbidden(format!(
        "Server {server} is banned from this room by its server ACL"
    ))
}
