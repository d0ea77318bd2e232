//! Room use cases: creating a room, and membership changes (join, leave, invite, kick, ban,
//! unban) whether the room lives here or on another server. The client handlers parse and
//! answer; the decisions and the one write per operation are here.

use ruma::{
    OwnedRoomAliasId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, RoomVersionId, UserId,
};
use serde_json::{json, Value};

use super::federation;
use crate::{
    error::{Error, Result},
    room::{
        build::{self, NewEvent},
        restricted,
    },
    store::{queries as q, Tx},
    util::random_string,
    App,
};

/// A room to create, as `/createRoom` asked for it (validated by the handler).
pub struct NewRoom {
    pub version: RoomVersionId,
    pub alias: Option<OwnedRoomAliasId>,
    /// Listed in the public room directory.
    pub public: bool,
    /// `private_chat`, `public_chat` or `trusted_private_chat`.
    pub preset: String,
    /// `creation_content` (an object).
    pub creation: Value,
    pub power_levels_override: Option<Value>,
    pub initial_state: Vec<NewEvent>,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
}

/// The default power levels of a new room (Synapse's, which clients expect), before the
/// preset and `power_level_content_override`.
fn default_power_levels(creator: &UserId, trusted_invitees: &[OwnedUserId]) -> Value {
    let mut users = serde_json::Map::new();
    users.insert(creator.to_string(), 100.into());
    for u in trusted_invitees {
        users.insert(u.to_string(), 100.into());
    }
    json!({
        "users": users, "users_default": 0,
        "events": {
            "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
            "m.room.server_acl": 100, "m.room.encryption": 100
        },
        "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50, "invite": 0,
        "notifications": { "room": 50 }
    })
}

/// Creates a room: the room row, its alias and every initial event (create, the creator's
/// join, power levels, alias, join rules, history visibility, guest access, `initial_state`,
/// name, topic, local invites) in one write. Users of other servers are invited after it, over
/// federation (their servers co-sign the invites).
pub async fn create_room(app: &App, creator: &UserId, room: NewRoom) -> Result<OwnedRoomId> {
    let remote_invitees: Vec<OwnedUserId> = room
        .invite
        .iter()
        .filter(|u| u.server_name() != app.server_name)
        .cloned()
        .collect();
    let room_id = OwnedRoomId::try_from(format!("!{}:{}", random_string(18), app.server_name))
        .map_err(Error::internal)?;
    let local = app.local.clone();
    let creator_id = creator.to_owned();
    let (rid, creator) = (room_id.clone(), creator.to_owned());
    app.store
        .write(move |tx| {
            q::insert_room(
                tx,
                rid.as_str(),
                room.version.as_str(),
                creator.as_str(),
                room.public,
                tx.now_ms as i64,
            )?;
            let send =
                |tx: &mut Tx<'_>, ev: NewEvent| build::send(tx, &local, &rid, &creator, ev, None);
            let mut creation = room.creation;
            let obj = creation
                .as_object_mut()
                .ok_or_else(|| Error::bad_json("creation_content must be an object"))?;
            obj.insert("room_version".into(), room.version.as_str().into());
            if !matches!(room.version, RoomVersionId::V11) {
                obj.insert("creator".into(), creator.as_str().into());
            } else {
                obj.remove("creator");
            }
            send(tx, NewEvent::state("m.room.create", "", creation))?;
            send(
                tx,
                NewEvent::state("m.room.member", "", json!({}))
                    .with_key(creator.as_str())
                    .with_content(join_content(tx, &creator)?),
            )?;
            let trusted: Vec<OwnedUserId> = if room.preset == "trusted_private_chat" {
                room.invite.clone()
            } else {
                Vec::new()
            };
            let mut pl = default_power_levels(&creator, &trusted);
            if let (Some(Value::Object(o)), Value::Object(base)) =
                (room.power_levels_override, &mut pl)
            {
                for (k, v) in o {
                    base.insert(k, v);
                }
            }
            send(tx, NewEvent::state("m.room.power_levels", "", pl))?;
            if let Some(a) = &room.alias {
                if !q::insert_alias(tx, a.as_str(), rid.as_str(), creator.as_str())? {
                    return Err(Error::room_in_use("Room alias already taken"));
                }
                send(
                    tx,
                    NewEvent::state("m.room.canonical_alias", "", json!({ "alias": a })),
                )?;
            }
            let join_rule = if room.preset == "public_chat" {
                "public"
            } else {
                "invite"
            };
            send(
                tx,
                NewEvent::state("m.room.join_rules", "", json!({ "join_rule": join_rule })),
            )?;
            send(
                tx,
                NewEvent::state(
                    "m.room.history_visibility",
                    "",
                    json!({ "history_visibility": "shared" }),
                ),
            )?;
            let guest = if room.preset == "public_chat" {
                "forbidden"
            } else {
                "can_join"
            };
            send(
                tx,
                NewEvent::state("m.room.guest_access", "", json!({ "guest_access": guest })),
            )?;
            for ev in room.initial_state {
                send(tx, ev)?;
            }
            if let Some(name) = &room.name {
                send(
                    tx,
                    NewEvent::state("m.room.name", "", json!({ "name": name })),
                )?;
            }
            if let Some(topic) = &room.topic {
                send(
                    tx,
                    NewEvent::state("m.room.topic", "", json!({ "topic": topic })),
                )?;
            }
            for invitee in room
                .invite
                .iter()
                .filter(|u| u.server_name() == local.server_name)
            {
                if q::get_user(tx, invitee.as_str())?.is_none() {
                    return Err(Error::not_found(format!("Unknown user {invitee}")));
                }
                let mut content = json!({ "membership": "invite" });
                if room.is_direct {
                    content["is_direct"] = true.into();
                }
                send(
                    tx,
                    NewEvent::state("m.room.member", invitee.as_str(), content),
                )?;
            }
            Ok(())
        })
        .await?;
    // The room exists now whatever happens to these: a failed remote invite is logged, not
    // turned into a failed createRoom (the client would retry and create a second room).
    for invitee in remote_invitees {
        let room: OwnedRoomId = room_id.clone();
        if let Err(e) =
            super::federation::invite_remote(app, &creator_id, &room, &invitee, None).await
        {
            log::warn!(
                "createRoom {room}: inviting {invitee} failed: {}",
                e.message
            );
        }
    }
    Ok(room_id)
}

