//! Event use cases: a client's message, state event or redaction, sent in one write that also
//! records its transaction ID.

use ruma::{events::TimelineEventType, OwnedEventId, OwnedRoomId, RoomVersionId, UserId};
use serde_json::{json, Value};

use crate::{
    error::{Error, Result},
    room::build::{self, NewEvent, TxnRef},
    store::{queries as q, Connection},
    App,
};

/// Sends one event (message or state) from a client, deduplicated by transaction ID. Every
/// check (membership, the aliases of `m.room.canonical_alias`) runs in the write closure that
/// sends the event.
pub async fn send_event(
    app: &App,
    user: &UserId,
    device: &str,
    room_id: OwnedRoomId,
    new: NewEvent,
    txn_id: Option<String>,
) -> Result<String> {
    let local = app.local.clone();
    let (uid, dev) = (user.to_owned(), device.to_owned());
    app.store
        .write(move |tx| {
            if let Some(t) = &txn_id {
                if let Some(existing) = q::get_txn(tx, uid.as_str(), &dev, t)? {
                    return Ok(existing);
                }
            }
            if q::get_membership(tx, room_id.as_str(), uid.as_str())?.as_deref() != Some("join")
                && new.kind != TimelineEventType::RoomMember
            {
                if q::get_room_version(tx, room_id.as_str())?.is_none() {
                    return Err(Error::not_found("Unknown room"));
                }
                return Err(Error::forbidden("You are not joined to this room"));
            }
            if new.kind == TimelineEventType::RoomCanonicalAlias && new.state_key.is_some() {
                check_canonical_alias(tx, &room_id, &new.content)?;
            }
            let txn = txn_id.as_deref().map(|t| TxnRef {
                device_id: &dev,
                txn_id: t,
            });
            Ok(build::send(tx, &local, &room_id, &uid, new, txn)?
                .event_id
                .to_string())
        })
        .await
}

/// Redacts `event_id` (the `redacts` key sits in the content from room version 11 on, at the
/// top level before), deduplicated by transaction ID like any send.
pub async fn redact(
    app: &App,
    user: &UserId,
    device: &str,
    room_id: OwnedRoomId,
    event_id: OwnedEventId,
    reason: Option<String>,
    txn_id: String,
) -> Result<String> {
    let rid = room_id.to_string();
    // The room version never changes, so reading it before the write is not a race.
    let version = app
        .store
        .read(move |c| q::get_room_version(c, &rid))
        .await?
        .ok_or_else(|| Error::not_found("Unknown room"))?;
    let mut content = json!({});
    if let Some(r) = reason {
        content["reason"] = r.into();
    }
    let v11 =
        RoomVersionId::try_from(version.as_str()).is_ok_and(|v| matches!(v, RoomVersionId::V11));
    if v11 {
        content["redacts"] = event_id.as_str().into();
    }
    let new = NewEvent {
        kind: TimelineEventType::RoomRedaction,
        state_key: None,
        content,
        redacts: (!v11).then_some(event_id),
        sticky_ms: None,
    };
    send_event(app, user, device, room_id, new, Some(txn_id)).await
}

/// Aliases named in `m.room.canonical_alias` must exist and point at this room (`M_BAD_ALIAS`).
fn check_canonical_alias(conn: &Connection, room_id: &OwnedRoomId, content: &Value) -> Result<()> {
    let mut aliases: Vec<&str> = Vec::new();
    if let Some(a) = content.get("alias").and_then(Value::as_str) {
        aliases.push(a);
    }
    if let Some(list) = content.get("alt_aliases").and_then(Value::as_array) {
        aliases.extend(list.iter().filter_map(Value::as_str));
    }
    for a in aliases {
        match q::get_alias(conn, a)? {
            Some((r, _)) if r == room_id.as_str() => {}
            _ => {
                return Err(Error::new(
                    400,
                    "M_BAD_ALIAS",
                    format!("Alias {a} does not point to this room"),
                ))
            }
        }
    }
    Ok(())
}
