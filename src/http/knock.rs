//! Knocking from the client's side: `POST /knock/{roomIdOrAlias}` and the `knock` section of
//! `/sync`.

use ruma::{api::client::knock::knock_room, OwnedRoomId};
use serde_json::{json, Value};
use tide::Response;

use super::{auth, json, ruma_req, Req};
use crate::{error::Result, room::build::stripped_state, store::queries as q};

/// # `POST /_matrix/client/v3/knock/{roomIdOrAlias}`
///
/// `via` (or the older `server_name`, which ruma's parser folds into it) names servers to
/// knock through when this server is not in the room; an alias of another server is asked of
/// that server, and its answer's servers are tried after those the client named.
pub async fn knock(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let app = req.state().clone();
    let body: knock_room::v3::Request = ruma_req(&mut req, &["room"]).await?;
    let (room_id, via) = match OwnedRoomId::try_from(body.room_id_or_alias) {
        Ok(r) => (r, body.via),
        Err(alias) => {
            let (room, servers) = crate::fed::directory::resolve_alias(&app, &alias).await?;
            (room, body.via.into_iter().chain(servers).collect())
        }
    };
    crate::ops::knock::knock(&app, &room_id, &who.user_id, body.reason, via).await?;
    json(&json!({ "room_id": room_id }))
}

/// A room of the `/sync` `knock` section: `knock_state`, the stripped state of the room (as
/// the resident server sent it for a knock through another server, else the room's own) and
/// then the user's knock itself, so the client sees its membership.
pub fn knocked_room(c: &crate::store::Connection, room: &str, user: &str) -> Result<Value> {
    let own = match q::get_current_state(c, room, "m.room.member", user)? {
        Some(id) => q::get_event(c, &id)?,
        None => None,
    };
    let mut events = match q::get_invite_state(c, room, user)? {
        Some(s) => serde_json::from_str::<Vec<Value>>(&s).unwrap_or_default(),
        None => stripped_state(c, room, None)?,
    };
    if let Some(row) = own {
        let v: Value = serde_json::from_str(&row.json)?;
        events.push(json!({ "type": "m.room.member", "state_key": user, "sender": v["sender"], "content": v["content"] }));
    }
    Ok(json!({ "knock_state": { "events": events } }))
}
