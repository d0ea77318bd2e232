//! What other servers ask about our rooms' names: `/query/directory` (our aliases) and
//! `/publicRooms` (our public room directory, the same pages the client API serves).

use ruma::api::federation::{
    directory::{get_public_rooms, get_public_rooms_filtered},
    query::get_room_information::v1 as room_info,
};
use serde_json::json;
use tide::Response;

use super::origin;
use crate::{
    error::{Error, Result},
    fed::directory::local_alias,
    http::{json, rooms::public_rooms_page, Req},
};

/// # `GET /_matrix/federation/v1/query/directory`
pub async fn query_directory(mut req: Req) -> Result<Response> {
    let r = origin::<room_info::Request>(&mut req, &[]).await?.req;
    let app = req.state().clone();
    if r.room_alias.server_name() != app.server_name {
        return Err(Error::not_found("The alias is not on this server"));
    }
    let (room_id, servers) = local_alias(&app, &r.room_alias)
        .await?
        .ok_or_else(|| Error::not_found("Room alias not found"))?;
    json(&json!({ "room_id": room_id, "servers": servers }))
}

/// # `GET /_matrix/federation/v1/publicRooms`
pub async fn public_rooms(mut req: Req) -> Result<Response> {
    let r = origin::<get_public_rooms::v1::Request>(&mut req, &[])
        .await?
        .req;
    json(&public_rooms_page(req.state(), r.limit, r.since, None).await?)
}

/// # `POST /_matrix/federation/v1/publicRooms`
pub async fn public_rooms_filtered(mut req: Req) -> Result<Response> {
    let r = origin::<get_public_rooms_filtered::v1::Request>(&mut req, &[])
        .await?
        .req;
    let term = r.filter.generic_search_term;
    json(&public_rooms_page(req.state(), r.limit, r.since, term).await?)
}
