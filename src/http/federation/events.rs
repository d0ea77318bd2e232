//! Events served to other servers: `/event`.

use ruma::api::federation::event::get_event;
use serde_json::{json, value::RawValue};
use tide::Response;

use super::origin;
use crate::{
    error::{Error, Result},
    http::{json, Req},
    store::queries as q,
};

/// # `GET /_matrix/federation/v1/event/{eventId}`
///
/// Served to servers that have (or had) a member in the event's room, or for a
/// `world_readable` room.
pub async fn get_event(mut req: Req) -> Result<Response> {
    let o = origin::<get_event::v1::Request>(&mut req, &["event_id"]).await?;
    let app = req.state().clone();
    let (eid, origin) = (o.req.event_id.to_string(), o.origin.to_string());
    let pdu = app
        .store
        .read(move |c| {
            let row = q::get_event(c, &eid)?.ok_or_else(|| Error::not_found("Unknown event"))?;
            let room = q::get_event_room(c, &eid)?.unwrap_or_default();
            if !q::server_may_see_room(c, &room, &origin)? {
                return Err(Error::forbidden("Your server is not in this room"));
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
