//! Room summaries (MSC3266, in the spec since v1.15): what a client shows about a room before
//! joining it — the matrix-rust-sdk asks for it when it previews a room or an invite.

use ruma::{api::client::room::get_summary, OwnedRoomId};
use serde_json::{json, Value};
use tide::Response;

use super::{json, rooms, ruma_req, Req};
use crate::{
    error::{Error, Result},
    room::build::current_content,
    store::{queries as q, Connection},
};

/// # `GET /_matrix/client/v1/room_summary/{roomIdOrAlias}`
///
/// Also served under the two unstable `im.nheko.summary` paths the SDK and older clients use.
/// Authentication is optional (a guest preview of a public room); a token that is given must be
/// valid. Only rooms this server holds are summarised: a summary of a room on another server
/// would need the federation `/hierarchy` endpoint, so such a room is 404 like an unknown one.
pub async fn summary(mut req: Req) -> Result<Response> {
    let user = match req.header("Authorization").is_some()
        || req.url().query_pairs().any(|(k, _)| k == "access_token")
    {
        true => Some(super::auth(&req).await?.user_id.to_string()),
        false => None,
    };
    let body: get_summary::v1::Request = ruma_req(&mut req, &["room"]).await?;
    let app = req.state().clone();
    let room_id = match OwnedRoomId::try_from(body.room_id_or_alias) {
        Ok(r) => r,
        Err(alias) => crate::fed::directory::resolve_alias(&app, &alias).await?.0,
    };
    let summary = app
        .store
        .read(move |c| room_summary(c, room_id.as_str(), user.as_deref()))
        .await?;
    json(&summary)
}

/// The summary, if `user` (or an anonymous caller) may see the room: it is joined, invited or
/// knocking; the join rule lets anyone ask to come in (`public`, `knock`); the history is
/// `world_readable`; or the rule is restricted and `user` is joined to one of the allowed rooms
/// (Synapse's `_is_local_room_accessible`). Otherwise 404, so as not to reveal that it exists.
fn room_summary(c: &Connection, room_id: &str, user: Option<&str>) -> Result<Value> {
    let hidden = || Error::not_found("Room not found or not visible");
    let Some(version) = q::get_room_version(c, room_id)? else {
        return Err(hidden());
    };
    let mut s = rooms::directory_entry(c, room_id)?;
    let membership = match user {
        Some(u) => q::get_membership(c, room_id, u)?,
        None => None,
    };
    let join_rules = current_content(c, room_id, "m.room.join_rules", "")?.unwrap_or(Value::Null);
    let rule = join_rules["join_rule"].as_str().unwrap_or("invite");
    let allowed: Vec<String> = join_rules["allow"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["type"] == "m.room_membership")
        .filter_map(|a| a["room_id"].as_str().map(str::to_owned))
        .collect();
    let mut visible = matches!(membership.as_deref(), Some("join" | "invite" | "knock"))
        || matches!(rule, "public" | "knock" | "knock_restricted")
        || s["world_readable"] == true;
    if !visible && matches!(rule, "restricted" | "knock_restricted") {
        if let Some(u) = user {
            for r in &allowed {
                if q::get_membership(c, r, u)?.as_deref() == Some("join") {
                    visible = true;
                    break;
                }
            }
        }
    }
    if !visible {
        return Err(hidden());
    }
    s["join_rule"] = rule.into();
    s["room_version"] = version.into();
    if let Some(alg) = current_content(c, room_id, "m.room.encryption", "")?
        .and_then(|e| e.get("algorithm").cloned())
    {
        s["encryption"] = alg;
    }
    if matches!(rule, "restricted" | "knock_restricted") {
        s["allowed_room_ids"] = json!(allowed);
    }
    if let Some(m) = membership {
        s["membership"] = m.into();
    }
    Ok(s)
}
