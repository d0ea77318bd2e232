//! Rooms: `/createRoom`, membership (join, leave, forget, invite, kick, ban, unban),
//! `/joined_rooms`, aliases and the public room directory.

use ruma::{
    api::client::{
        alias::{create_alias, delete_alias, get_alias},
        directory::{
            get_public_rooms, get_public_rooms_filtered, get_room_visibility, set_room_visibility,
        },
        membership::{
            ban_user, forget_room, invite_user, invite_user::v3::InvitationRecipient,
            join_room_by_id, join_room_by_id_or_alias, joined_rooms, kick_user, leave_room,
            unban_user,
        },
        room::{aliases, create_room, Visibility},
    },
    events::room::power_levels::RoomPowerLevelsEventContent,
    OwnedRoomAliasId, OwnedRoomId, RoomVersionId,
};
use serde_json::{json, Value};
use tide::Response;

use super::{auth, json, known_body, ruma_req, Req};
use crate::ops::rooms;
use crate::{
    error::{Error, Result},
    room::{
        build::{self, current_content, NewEvent},
        is_supported_version,
    },
    store::queries as q,
    util::check_id_len,
    App,
};

fn raw_to_value<T>(raw: &ruma::serde::Raw<T>) -> Result<Value> {
    serde_json::from_str(raw.json().get()).map_err(|e| Error::bad_json(e.to_string()))
}

/// # `POST /_matrix/client/v3/createRoom`
pub async fn create_room(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let app = req.state().clone();
    let body: create_room::v3::Request = ruma_req(&mut req, &[]).await?;
    let version = match body.room_version.clone() {
        Some(v) => v,
        None => RoomVersionId::try_from(app.config.default_room_version.as_str())
            .map_err(Error::internal)?,
    };
    if !is_supported_version(&version) {
        return Err(Error::unsupported_room_version(format!(
            "Room version {version} is not supported"
        )));
    }
    let alias = match &body.room_alias_name {
        Some(name) => {
            let a = format!("#{name}:{}", app.server_name);
            Some(
                OwnedRoomAliasId::try_from(a)
                    .map_err(|e| Error::invalid_param(format!("room_alias_name: {e}")))?,
            )
        }
        None => None,
    };
    // ruma keeps unknown strings as `_Custom` variants; the spec's enums are closed.
    known_body(
        "visibility",
        body.visibility.as_str(),
        &["public", "private"],
    )?;
    if let Some(p) = &body.preset {
        known_body(
            "preset",
            p.as_str(),
            &["private_chat", "public_chat", "trusted_private_chat"],
        )?;
    }
    let public = body.visibility == Visibility::Public;
    let preset = body
        .preset
        .clone()
        .map(|p| p.to_string())
        .unwrap_or_else(|| {
            if public {
                "public_chat".into()
            } else {
                "private_chat".into()
            }
        });
    let creation = match &body.creation_content {
        Some(raw) => {
            let _: create_room::v3::CreationContent = raw
                .deserialize()
                .map_err(|e| Error::bad_json(format!("creation_content: {e}")))?;
            raw_to_value(raw)?
        }
        None => json!({}),
    };
    let pl_override = match &body.power_level_content_override {
        Some(raw) => {
            // Typed like the event content (integers, or strings of integers).
            let _: RoomPowerLevelsEventContent = serde_json::from_str(raw.json().get())
                .map_err(|e| Error::bad_json(format!("power_level_content_override: {e}")))?;
            Some(raw_to_value(raw)?)
        }
        None => None,
    };
    let initial_state = body
        .initial_state
        .iter()
        .map(|raw| initial_state_event(&raw_to_value(raw)?))
        .collect::<Result<Vec<_>>>()?;
    let room = rooms::NewRoom {
        version,
        alias,
        public,
        preset,
        creation,
        power_levels_override: pl_override,
        initial_state,
        name: body.name,
        topic: body.topic,
        invite: body.invite,
        is_direct: body.is_direct,
    };
    let room_id = rooms::create_room(&app, &who.user_id, room).await?;
    json(&json!({ "room_id": room_id }))
}

