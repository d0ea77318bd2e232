//! `/_matrix/federation/v1/hierarchy/{roomId}`: a room (and the space children this server
//! holds) as another server may see it, for room summaries and space browsing elsewhere.

use ruma::{
    api::federation::space::{get_hierarchy::v1 as hierarchy, SpaceHierarchyParentSummary},
    events::space::child::HierarchySpaceChildEvent,
    room::RoomSummary,
    serde::Raw,
    OwnedRoomId,
};
use serde_json::{json, Value};
use tide::Response;

use super::origin;
use crate::{
    error::{Error, Result},
    http::{json, summary::summary_for_server, Req},
    store::{queries as q, Connection},
};

/// # `GET /_matrix/federation/v1/hierarchy/{roomId}`
///
/// The room's summary with its `m.space.child` state (children with a non-empty `via`), the
/// summaries of the children this server holds and the origin may see, and the IDs of those
/// it holds but the origin may not (`inaccessible_children`); children it does not hold are
/// left to the servers named in their `via`. 404 when the room is unknown or hidden from the
/// origin, as Synapse answers.
pub async fn hierarchy(mut req: Req) -> Result<Response> {
    let o = origin::<hierarchy::Request>(&mut req, &["room_id"]).await?;
    let app = req.state().clone();
    let (room, server, suggested_only) = (
        o.req.room_id.to_string(),
        o.origin.to_string(),
        o.req.suggested_only,
    );
    let answer = app
        .store
        .read(move |c| answer(c, &room, &server, suggested_only))
        .await?;
    json(&answer)
}

fn answer(c: &Connection, room: &str, server: &str, suggested_only: bool) -> Result<Value> {
    let summary = summary_for_server(c, room, server)?
        .ok_or_else(|| Error::not_found("Room not found or not visible"))?;
    let mut children_state = Vec::new();
    let (mut children, mut inaccessible) = (Vec::<RoomSummary>::new(), Vec::<OwnedRoomId>::new());
    for (kind, child, event_id, _) in q::list_current_state(c, room)? {
        if kind != "m.space.child" {
            continue;
        }
        let Some(ev) = q::get_event(c, &event_id)? else {
            continue;
        };
        let ev: Value = serde_json::from_str(&ev.json).map_err(Error::internal)?;
        let content = &ev["content"];
        // A child without `via` has been removed from the space.
        if content["via"].as_array().is_none_or(|v| v.is_empty()) {
            continue;
        }
        let stripped = json!({
            "type": kind, "state_key": child, "content": content,
            "sender": ev["sender"], "origin_server_ts": ev["origin_server_ts"],
        });
        children_state.push(typed::<Raw<HierarchySpaceChildEvent>>(stripped)?);
        if suggested_only && content["suggested"] != true {
            continue;
        }
        match summary_for_server(c, &child, server)? {
            Some(s) => children.push(typed(s)?),
            None if q::get_room_version(c, &child)?.is_some() => {
                if let Ok(id) = OwnedRoomId::try_from(child) {
                    inaccessible.push(id);
                }
            }
            None => {}
        }
    }
    let room = SpaceHierarchyParentSummary::new(typed(summary)?, children_state);
    Ok(json!({ "room": room, "children": children, "inaccessible_children": inaccessible }))
}

/// What we built, checked against ruma's type for the answer's part.
fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(Error::internal)
}