impl NewEvent {
    fn with_key(mut self, key: &str) -> Self {
        self.state_key = Some(key.to_owned());
        self
    }
    fn with_content(mut self, content: Value) -> Self {
        self.content = content;
        self
    }
}

/// `{membership: join}` with the user's profile, as clients expect on member events.
pub(super) fn join_content(conn: &crate::store::Connection, user_id: &UserId) -> Result<Value> {
    let mut c = json!({ "membership": "join" });
    if let Some(u) = q::get_user(conn, user_id.as_str())? {
        if let Some(d) = u.displayname {
            c["displayname"] = d.into();
        }
        if let Some(a) = u.avatar_url {
            c["avatar_url"] = a.into();
        }
    }
    Ok(c)
}

/// What the target's membership must be for a membership change (checked in the same write
/// closure that sends the event, so nothing can change it in between).
#[derive(Clone, Copy)]
pub enum Require {
    Nothing,
    /// Kick: the target is in the room (joined, invited or knocking).
    InRoom,
    /// Unban: the target is banned.
    Banned,
}

/// Sends a membership event for `target` by `sender` (one write, authorised by the rules).
pub async fn set_membership(
    app: &App,
    room_id: &RoomId,
    sender: &UserId,
    target: &UserId,
    membership: &str,
    reason: Option<String>,
    require: Require,
) -> Result<String> {
    let local = app.local.clone();
    let (rid, s, t, m) = (
        room_id.to_owned(),
        sender.to_owned(),
        target.to_owned(),
        membership.to_owned(),
    );
    app.store
        .write(move |tx| {
            if q::get_room_version(tx, rid.as_str())?.is_none() {
                return Err(Error::not_found(
                    "Unknown room (joining rooms on other servers needs federation)",
                ));
            }
            let current = q::get_membership(tx, rid.as_str(), t.as_str())?;
            match require {
                Require::Nothing => {}
                Require::InRoom => {
                    if !matches!(current.as_deref(), Some("join" | "invite" | "knock")) {
                        return Err(Error::forbidden("The user is not in the room"));
                    }
                }
                Require::Banned => {
                    if current.as_deref() != Some("ban") {
                        return Err(Error::forbidden("The user is not banned"));
                    }
                }
            }
            let mut content = if m == "join" {
                let mut c = join_content(tx, &t)?;
                // A restricted room lets a member of an allowed room in, vouched for by one
                // of our users who may invite (our own event: no other signature needed).
                let us = local.server_name.as_str();
                if let Some(by) = restricted::authorising_user(tx, rid.as_str(), t.as_str(), us)? {
                    c["join_authorised_via_users_server"] = by.into();
                }
                c
            } else {
                json!({ "membership": m })
            };
            if let Some(r) = reason {
                content["reason"] = r.into();
            }
            if m == "invite"
                && t.server_name() == s.server_name()
                && q::get_user(tx, t.as_str())?.is_none()
            {
                return Err(Error::not_found("Unknown user"));
            }
            let p = build::send(
                tx,
                &local,
                &rid,
                &s,
                NewEvent::state("m.room.member", t.as_str(), content),
                None,
            )?;
            if m == "join" {
                q::delete_forgotten_room(tx, t.as_str(), rid.as_str())?;
            }
            Ok(p.event_id.to_string())
        })
        .await
}

