//! Events served to other servers: `/event`.

use ruma::api::federation::event::get_event;
use serde_json::{json, value::RawValue};
use tide::Response;

use std::collections::HashMap;

use super::origin;
use crate::{
    error::{Error, Result},
    http::{json, Req},
    store::{
        history::{self as h, TopoKey},
        queries as q,
    },
};

/// # `GET /_matrix/federation/v1/event/{eventId}`
///
/// Served to servers that have (or had) a member in the event's room, or for a
/// `world_readable` room.
pub async fn get_event(mut req: Req) -> Result<Response> {
    let o = origin::<get_event::v1::Request>(&mut req, &["event_id"]).await?;
    let app = req.state().clone();
    let (eid, origin, name) = (o.req.event_id.to_string(), o.origin.to_string(), o.origin);
    let pdu = app
        .store
        .read(move |c| {
            let row = q::get_event(c, &eid)?.ok_or_else(|| Error::not_found("Unknown event"))?;
            let room = q::get_event_room(c, &eid)?.unwrap_or_default();
            if !q::server_may_see_room(c, &room, &origin)? {
                return Err(Error::forbidden("Your server is not in this room"));
            }
            if !crate::store::acl::server_allowed(c, &room, &name)? {
                return Err(crate::fed::acl::denied(&name));
            }
            Ok(RawValue::from_string(row.json)?)
        })
        .await?;
    json(&json!({
        "origin": app.server_name.as_str(),
        "origin_server_ts": app.clock.now_ms(),
        "pdus": [pdu],
    }))
}

/// The room's state just before `event_id` (Synapse's reading of `/state` and `/state_ids`):
/// the event's state group with its own change undone. Event IDs, and the auth chain of the
/// state.
fn state_before_event(
    c: &crate::store::Connection,
    room_id: &str,
    event_id: &str,
    origin: &str,
) -> Result<(Vec<String>, Vec<String>)> {
    let row = q::get_event(c, event_id)?.ok_or_else(|| Error::not_found("Unknown event"))?;
    if q::get_event_room(c, event_id)?.as_deref() != Some(room_id) {
        return Err(Error::not_found("The event is not in this room"));
    }
    if !q::server_may_see_room(c, room_id, origin)? {
        return Err(Error::forbidden("Your server is not in this room"));
    }
    let group = row
        .state_group
        .ok_or_else(|| Error::not_found("No state is known at that event"))?;
    let mut state = q::load_state_group(c, group)?;
    if let Some(key) = &row.state_key {
        let k = (row.kind.clone(), key.clone());
        match &row.replaces_state {
            Some(prev) => {
                state.insert(k, prev.clone());
            }
            None => {
                state.remove(&k);
            }
        }
    }
    let ids: Vec<String> = state.into_values().collect();
    let chain = q::list_auth_chain(c, &ids)?;
    Ok((ids, chain))
}

fn raw_events(c: &crate::store::Connection, ids: &[String]) -> Result<Vec<Box<RawValue>>> {
    q::get_events(c, ids)?
        .into_iter()
        .map(|r| RawValue::from_string(r.json).map_err(Error::from))
        .collect()
}

/// # `GET /_matrix/federation/v1/state_ids/{roomId}`
pub async fn state_ids(mut req: Req) -> Result<Response> {
    use ruma::api::federation::event::get_room_state_ids;
    let o = origin::<get_room_state_ids::v1::Request>(&mut req, &["room_id"]).await?;
    let app = req.state().clone();
    let (room, event, origin) = (
        o.req.room_id.to_string(),
        o.req.event_id.to_string(),
        o.origin.to_string(),
    );
    let (pdus, chain) = app
        .store
        .read(move |c| state_before_event(c, &room, &event, &origin))
        .await?;
    json(&json!({ "pdu_ids": pdus, "auth_chain_ids": chain }))
}

/// # `GET /_matrix/federation/v1/state/{roomId}`
pub async fn state(mut req: Req) -> Result<Response> {
    use ruma::api::federation::event::get_room_state;
    let o = origin::<get_room_state::v1::Request>(&mut req, &["room_id"]).await?;
    let app = req.state().clone();
    let (room, event, origin) = (
        o.req.room_id.to_string(),
        o.req.event_id.to_string(),
        o.origin.to_string(),
    );
    let (pdus, chain) = app
        .store
        .read(move |c| {
            let (ids, chain) = state_before_event(c, &room, &event, &origin)?;
            Ok((raw_events(c, &ids)?, raw_events(c, &chain)?))
        })
        .await?;
    json(&json!({ "pdus": pdus, "auth_chain": chain }))
}

/// # `GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}`
pub async fn event_auth(mut req: Req) -> Result<Response> {
    use ruma::api::federation::authorization::get_event_authorization;
    let o =
        origin::<get_event_authorization::v1::Request>(&mut req, &["room_id", "event_id"]).await?;
    let app = req.state().clone();
    let (room, event, origin) = (
        o.req.room_id.to_string(),
        o.req.event_id.to_string(),
        o.origin.to_string(),
    );
    let chain = app
        .store
        .read(move |c| {
            if q::get_event_room(c, &event)?.as_deref() != Some(room.as_str()) {
                return Err(Error::not_found("Unknown event"));
            }
            if !q::server_may_see_room(c, &room, &origin)? {
                return Err(Error::forbidden("Your server is not in this room"));
            }
            let ids = q::list_auth_chain(c, [event.as_str()])?;
            raw_events(c, &ids)
        })
        .await?;
    json(&json!({ "auth_chain": chain }))
}

