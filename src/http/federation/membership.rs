//! Joining rooms on this server from elsewhere: `/make_join` and `/send_join`.

use ruma::{
    api::federation::membership::{create_join_event, prepare_join_event},
    OwnedEventId, RoomVersionId,
};
use serde_json::{json, value::RawValue, Value};
use tide::Response;

use super::origin;
use crate::{
    error::{Error, Result},
    http::{json, Req},
    ops::federation::{room_of, verify_pdu},
    room::{
        build::{self, NewEvent},
        receive::{self, Outcome},
        restricted, state,
    },
    store::queries as q,
};

/// # `GET /_matrix/federation/v1/make_join/{roomId}/{userId}`
pub async fn make_join(mut req: Req) -> Result<Response> {
    let o = origin::<prepare_join_event::v1::Request>(&mut req, &["room_id", "user_id"]).await?;
    // No `ver` means the server only knows version 1 (spec).
    let ver = if o.req.ver.is_empty() {
        vec![RoomVersionId::V1]
    } else {
        o.req.ver.clone()
    };
    let (room, user) = (o.req.room_id.clone(), o.req.user_id.clone());
    template(&req, &o.origin, room, user, "join", Some(ver)).await
}

/// The unsigned membership event `/make_join` and `/make_leave` hand out, built on the
/// room's current extremities and checked against the auth rules; `versions`: those the
/// requesting server supports (`M_INCOMPATIBLE_ROOM_VERSION` otherwise).
pub(super) async fn template(
    req: &Req,
    origin: &ruma::ServerName,
    room_id: ruma::OwnedRoomId,
    user_id: ruma::OwnedUserId,
    membership: &'static str,
    versions: Option<Vec<RoomVersionId>>,
) -> Result<Response> {
    let app = req.state().clone();
    if user_id.server_name() != origin {
        return Err(Error::forbidden(
            "The user is not from the requesting server",
        ));
    }
    let (origin, us, now) = (
        origin.to_string(),
        app.server_name.to_string(),
        app.clock.now_ms(),
    );
    let (version, event) = app
        .store
        .read(move |c| {
            if q::get_room_version(c, room_id.as_str())?.is_none()
                || !q::server_has_joined_member(c, room_id.as_str(), &us, "")?
            {
                return Err(Error::not_found("This server is not in that room"));
            }
            // MSC3895: a partial state cannot tell whether the user may join or knock.
            if matches!(membership, "join" | "knock") {
                let what = format!("/make_{membership}");
                crate::ops::partial::refuse_while_partial(c, room_id.as_str(), &what)?;
            }
            let version = build::room_version(c, &room_id)?;
            if versions.is_some_and(|v| !v.contains(&version)) {
                let mut e = Error::new(
                    400,
                    "M_INCOMPATIBLE_ROOM_VERSION",
                    format!("The room is version {version}"),
                );
                e.body = Some(json!({
                    "errcode": "M_INCOMPATIBLE_ROOM_VERSION",
                    "error": format!("The room is version {version}"),
                    "room_version": version.as_str(),
                }));
                return Err(e);
            }
            let mut content = json!({ "membership": membership });
            if membership == "join" {
                // A restricted room: we vouch for the join (and sign it at `/send_join`).
                if let Some(by) =
                    restricted::authorising_user(c, room_id.as_str(), user_id.as_str(), &us)?
                {
                    content["join_authorised_via_users_server"] = by.into();
                }
            }
            let new = NewEvent::state("m.room.member", user_id.as_str(), content);
            let prepared = build::prepare(c, &origin, &room_id, &user_id, new, None, now)?;
            build::check_prepared(c, &room_id, &prepared)?;
            Ok((version, prepared.pdu))
        })
        .await?;
    json(&json!({ "room_version": version.as_str(), "event": event }))
}

