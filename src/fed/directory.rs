//! Room aliases across servers: an alias of ours is looked up in `room_aliases`; an alias of
//! another server is asked of that server (`/_matrix/federation/v1/query/directory`). Used by
//! the client's alias lookup and join-by-alias, and (local part) by our `/query/directory`.
//!
//! Reads only: a lookup dropped at any await leaves nothing behind.

use ruma::{
    api::federation::query::get_room_information::v1 as room_info, OwnedRoomId, OwnedServerName,
    RoomAliasId,
};

use crate::{
    error::{Error, Result},
    store::queries as q,
    App,
};

/// The room an alias names and servers to join it through (the alias's server first).
pub async fn resolve_alias(
    app: &App,
    alias: &RoomAliasId,
) -> Result<(OwnedRoomId, Vec<OwnedServerName>)> {
    if alias.server_name() == app.server_name {
        return local_alias(app, alias)
            .await?
            .ok_or_else(|| Error::not_found("Room alias not found"));
    }
    let res = app
        .fed
        .client
        .send(
            alias.server_name(),
            room_info::Request::new(alias.to_owned()),
        )
        .await?;
    let mut servers = vec![alias.server_name().to_owned()];
    servers.extend(res.servers.into_iter().filter(|s| s != alias.server_name()));
    Ok((res.room_id, servers))
}

/// One of our aliases: its room, and the servers in the room (us first, then the others with
/// a joined member that the room's ACL allows).
pub async fn local_alias(
    app: &App,
    alias: &RoomAliasId,
) -> Result<Option<(OwnedRoomId, Vec<OwnedServerName>)>> {
    let (a, us) = (alias.to_string(), app.server_name.to_string());
    let found = app
        .store
        .read(move |c| match q::get_alias(c, &a)? {
            Some((room, _)) => {
                let others = q::list_room_servers(c, &room, &us)?;
                Ok(Some((room, others)))
            }
            None => Ok(None),
        })
        .await?;
    let Some((room, others)) = found else {
        return Ok(None);
    };
    let room = OwnedRoomId::try_from(room).map_err(Error::internal)?;
    let mut servers = vec![app.server_name.clone()];
    servers.extend(
        others
            .into_iter()
            .filter_map(|s| OwnedServerName::try_from(s).ok()),
    );
    Ok(Some((room, servers)))
}
