//! Knocking on rooms held here from other servers: `/make_knock` and `/send_knock` (room
//! versions 7+). While this server is only partially joined to the room both are refused
//! (MSC3895), as `/make_join` and `/send_join` are: its partial state cannot tell whether the
//! user may knock.

use ruma::api::federation::membership::{create_knock_event, prepare_knock_event};
use serde_json::json;
use tide::Response;

use super::{
    membership::{forward_membership, own_membership, template},
    origin,
};
use crate::{error::Result, http::Req, room::build};

/// # `GET /_matrix/federation/v1/make_knock/{roomId}/{userId}`
pub async fn make_knock(mut req: Req) -> Result<Response> {
    let o = origin::<prepare_knock_event::v1::Request>(&mut req, &["room_id", "user_id"]).await?;
    let (room, user) = (o.req.room_id.clone(), o.req.user_id.clone());
    let ver = o.req.ver.clone();
    template(&req, &o.origin, room, user, "knock", Some(ver)).await
}

/// # `PUT /_matrix/federation/v1/send_knock/{roomId}/{eventId}`
///
/// Accepts the knock (checked against the room's auth rules: the join rule must allow it),
/// sends it on to the room's other servers, and answers with the room's stripped state so
/// the knocker's client can show what it knocked on.
pub async fn send_knock(mut req: Req) -> Result<Response> {
    let o = origin::<create_knock_event::v1::Request>(&mut req, &["room_id", "event_id"]).await?;
    let app = req.state().clone();
    let r = o.req;
    let rid = r.room_id.to_string();
    app.store
        .read(move |c| crate::ops::partial::refuse_while_partial(c, &rid, "/send_knock"))
        .await?;
    let (inc, _) =
        own_membership(&app, &o.origin, &r.room_id, &r.event_id, &r.pdu, "knock").await?;
    forward_membership(&app, &o.origin, inc, "knock").await?;
    let rid = r.room_id.to_string();
    let stripped = app
        .store
        .read(move |c| build::stripped_state(c, &rid, None))
        .await?;
    super::super::json(&json!({ "knock_room_state": stripped }))
}