/// # `POST /_matrix/federation/v1/get_missing_events/{roomId}`
pub async fn get_missing_events(mut req: Req) -> Result<Response> {
    use ruma::api::federation::event::get_missing_events;
    let o = origin::<get_missing_events::v1::Request>(&mut req, &["room_id"]).await?;
    let app = req.state().clone();
    let r = o.req;
    let origin = o.origin.to_string();
    let limit = u64::from(r.limit).min(100) as usize;
    let min_depth = u64::from(r.min_depth) as i64;
    let events = app
        .store
        .read(move |c| {
            let room = r.room_id.to_string();
            if !q::server_may_see_room(c, &room, &origin)? {
                return Err(Error::forbidden("Your server is not in this room"));
            }
            let earliest: Vec<&str> = r.earliest_events.iter().map(|e| e.as_str()).collect();
            let latest: Vec<&str> = r.latest_events.iter().map(|e| e.as_str()).collect();
            let mut rows = q::list_missing_events(c, &room, &earliest, &latest, limit)?;
            rows.retain(|row| {
                serde_json::from_str::<serde_json::Value>(&row.json)
                    .ok()
                    .and_then(|v| v.get("depth").and_then(|d| d.as_i64()))
                    .unwrap_or(0)
                    >= min_depth
            });
            // Oldest first, as Synapse sends them.
            rows.reverse();
            rows.into_iter()
                .map(|row| RawValue::from_string(row.json).map_err(Error::from))
                .collect::<Result<Vec<_>>>()
        })
        .await?;
    json(&json!({ "events": events }))
}

/// # `GET /_matrix/federation/v1/backfill/{roomId}`
///
/// Up to `limit` events reachable backwards from `v` (included), newest first by topology
/// (depth, then stream position). Each event is checked against the history visibility at
/// that point of the room for the asking server, as Synapse's `filter_events_for_server`
/// does: under `joined`/`invited` visibility, an event sent while none of its users were
/// joined (or invited) is served redacted.
pub async fn backfill(mut req: Req) -> Result<Response> {
    use ruma::api::federation::backfill::get_backfill;
    let o = origin::<get_backfill::v1::Request>(&mut req, &["room_id"]).await?;
    let app = req.state().clone();
    let r = o.req;
    let origin = o.origin.to_string();
    let limit = u64::from(r.limit).clamp(1, 100) as usize;
    let pdus = app
        .store
        .read(move |c| {
            let room = r.room_id.to_string();
            if !q::server_may_see_room(c, &room, &origin)? {
                return Err(Error::forbidden("Your server is not in this room"));
            }
            let mut from: Vec<&str> = Vec::new();
            let mut keyed: Vec<(TopoKey, q::EventRow)> = Vec::new();
            for e in &r.v {
                if let Some(key) = h::get_topo_key(c, &room, e.as_str())? {
                    from.push(e.as_str());
                    keyed.extend(q::get_event(c, e.as_str())?.map(|row| (key, row)));
                }
            }
            for row in q::list_missing_events(c, &room, &[], &from, limit)? {
                if let Some(key) = h::get_topo_key(c, &room, &row.event_id)? {
                    keyed.push((key, row));
                }
            }
            keyed.sort_by_key(|k| std::cmp::Reverse(k.0));
            keyed.dedup_by(|a, b| a.1.event_id == b.1.event_id);
            keyed.truncate(limit);
            let rules = crate::room::build::room_version(c, &r.room_id)?
                .rules()
                .ok_or_else(|| Error::internal("room version without rules"))?;
            let mut views = HashMap::new();
            keyed
                .into_iter()
                .map(|(_, row)| served_to(c, &room, &origin, row, &rules, &mut views))
                .collect::<Result<Vec<_>>>()
        })
        .await?;
    json(&json!({
        "origin": app.server_name.as_str(),
        "origin_server_ts": app.clock.now_ms(),
        "pdus": pdus,
    }))
}

/// An event as `server` may see it: whole, or redacted when the history visibility at the
/// event (the state after it; the room's current state when its state is unknown) is
/// `joined` or `invited` and none of the server's users was joined (or invited) then.
fn served_to(
    c: &crate::store::Connection,
    room_id: &str,
    server: &str,
    row: q::EventRow,
    rules: &ruma::room_version_rules::RoomVersionRules,
    views: &mut HashMap<i64, bool>,
) -> Result<Box<RawValue>> {
    let group = match row.state_group {
        Some(g) => Some(g),
        None => q::get_room_state_group(c, room_id)?,
    };
    let visible = match group {
        None => true,
        Some(g) => match views.get(&g) {
            Some(v) => *v,
            None => {
                let (hv, memberships) = h::get_server_view_in_group(c, g, server)?;
                let v = match hv.as_deref() {
                    Some("joined") => memberships.iter().any(|m| m == "join"),
                    Some("invited") => memberships.iter().any(|m| m == "join" || m == "invite"),
                    _ => true,
                };
                views.insert(g, v);
                v
            }
        },
    };
    if visible {
        return Ok(RawValue::from_string(row.json)?);
    }
    let obj: ruma::CanonicalJsonObject = serde_json::from_str(&row.json)?;
    let redacted = ruma::canonical_json::redact(obj, &rules.redaction, None)
        .map_err(|e| Error::internal(format_args!("redacting {}: {e}", row.event_id)))?;
    Ok(serde_json::value::to_raw_value(&redacted)?)
}