/// Joins locally when one of our users is in the room (we hold its state); otherwise through
/// another server: those the client named, the room ID's server, and the inviter's server of
/// a pending invite. A local room nobody is in any more has nobody to join through: 404.
pub async fn join(
    app: &App,
    room_id: &RoomId,
    user: &UserId,
    reason: Option<String>,
    via: Vec<OwnedServerName>,
) -> Result<()> {
    let (resident, inviter_server) = residency(app, room_id, user).await?;
    if resident {
        set_membership(app, room_id, user, user, "join", reason, Require::Nothing).await?;
        return Ok(());
    }
    let servers = with_room_server(via, room_id, inviter_server);
    federation::join_remote(app, user, room_id, &servers).await?;
    Ok(())
}

/// The servers to reach a room through: those the client named, then the room ID's server
/// and `extra` (an inviter's), each once.
pub(super) fn with_room_server(
    mut servers: Vec<OwnedServerName>,
    room_id: &RoomId,
    extra: Option<OwnedServerName>,
) -> Vec<OwnedServerName> {
    servers.extend(room_id.server_name().map(ToOwned::to_owned));
    servers.extend(extra);
    let mut seen = std::collections::HashSet::new();
    servers.retain(|s| seen.insert(s.clone()));
    servers
}

/// Leaves a room, or declines an invite to a room this server is not in (through the room's
/// servers: the inviter's and the room ID's).
pub async fn leave(
    app: &App,
    user: &UserId,
    room_id: &RoomId,
    reason: Option<String>,
) -> Result<()> {
    let (resident, inviter_server) = residency(app, room_id, user).await?;
    // A knock on a room this server is not in is rescinded through the room's servers.
    if !resident && inviter_server.is_none() {
        if let Some(via) = super::knock::remote_knock_servers(app, room_id, user).await? {
            return federation::leave_remote(app, user, room_id, &via).await;
        }
    }
    if !resident && inviter_server.is_some() {
        let mut via: Vec<OwnedServerName> = inviter_server.into_iter().collect();
        via.extend(room_id.server_name().map(ToOwned::to_owned));
        return federation::leave_remote(app, user, room_id, &via).await;
    }
    set_membership(app, room_id, user, user, "leave", reason, Require::Nothing).await?;
    Ok(())
}

/// Invites a user: a local one in one write; a remote one through their server, which
/// co-signs the invite.
pub async fn invite(
    app: &App,
    inviter: &UserId,
    room_id: &RoomId,
    invitee: &UserId,
    reason: Option<String>,
) -> Result<()> {
    if invitee.server_name() != app.server_name {
        federation::invite_remote(app, inviter, room_id, invitee, reason).await?;
        return Ok(());
    }
    set_membership(
        app,
        room_id,
        inviter,
        invitee,
        "invite",
        reason,
        Require::Nothing,
    )
    .await?;
    Ok(())
}

/// Whether one of our users is joined to the room (we hold its state), and the server of
/// whoever sent `user`'s current membership event (an inviter), if that is another server.
pub(super) async fn residency(
    app: &App,
    room_id: &RoomId,
    user: &UserId,
) -> Result<(bool, Option<OwnedServerName>)> {
    let (r, u, us) = (
        room_id.to_string(),
        user.to_string(),
        app.server_name.to_string(),
    );
    app.store
        .read(move |c| {
            let resident = q::get_room_version(c, &r)?.is_some()
                && q::server_has_joined_member(c, &r, &us, "")?;
            let inviter = match q::get_current_state(c, &r, "m.room.member", &u)? {
                Some(id) => q::get_event(c, &id)?.and_then(|row| {
                    UserId::parse(row.sender.as_str())
                        .ok()
                        .map(|s| s.server_name().to_owned())
                        .filter(|s| s.as_str() != us)
                }),
                None => None,
            };
            Ok((resident, inviter))
        })
        .await
}
