//! Knocking (room versions 7+, join rule `knock`): asking to be let into a room. Locally when
//! one of our users is in the room (we hold its state); otherwise through another server,
//! `/make_knock` then `/send_knock`, keeping the stripped state it answers with for `/sync`'s
//! `knock` section. The knock is accepted by an invite, refused by a kick, and rescinded by a
//! leave (through the room's servers when we are not in it: see [`remote_knock_servers`]).

use ruma::{OwnedEventId, OwnedServerName, RoomId, ServerName, UserId};
use serde_json::Value;

use super::{
    federation::{sign_template, supported_versions, template_rules, through_any},
    rooms::{residency, set_membership, Require},
};
use crate::{
    error::{Error, Result},
    room::receive,
    store::queries as q,
    App,
};

/// Knocks on `room_id` for `user` (ours), with an optional reason: locally when we are in the
/// room, else through `via` then the room ID's server, the first that answers.
pub async fn knock(
    app: &App,
    room_id: &RoomId,
    user: &UserId,
    reason: Option<String>,
    via: Vec<OwnedServerName>,
) -> Result<()> {
    let (resident, _) = residency(app, room_id, user).await?;
    if resident {
        set_membership(app, room_id, user, user, "knock", reason, Require::Nothing).await?;
        return Ok(());
    }
    let servers = super::rooms::with_room_server(via, room_id, None);
    // A room whose join rule is not `knock` is refused by its server: 403.
    through_any(app, room_id, &servers, "knock on", |server| {
        knock_via(app, user, room_id, server, reason.as_deref())
    })
    .await?;
    Ok(())
}

/// `/make_knock`, sign, `/send_knock` through `server`, then one write: the room row, our
/// knock (an outlier: we hold none of the room's state) as `user`'s membership, and the
/// stripped state the resident answered with (shown in `/sync` as `knock_state`).
async fn knock_via(
    app: &App,
    user: &UserId,
    room_id: &RoomId,
    server: &ServerName,
    reason: Option<&str>,
) -> Result<OwnedEventId> {
    use ruma::api::federation::membership::{create_knock_event, prepare_knock_event};
    let mut mk = prepare_knock_event::v1::Request::new(room_id.to_owned(), user.to_owned());
    mk.ver = supported_versions();
    let res = app.fed.client.send(server, mk).await?;
    let version = res.room_version;
    let rules = template_rules(&version)?;
    let template = with_reason(&res.event, reason)?;
    let (id, raw) = sign_template(app, &template, user, room_id, "knock", &rules)?;
    let answer = app
        .fed
        .client
        .send(
            server,
            create_knock_event::v1::Request::new(room_id.to_owned(), id.clone(), raw.clone()),
        )
        .await?;
    let inc = receive::finish(
        serde_json::from_str(raw.get())?,
        id.clone(),
        ruma::signatures::Verified::All,
        &rules,
    )?;
    let stripped = serde_json::to_string(&answer.knock_room_state)?;
    let (r, u, v) = (room_id.to_string(), user.to_string(), version.to_string());
    app.store
        .write(move |tx| {
            q::insert_room_if_absent(tx, &r, &v, "", tx.now_ms as i64)?;
            receive::commit_outlier(tx, &inc)?;
            let pos = tx.next_pos([crate::notify::Topic::user(u.as_str())]);
            // The table of stripped state sent with a remote invite serves knocks too: it is
            // what the room looks like to a user who is not in it, until they are.
            q::upsert_remote_invite(tx, &r, &u, inc.pdu.event_id.as_str(), &stripped, pos)
        })
        .await?;
    Ok(id)
}

/// The `/make_knock` template with the client's reason in its content.
fn with_reason(
    template: &serde_json::value::RawValue,
    reason: Option<&str>,
) -> Result<Box<serde_json::value::RawValue>> {
    let Some(reason) = reason else {
        return Ok(template.to_owned());
    };
    let mut v: Value = serde_json::from_str(template.get())
        .map_err(|e| Error::bad_json(format!("knock template: {e}")))?;
    if let Some(content) = v.get_mut("content").and_then(Value::as_object_mut) {
        content.insert("reason".into(), reason.into());
    } else if let Some(o) = v.as_object_mut() {
        o.insert("content".into(), serde_json::json!({ "reason": reason }));
    }
    Ok(serde_json::value::to_raw_value(&v)?)
}

/// When `user`'s membership in `room_id` is a knock made through another server (we are not
/// in the room), the servers to rescind it through: the room ID's and those of the senders
/// of the stripped state the resident answered with (they were in the room). `None` when the
/// user has no such knock.
pub async fn remote_knock_servers(
    app: &App,
    room_id: &RoomId,
    user: &UserId,
) -> Result<Option<Vec<OwnedServerName>>> {
    let (r, u) = (room_id.to_string(), user.to_string());
    let stripped = app
        .store
        .read(move |c| {
            if q::get_membership(c, &r, &u)?.as_deref() != Some("knock") {
                return Ok(None);
            }
            q::get_invite_state(c, &r, &u)
        })
        .await?;
    let Some(stripped) = stripped else {
        return Ok(None);
    };
    let events: Vec<Value> = serde_json::from_str(&stripped).unwrap_or_default();
    let mut via: Vec<OwnedServerName> = room_id
        .server_name()
        .map(ToOwned::to_owned)
        .into_iter()
        .collect();
    for e in &events {
        if let Some(s) = e["sender"].as_str().and_then(|s| UserId::parse(s).ok()) {
            let server = s.server_name().to_owned();
            if !via.contains(&server) && server != app.server_name {
                via.push(server);
            }
        }
    }
    Ok(Some(via))
}