/// One `initial_state` entry: `{type, state_key?, content}` with a string type and state key
/// (default `""`) and an object content, else `M_BAD_JSON`. (Synapse reads the same three
/// fields; ruma's `AnyInitialStateEvent` would also reject non-spec content of known types,
/// which Synapse leaves to the auth rules, so the shape is checked here.)
fn initial_state_event(v: &Value) -> Result<NewEvent> {
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::bad_json("initial_state: each event needs a string type"))?;
    let key = match v.get("state_key") {
        None => "",
        Some(Value::String(k)) => k.as_str(),
        Some(_) => return Err(Error::bad_json("initial_state: state_key must be a string")),
    };
    let content = match v.get("content") {
        Some(c @ Value::Object(_)) => c.clone(),
        _ => return Err(Error::bad_json("initial_state: content must be an object")),
    };
    check_id_len("initial_state type", kind, Error::bad_json)?;
    check_id_len("initial_state state_key", key, Error::bad_json)?;
    Ok(NewEvent::state(kind, key, content))
}

/// # `POST /_matrix/client/v3/join/{roomIdOrAlias}`
pub async fn join_by_id_or_alias(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let app = req.state().clone();
    let body: join_room_by_id_or_alias::v3::Request = ruma_req(&mut req, &["room"]).await?;
    // An alias of another server is asked of that server; its answer's servers are tried
    // after those the client named.
    let (room_id, via) = match OwnedRoomId::try_from(body.room_id_or_alias) {
        Ok(r) => (r, body.via),
        Err(alias) => {
            let (room, servers) = crate::fed::directory::resolve_alias(&app, &alias).await?;
            (room, body.via.into_iter().chain(servers).collect())
        }
    };
    rooms::join(&app, &room_id, &who.user_id, body.reason, via).await?;
    json(&json!({ "room_id": room_id }))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/join`
pub async fn join_by_id(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: join_room_by_id::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    rooms::join(
        req.state(),
        &body.room_id,
        &who.user_id,
        body.reason,
        Vec::new(),
    )
    .await?;
    json(&json!({ "room_id": body.room_id }))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/leave`
pub async fn leave(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: leave_room::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    rooms::leave(req.state(), &who.user_id, &body.room_id, body.reason).await?;
    json(&json!({}))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/forget`
pub async fn forget(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: forget_room::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    let (rid, uid) = (body.room_id.to_string(), who.user_id.to_string());
    req.state()
        .store
        .write(move |tx| {
            if matches!(
                q::get_membership(tx, &rid, &uid)?.as_deref(),
                Some("join" | "invite" | "knock")
            ) {
                return Err(Error::bad_state(
                    "You must leave the room before forgetting it",
                ));
            }
            q::insert_forgotten_room(tx, &uid, &rid)?;
            Ok(())
        })
        .await?;
    json(&json!({}))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/invite`
pub async fn invite(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let app = req.state().clone();
    let body: invite_user::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    let InvitationRecipient::UserId(recipient) = body.recipient else {
        return Err(Error::forbidden(
            "Third-party invites are not supported (no identity server)",
        ));
    };
    rooms::invite(
        &app,
        &who.user_id,
        &body.room_id,
        &recipient.user_id,
        recipient.reason,
    )
    .await?;
    json(&json!({}))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/kick`
///
/// Only someone currently in the room (joined, invited, knocking) can be kicked; checked in
/// the write that sends the kick.
pub async fn kick(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: kick_user::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    rooms::set_membership(
        req.state(),
        &body.room_id,
        &who.user_id,
        &body.user_id,
        "leave",
        body.reason,
        rooms::Require::InRoom,
    )
    .await?;
    json(&json!({}))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/ban`
pub async fn ban(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: ban_user::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    rooms::set_membership(
        req.state(),
        &body.room_id,
        &who.user_id,
        &body.user_id,
        "ban",
        body.reason,
        rooms::Require::Nothing,
    )
    .await?;
    json(&json!({}))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/unban`
///
/// Only a banned user can be unbanned; checked in the write that sends the unban.
pub async fn unban(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: unban_user::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    rooms::set_membership(
        req.state(),
        &body.room_id,
        &who.user_id,
        &body.user_id,
        "leave",
        body.reason,
        rooms::Require::Banned,
    )
    .await?;
    json(&json!({}))
}

/// # `GET /_matrix/client/v3/joined_rooms`
pub async fn joined_rooms(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let _: joined_rooms::v3::Request = ruma_req(&mut req, &[]).await?;
    let u = who.user_id.to_string();
    let rooms = req
        .state()
        .store
        .read(move |c| q::list_user_rooms(c, &u))
        .await?;
    let joined: Vec<String> = rooms
        .into_iter()
        .filter(|(_, m, _)| m == "join")
        .map(|(r, _, _)| r)
        .collect();
    json(&json!({ "joined_rooms": joined }))
}

/// # `GET /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn get_alias(mut req: Req) -> Result<Response> {
    let body: get_alias::v3::Request = ruma_req(&mut req, &["alias"]).await?;
    let app = req.state().clone();
    let (room_id, servers) = crate::fed::directory::resolve_alias(&app, &body.room_alias).await?;
    json(&json!({ "room_id": room_id, "servers": servers }))
}

/// # `PUT /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn put_alias(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: create_alias::v3::Request = ruma_req(&mut req, &["alias"]).await?;
    let app = req.state().clone();
    if body.room_alias.server_name() != app.server_name {
        return Err(Error::invalid_param("Aliases must be on this server"));
    }
    let (a, r, u) = (
        body.room_alias.to_string(),
        body.room_id.to_string(),
        who.user_id.to_string(),
    );
    app.store
        .write(move |tx| {
            if q::get_room_version(tx, &r)?.is_none() {
                return Err(Error::not_found("Unknown room"));
            }
            if !q::insert_alias(tx, &a, &r, &u)? {
                return Err(Error::new(409, "M_UNKNOWN", "Room alias already exists"));
            }
            Ok(())
        })
        .await?;
    json(&json!({}))
}

/// # `DELETE /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn delete_alias(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: delete_alias::v3::Request = ruma_req(&mut req, &["alias"]).await?;
    let (a, u) = (body.room_alias.to_string(), who.user_id.clone());
    let local = req.state().local.clone();
    req.state()
        .store
        .write(move |tx| {
            let (room, creator) =
                q::get_alias(tx, &a)?.ok_or_else(|| Error::not_found("Room alias not found"))?;
            let admin = q::get_user(tx, u.as_str())?.is_some_and(|r| r.is_admin);
            let may_send = can_send_state(tx, &room, u.as_str(), "m.room.canonical_alias")?;
            if creator != u.as_str() && !admin && !may_send {
                return Err(Error::forbidden("You may not delete this alias"));
            }
            q::delete_alias(tx, &a)?;
            // As Synapse does: the room stops advertising the alias, in the same write, when
            // the deleting user may send the event (otherwise the event is left as it is).
            if may_send {
                if let Some(content) = without_alias(tx, &room, &a)? {
                    let rid = OwnedRoomId::try_from(room).map_err(Error::internal)?;
                    let new = NewEvent::state("m.room.canonical_alias", "", content);
                    build::send(tx, &local, &rid, &u, new, None)?;
                }
            }
            Ok(())
        })
        .await?;
    json(&json!({}))
}

/// The room's `m.room.canonical_alias` content without `alias` (as `alias` or in
/// `alt_aliases`), or `None` when the event does not name it.
fn without_alias(
    conn: &crate::store::Connection,
    room_id: &str,
    alias: &str,
) -> Result<Option<Value>> {
    let Some(mut content) = current_content(conn, room_id, "m.room.canonical_alias", "")? else {
        return Ok(None);
    };
    let mut named = false;
    if content.get("alias").and_then(Value::as_str) == Some(alias) {
        content.as_object_mut().map(|o| o.remove("alias"));
        named = true;
    }
    if let Some(alts) = content.get_mut("alt_aliases").and_then(Value::as_array_mut) {
        let before = alts.len();
        alts.retain(|v| v.as_str() != Some(alias));
        named |= alts.len() != before;
    }
    Ok(named.then_some(content))
}

/// Whether a joined user's power level allows sending the given state event type.
fn can_send_state(
    conn: &crate::store::Connection,
    room_id: &str,
    user_id: &str,
    kind: &str,
) -> Result<bool> {
    if q::get_membership(conn, room_id, user_id)?.as_deref() != Some("join") {
        return Ok(false);
    }
    let levels = build::power_levels(conn, room_id)?;
    Ok(levels.user(user_id) >= levels.state_event(kind))
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/aliases`
pub async fn room_aliases(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: aliases::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    let (r, u) = (body.room_id.to_string(), who.user_id.to_string());
    let aliases = req
        .state()
        .store
        .read(move |c| {
            if q::get_membership(c, &r, &u)?.as_deref() != Some("join") {
                return Err(Error::forbidden("You are not in this room"));
            }
            q::list_aliases(c, &r)
        })
        .await?;
    json(&json!({ "aliases": aliases }))
}

/// # `GET /_matrix/client/v3/directory/list/room/{roomId}`
pub async fn get_visibility(mut req: Req) -> Result<Response> {
    let body: get_room_visibility::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    let r = body.room_id.to_string();
    let public = req
        .state()
        .store
        .read(move |c| q::get_room_public(c, &r))
        .await?
        .ok_or_else(|| Error::not_found("Unknown room"))?;
    json(&json!({ "visibility": if public { "public" } else { "private" } }))
}

/// # `PUT /_matrix/client/v3/directory/list/room/{roomId}`
///
/// ruma's type requires `visibility` (Synapse defaults a missing one to `public`); every
/// client we test against sends it, so a missing one is `M_BAD_JSON` here.
pub async fn set_visibility(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: set_room_visibility::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    known_body(
        "visibility",
        body.visibility.as_str(),
        &["public", "private"],
    )?;
    let public = body.visibility == Visibility::Public;
    let (r, u) = (body.room_id.to_string(), who.user_id.to_string());
    req.state()
        .store
        .write(move |tx| {
            if q::get_room_version(tx, &r)?.is_none() {
                return Err(Error::not_found("Unknown room"));
            }
            if !can_send_state(tx, &r, &u, "m.room.canonical_alias")? {
                return Err(Error::forbidden(
                    "You may not change this room's visibility",
                ));
            }
            q::set_room_public(tx, &r, public)?;
            Ok(())
        })
        .await?;
    json(&json!({}))
}

/// One public room directory entry, from the room's current state.
pub(super) fn directory_entry(conn: &crate::store::Connection, room_id: &str) -> Result<Value> {
    let get = |kind: &str, field: &str| -> Result<Option<Value>> {
        Ok(current_content(conn, room_id, kind, "")?.and_then(|c| c.get(field).cloned()))
    };
    let joined = q::list_members(conn, room_id)?
        .iter()
        .filter(|(_, m, _)| m == "join")
        .count();
    let mut e = json!({
        "room_id": room_id,
        "num_joined_members": joined,
        "world_readable": get("m.room.history_visibility", "history_visibility")?.as_ref().and_then(Value::as_str) == Some("world_readable"),
        "guest_can_join": get("m.room.guest_access", "guest_access")?.as_ref().and_then(Value::as_str) == Some("can_join"),
        "join_rule": get("m.room.join_rules", "join_rule")?.unwrap_or_else(|| "public".into()),
    });
    for (kind, field, out) in [
        ("m.room.name", "name", "name"),
        ("m.room.topic", "topic", "topic"),
        ("m.room.canonical_alias", "alias", "canonical_alias"),
        ("m.room.avatar", "url", "avatar_url"),
        ("m.room.create", "type", "room_type"),
    ] {
        if let Some(v) = get(kind, field)? {
            e[out] = v;
        }
    }
    Ok(e)
}

/// # `GET|POST /_matrix/client/v3/publicRooms`
///
/// With `server` naming another server, that server's directory, asked over federation.
pub async fn public_rooms(mut req: Req) -> Result<Response> {
    let (limit, since, filter, server) = if req.method() == tide::http::Method::Post {
        let body: get_public_rooms_filtered::v3::Request = ruma_req(&mut req, &[]).await?;
        (body.limit, body.since, Some(body.filter), body.server)
    } else {
        let body: get_public_rooms::v3::Request = ruma_req(&mut req, &[]).await?;
        (body.limit, body.since, None, body.server)
    };
    let app = req.state().clone();
    if let Some(server) = server.filter(|s| *s != app.server_name) {
        return json(&remote_public_rooms(&app, &server, limit, since, filter).await?);
    }
    let term = filter.and_then(|f| f.generic_search_term);
    json(&public_rooms_page(&app, limit, since, term).await?)
}

/// Another server's public rooms (`/_matrix/federation/v1/publicRooms`, `POST` when there is a
/// filter), in the client API's shape (the same fields).
async fn remote_public_rooms(
    app: &App,
    server: &ruma::ServerName,
    limit: Option<ruma::UInt>,
    since: Option<String>,
    filter: Option<ruma::directory::Filter>,
) -> Result<Value> {
    use ruma::api::federation::directory::{
        get_public_rooms as fed_get, get_public_rooms_filtered as fed_filtered,
    };
    let client = &app.fed.client;
    let (chunk, next, prev, total) = match filter {
        Some(filter) => {
            let mut r = fed_filtered::v1::Request::new();
            (r.limit, r.since, r.filter) = (limit, since, filter);
            let res = client.send(server, r).await?;
            (
                res.chunk,
                res.next_batch,
                res.prev_batch,
                res.total_room_count_estimate,
            )
        }
        None => {
            let mut r = fed_get::v1::Request::new();
            (r.limit, r.since) = (limit, since);
            let res = client.send(server, r).await?;
            (
                res.chunk,
                res.next_batch,
                res.prev_batch,
                res.total_room_count_estimate,
            )
        }
    };
    // Absent fields stay absent (not `null`), as in our own pages.
    let mut out = json!({ "chunk": chunk });
    let fields = [
        ("next_batch", next.map(Value::from)),
        ("prev_batch", prev.map(Value::from)),
        (
            "total_room_count_estimate",
            total.map(|t| u64::from(t).into()),
        ),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            out[k] = v;
        }
    }
    Ok(out)
}

/// One page of our public room directory, most joined first: the client API's and
/// federation's `/publicRooms` (offset tokens `o<n>`; `term` matches name, topic, alias).
pub async fn public_rooms_page(
    app: &App,
    limit: Option<ruma::UInt>,
    since: Option<String>,
    term: Option<String>,
) -> Result<Value> {
    let term = term.map(|t| t.to_lowercase());
    let limit = match limit {
        Some(l) => usize::try_from(u64::from(l))
            .unwrap_or(usize::MAX)
            .clamp(1, 500),
        None => 100,
    };
    let offset: usize = match since {
        Some(s) => s
            .strip_prefix("o")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::invalid_param("invalid since token"))?,
        None => 0,
    };
    let (chunk, total) = app
        .store
        .read(move |c| {
            let mut all = Vec::new();
            for r in q::list_public_rooms(c)? {
                let e = directory_entry(c, &r)?;
                let hay = format!(
                    "{} {} {}",
                    e["name"].as_str().unwrap_or(""),
                    e["topic"].as_str().unwrap_or(""),
                    e["canonical_alias"].as_str().unwrap_or("")
                )
                .to_lowercase();
                if term.as_ref().is_none_or(|t| hay.contains(t)) {
                    all.push(e);
                }
            }
            all.sort_by(|a, b| {
                b["num_joined_members"]
                    .as_u64()
                    .cmp(&a["num_joined_members"].as_u64())
            });
            let total = all.len();
            Ok((
                all.into_iter().skip(offset).take(limit).collect::<Vec<_>>(),
                total,
            ))
        })
        .await?;
    let mut out = json!({ "chunk": chunk, "total_room_count_estimate": total });
    if offset + limit < total {
        out["next_batch"] = format!("o{}", offset + limit).into();
    }
    if offset > 0 {
        out["prev_batch"] = format!("o{}", offset.saturating_sub(limit)).into();
    }
    Ok(out)
}