/// # `PUT /_matrix/federation/v2/send_join/{roomId}/{eventId}`
///
/// Answers with the state before the join and its auth chain: in full, or, when the joining
/// server asks with `omit_members=true`, the partial state of MSC3706 (`members_omitted:
/// true`, see `ops::partial::join_answer`).
pub async fn send_join_v2(mut req: Req) -> Result<Response> {
    let o = origin::<create_join_event::v2::Request>(&mut req, &["room_id", "event_id"]).await?;
    let app = req.state().clone();
    let r = o.req;
    let rid = r.room_id.to_string();
    app.store
        .read(move |c| crate::ops::partial::refuse_while_partial(c, &rid, "/send_join"))
        .await?;
    // A join we vouched for at `/make_join` gets our signature here, and the signed event
    // goes back in the answer's `event` (the joiner needs it: other servers check it).
    let vouched = countersign(&app, &r.room_id, &r.pdu).await?;
    let raw = vouched.as_deref().unwrap_or(&r.pdu);
    let (inc, version) =
        own_membership(&app, &o.origin, &r.room_id, &r.event_id, raw, "join").await?;
    let room_id = r.room_id.clone();
    let pdu = &inc.pdu;
    let prevs: Vec<OwnedEventId> = pdu.prev_events.clone();
    let join_id = pdu.event_id.to_string();
    let join_auth: Vec<String> = pdu.auth_events.iter().map(|e| e.to_string()).collect();
    let omit_members = r.omit_members && app.config.federation.serve_partial_joins;
    // The joining server knows only us: the join goes to the room's other servers from here,
    // queued in the same write that accepts it.
    let (us, joiner) = (app.server_name.to_string(), o.origin.to_string());
    let outcome = app
        .store
        .write(move |tx| {
            let out = receive::commit(tx, &inc)?;
            if let Ok(Outcome::Accepted(_)) = out {
                let mut dests = q::list_room_servers(tx, inc.pdu.room_id.as_str(), &us)?;
                dests.retain(|d| *d != joiner);
                q::insert_outbox_pdu(tx, &dests, inc.pdu.event_id.as_str())?;
            }
            Ok(out)
        })
        .await?;
    match outcome {
        Ok(Outcome::Accepted(_)) | Ok(Outcome::Duplicate) => {}
        Ok(other) => return Err(Error::forbidden(format!("Join not accepted: {other:?}"))),
        Err(missing) => {
            return Err(Error::bad_json(format!(
                "The join refers to events this server does not have: {missing:?}"
            )))
        }
    }
    let us = app.server_name.to_string();
    let (state_events, auth_chain, servers) = app
        .store
        .read(move |c| {
            let load = |ids: &[String]| -> Result<Vec<Box<RawValue>>> {
                q::get_events(c, ids)?
                    .into_iter()
                    .map(|row| RawValue::from_string(row.json).map_err(Error::from))
                    .collect()
            };
            if omit_members {
                let (state, chain, servers) = crate::ops::partial::join_answer(
                    c,
                    room_id.as_str(),
                    &join_id,
                    &join_auth,
                    &us,
                )?;
                return Ok((load(&state)?, load(&chain)?, servers));
            }
            let rules = version
                .rules()
                .ok_or_else(|| Error::internal("room version without rules"))?;
            let before = state::state_before(c, &rules, &prevs)?;
            let state_ids: Vec<String> = before.values().map(|e| e.to_string()).collect();
            let mut roots = state_ids.clone();
            roots.push(join_id);
            let chain = q::list_auth_chain(c, &roots)?;
            let state_set: std::collections::HashSet<&String> = state_ids.iter().collect();
            let chain: Vec<String> = chain
                .into_iter()
                .filter(|e| !state_set.contains(e))
                .collect();
            let mut servers = q::list_room_servers(c, room_id.as_str(), "")?;
            if !servers.contains(&us) {
                servers.push(us);
            }
            Ok((load(&state_ids)?, load(&chain)?, servers))
        })
        .await?;
    if omit_members {
        app.metrics
            .partial_send_joins_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let mut answer = json!({
        "state": state_events,
        "auth_chain": auth_chain,
        "members_omitted": omit_members,
        "servers_in_room": servers,
    });
    if let Some(event) = vouched {
        answer["event"] = serde_json::to_value(&event)?;
    }
    json(&answer)
}

/// A restricted join naming one of our users in `join_authorised_via_users_server`, signed
/// by us once the joiner is checked again (as at `/make_join`: still in an allowed room);
/// `None` for a join that names no user of ours.
async fn countersign(
    app: &crate::App,
    room_id: &ruma::RoomId,
    raw: &RawValue,
) -> Result<Option<Box<RawValue>>> {
    let mut obj: ruma::CanonicalJsonObject = serde_json::from_str(raw.get())
        .map_err(|e| Error::bad_json(format!("The join is not an event: {e}")))?;
    let content: Value = obj
        .get("content")
        .map(serde_json::to_value)
        .transpose()?
        .unwrap_or(Value::Null);
    let Some(by) = restricted::named_authoriser(&content).map(str::to_owned) else {
        return Ok(None);
    };
    let us = app.server_name.to_string();
    if !by.ends_with(&format!(":{us}")) {
        return Ok(None);
    }
    let joiner = match obj.get("state_key") {
        Some(ruma::CanonicalJsonValue::String(s)) => s.clone(),
        _ => return Err(Error::bad_json("The join has no state key")),
    };
    let (rid, server) = (room_id.to_string(), us.clone());
    let version = app
        .store
        .read(move |c| {
            restricted::authorising_user(c, &rid, &joiner, &server)?;
            build::room_version(c, &ruma::RoomId::parse(&rid).map_err(Error::internal)?)
        })
        .await?;
    let rules = version
        .rules()
        .ok_or_else(|| Error::internal("room version without rules"))?;
    ruma::signatures::sign_event(&us, &app.local.key.pair, &mut obj, &rules.redaction)
        .map_err(|e| Error::bad_json(format!("The join cannot be signed: {e}")))?;
    Ok(Some(serde_json::value::to_raw_value(&obj)?))
}

/// # `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`
///
/// Another server invites one of our users: we check the invite, co-sign it, and keep it with
/// the stripped state it came with until the user joins (through the inviting server) or
/// declines.
pub async fn invite_v2(mut req: Req) -> Result<Response> {
    use ruma::api::federation::membership::create_invite;
    let o = origin::<create_invite::v2::Request>(&mut req, &["room_id", "event_id"]).await?;
    let app = req.state().clone();
    let r = o.req;
    if !crate::room::is_supported_version(&r.room_version) {
        let mut e = Error::new(
            400,
            "M_INCOMPATIBLE_ROOM_VERSION",
            "Unsupported room version",
        );
        e.body = Some(json!({
            "errcode": "M_INCOMPATIBLE_ROOM_VERSION",
            "error": "Unsupported room version",
            "room_version": r.room_version.as_str(),
        }));
        return Err(e);
    }
    let inc = verify_pdu(&app, &r.event, &r.room_version).await?;
    let pdu = &inc.pdu;
    let content: Value = serde_json::from_str(pdu.content.get())?;
    let invitee = pdu.state_key.clone().unwrap_or_default();
    let invitee_id = ruma::UserId::parse(invitee.as_str())
        .map_err(|_| Error::bad_json("The invite has no valid state key"))?;
    if pdu.event_id != r.event_id
        || pdu.room_id != r.room_id
        || pdu.kind.to_string() != "m.room.member"
        || content.get("membership").and_then(Value::as_str) != Some("invite")
    {
        return Err(Error::bad_json("Not an invite event for this request"));
    }
    if pdu.sender.server_name() != o.origin {
        return Err(Error::forbidden(
            "The inviter is not from the requesting server",
        ));
    }
    if invitee_id.server_name() != app.server_name {
        return Err(Error::bad_json("The invitee is not on this server"));
    }
    let rules = r
        .room_version
        .rules()
        .ok_or_else(|| Error::internal("room version without rules"))?;
    // Co-sign (the invitee's server's signature, which the auth rules of the room expect).
    let mut obj: ruma::CanonicalJsonObject = serde_json::from_str(&inc.json)?;
    ruma::signatures::sign_event(
        app.server_name.as_str(),
        &app.local.key.pair,
        &mut obj,
        &rules.redaction,
    )
    .map_err(Error::internal)?;
    let signed = receive::Incoming {
        pdu: inc.pdu.clone(),
        json: serde_json::to_string(&obj)?,
    };
    let stripped = serde_json::to_string(&r.invite_room_state)?;
    let (room, version, user) = (
        r.room_id.to_string(),
        r.room_version.to_string(),
        invitee.clone(),
    );
    let raw = RawValue::from_string(signed.json.clone())?;
    app.store
        .write(move |tx| {
            let exists = q::get_user(tx, &user)?.is_some_and(|u| !u.deactivated);
            if !exists {
                return Err(Error::not_found("No such user"));
            }
            let joined = q::get_membership(tx, &room, &user)?.as_deref() == Some("join");
            if joined {
                return Err(Error::forbidden("The user is already in the room"));
            }
            q::insert_room_if_absent(tx, &room, &version, "", tx.now_ms as i64)?;
            receive::commit_outlier(tx, &signed)?;
            let pos = tx.next_pos([crate::notify::Topic::user(user.as_str())]);
            q::upsert_remote_invite(
                tx,
                &room,
                &user,
                signed.pdu.event_id.as_str(),
                &stripped,
                pos,
            )
        })
        .await?;
    json(&json!({ "event": raw }))
}

/// # `GET /_matrix/federation/v1/make_leave/{roomId}/{userId}`
pub async fn make_leave(mut req: Req) -> Result<Response> {
    use ruma::api::federation::membership::prepare_leave_event;
    let o = origin::<prepare_leave_event::v1::Request>(&mut req, &["room_id", "user_id"]).await?;
    let (room, user) = (o.req.room_id.clone(), o.req.user_id.clone());
    template(&req, &o.origin, room, user, "leave", None).await
}

/// # `PUT /_matrix/federation/v2/send_leave/{roomId}/{eventId}`
pub async fn send_leave_v2(mut req: Req) -> Result<Response> {
    use ruma::api::federation::membership::create_leave_event;
    let o = origin::<create_leave_event::v2::Request>(&mut req, &["room_id", "event_id"]).await?;
    let app = req.state().clone();
    let r = o.req;
    let (inc, _) =
        own_membership(&app, &o.origin, &r.room_id, &r.event_id, &r.pdu, "leave").await?;
    forward_membership(&app, &o.origin, inc, "leave").await?;
    json(&json!({}))
}

/// Commits a remote server's own membership change (a leave or a knock) and queues it for
/// the room's other servers in the same write (the sending server has it already). `what`
/// names it in the refusal.
pub(super) async fn forward_membership(
    app: &crate::App,
    origin: &ruma::ServerName,
    inc: receive::Incoming,
    what: &'static str,
) -> Result<()> {
    let (us, theirs) = (app.server_name.to_string(), origin.to_string());
    app.store
        .write(move |tx| match receive::commit(tx, &inc)? {
            Ok(Outcome::Accepted(_)) => {
                let mut dests = q::list_room_servers(tx, inc.pdu.room_id.as_str(), &us)?;
                dests.retain(|d| *d != theirs);
                q::insert_outbox_pdu(tx, &dests, inc.pdu.event_id.as_str())
            }
            Ok(Outcome::Duplicate) => Ok(()),
            Ok(other) => Err(Error::forbidden(format!(
                "The {what} was not accepted: {other:?}"
            ))),
            Err(missing) => Err(Error::bad_json(format!(
                "The {what} refers to events this server does not have: {missing:?}"
            ))),
        })
        .await
}

/// A `/send_join`, `/send_leave` or `/send_knock` body, checked: for this room and event ID, signed, and the
/// requesting server's user changing their own membership to `membership`.
pub(super) async fn own_membership(
    app: &crate::App,
    origin: &ruma::ServerName,
    room_id: &ruma::RoomId,
    event_id: &ruma::EventId,
    raw: &RawValue,
    membership: &str,
) -> Result<(receive::Incoming, RoomVersionId)> {
    let (room, version) = room_of(app, raw).await?;
    if room != room_id {
        return Err(Error::bad_json("The event is for another room"));
    }
    let inc = verify_pdu(app, raw, &version).await?;
    let pdu = &inc.pdu;
    let content: Value = serde_json::from_str(pdu.content.get())?;
    if pdu.event_id != event_id
        || pdu.kind.to_string() != "m.room.member"
        || pdu.state_key.as_deref() != Some(pdu.sender.as_str())
        || content.get("membership").and_then(Value::as_str) != Some(membership)
    {
        return Err(Error::bad_json(format!(
            "Not a {membership} event for this request"
        )));
    }
    if pdu.sender.server_name() != origin {
        return Err(Error::forbidden(
            "The user is not from the requesting server",
        ));
    }
    Ok((inc, version))
}
