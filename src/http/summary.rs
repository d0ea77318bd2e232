//! Room summaries (MSC3266, in the spec since v1.15): what a client shows about a room before
//! joining it — the matrix-rust-sdk asks for it when it previews a room or an invite.

use ruma::{
    api::{client::room::get_summary, federation::space::get_hierarchy::v1 as hierarchy},
    OwnedRoomId, OwnedServerName, RoomId,
};
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
/// valid. A room this server holds is summarised from its own state; any other room is asked
/// of the `via` servers (or, for an alias of another server, the servers its directory named)
/// over federation `/hierarchy`, as Synapse does, and the first that knows it answers.
pub async fn summary(mut req: Req) -> Result<Response> {
    let user = match req.header("Authorization").is_some()
        || req.url().query_pairs().any(|(k, _)| k == "access_token")
    {
        true => Some(super::auth(&req).await?.user_id.to_string()),
        false => None,
    };
    let body: get_summary::v1::Request = ruma_req(&mut req, &["room"]).await?;
    let app = req.state().clone();
    let (room_id, mut via) = match OwnedRoomId::try_from(body.room_id_or_alias) {
        Ok(r) => (r, Vec::new()),
        Err(alias) => crate::fed::directory::resolve_alias(&app, &alias).await?,
    };
    via.extend(body.via);
    let (r, u) = (room_id.clone(), user.clone());
    let local = app
        .store
        .read(move |c| {
            Ok(match q::get_room_version(c, r.as_str())? {
                Some(_) => Some(room_summary(c, r.as_str(), u.as_deref())?),
                None => None,
            })
        })
        .await?;
    match local {
        Some(summary) => json(&summary),
        None => json(&remote_summary(&app, &room_id, user, &via).await?),
    }
}

/// A room this server does not hold, from the first of `via` whose `/hierarchy` answers, with
/// the user's membership added when they are invited to it. Unreachable or refusing servers
/// are skipped; none answering is 404, as for an unknown room.
async fn remote_summary(
    app: &crate::App,
    room_id: &RoomId,
    user: Option<String>,
    via: &[OwnedServerName],
) -> Result<Value> {
    for server in via.iter().filter(|s| **s != app.server_name) {
        let req = hierarchy::Request::new(room_id.to_owned());
        let res = match app.fed.client.send(server, req).await {
            Ok(res) => res,
            Err(e) => {
                log::debug!("room summary of {room_id} from {server}: {}", e.message);
                continue;
            }
        };
        let mut s = serde_json::to_value(&res.room.summary).map_err(Error::internal)?;
        if s["room_id"] != room_id.as_str() {
            continue;
        }
        // ruma leaves out a `public` rule, the field's default; clients are told it plainly,
        // as for a local room.
        if s.get("join_rule").is_none() {
            s["join_rule"] = "public".into();
        }
        if let Some(u) = user {
            let r = room_id.to_string();
            let invited = app
                .store
                .read(move |c| q::get_invite_state(c, &r, &u))
                .await?
                .is_some();
            if invited {
                s["membership"] = "invite".into();
            }
        }
        return Ok(s);
    }
    Err(Error::not_found("Room not found or not visible"))
}

/// What a summary says of a room this server holds, whoever asks: the directory fields, join
/// rule, room version, encryption, and the rooms a restricted rule allows. `None` for a room
/// this server does not hold. Also the answer of federation `/hierarchy`.
pub struct Local {
    pub summary: Value,
    rule: String,
    allowed: Vec<String>,
}

pub fn local_summary(c: &Connection, room_id: &str) -> Result<Option<Local>> {
    let Some(version) = q::get_room_version(c, room_id)? else {
        return Ok(None);
    };
    let mut s = rooms::directory_entry(c, room_id)?;
    let join_rules = current_content(c, room_id, "m.room.join_rules", "")?.unwrap_or(Value::Null);
    let rule = join_rules["join_rule"]
        .as_str()
        .unwrap_or("invite")
        .to_owned();
    let allowed: Vec<String> = join_rules["allow"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["type"] == "m.room_membership")
        .filter_map(|a| a["room_id"].as_str().map(str::to_owned))
        .collect();
    s["join_rule"] = rule.as_str().into();
    s["room_version"] = version.into();
    if let Some(alg) = current_content(c, room_id, "m.room.encryption", "")?
        .and_then(|e| e.get("algorithm").cloned())
    {
        s["encryption"] = alg;
    }
    if matches!(rule.as_str(), "restricted" | "knock_restricted") {
        s["allowed_room_ids"] = json!(allowed);
    }
    Ok(Some(Local {
        summary: s,
        rule,
        allowed,
    }))
}

impl Local {
    /// Anyone may see it: the join rule lets anyone ask to come in, or the history is
    /// `world_readable`.
    fn open(&self) -> bool {
        matches!(self.rule.as_str(), "public" | "knock" | "knock_restricted")
            || self.summary["world_readable"] == true
    }

    fn restricted(&self) -> bool {
        matches!(self.rule.as_str(), "restricted" | "knock_restricted")
    }
}

/// The summary, if `user` (or an anonymous caller) may see the room: it is joined, invited or
/// knocking; anyone may (see [`Local::open`]); or the rule is restricted and `user` is joined to
/// one of the allowed rooms (Synapse's `_is_local_room_accessible`). Otherwise 404, so as not
/// to reveal that it exists.
fn room_summary(c: &Connection, room_id: &str, user: Option<&str>) -> Result<Value> {
    let hidden = || Error::not_found("Room not found or not visible");
    let local = local_summary(c, room_id)?.ok_or_else(hidden)?;
    let membership = match user {
        Some(u) => q::get_membership(c, room_id, u)?,
        None => None,
    };
    let mut visible =
        matches!(membership.as_deref(), Some("join" | "invite" | "knock")) || local.open();
    if !visible && local.restricted() {
        if let Some(u) = user {
            for r in &local.allowed {
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
    let mut summary = local.summary;
    if let Some(m) = membership {
        summary["membership"] = m.into();
    }
    Ok(summary)
}

/// The summary of a room this server holds as another server may see it (federation
/// `/hierarchy`): anyone may (see [`Local::open`]), or `server` has a member joined to it, or
/// the rule is restricted and `server` has a member joined to an allowed room (the joining
/// server then checks its own user, as Synapse's `_is_remote_room_accessible` lets it).
pub fn summary_for_server(c: &Connection, room_id: &str, server: &str) -> Result<Option<Value>> {
    let Some(local) = local_summary(c, room_id)? else {
        return Ok(None);
    };
    let joined_from = |room: &str| -> Result<bool> {
        Ok(q::list_members(c, room)?.iter().any(|(user, m, _)| {
            m == "join" && user.split_once(':').is_some_and(|(_, s)| s == server)
        }))
    };
    let mut visible = local.open() || joined_from(room_id)?;
    if !visible && local.restricted() {
        for r in &local.allowed {
            if joined_from(r)? {
                visible = true;
                break;
            }
        }
    }
    Ok(visible.then_some(local.summary))
}
