//! `/presence/{userId}/status`: a user's presence, set by themselves, read by those who share
//! a room with them (see `crate::presence`).

use ruma::api::client::presence::{get_presence, set_presence};
use serde_json::json;
use tide::Response;

use super::{auth, json, known_body, ruma_req, Req};
use crate::error::{Error, Result};

/// # `PUT /_matrix/client/v3/presence/{userId}/status`
///
/// Only in memory (the presence worker persists it in its next batch): setting presence is
/// frequent and cheap. With presence disabled it is accepted and dropped, as Synapse does.
pub async fn put_status(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: set_presence::v3::Request = ruma_req(&mut req, &["user_id"]).await?;
    if body.user_id != who.user_id {
        return Err(Error::forbidden("You may only set your own presence"));
    }
    known_body(
        "presence",
        body.presence.as_str(),
        &["online", "offline", "unavailable"],
    )?;
    let app = req.state();
    app.presence.set(
        body.user_id.as_str(),
        who.device_id.as_str(),
        body.presence,
        body.status_msg,
    );
    json(&json!({}))
}

/// # `GET /_matrix/client/v3/presence/{userId}/status`
///
/// Yourself, or a user sharing a room with you (Synapse's `is_visible`); anyone else is
/// `M_FORBIDDEN`. A user we know nothing about is offline. With presence disabled everyone is
/// offline (Synapse answers `{"presence": "offline"}` then too).
pub async fn get_status(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: get_presence::v3::Request = ruma_req(&mut req, &["user_id"]).await?;
    let app = req.state().clone();
    if !app.presence.enabled() {
        return json(&json!({ "presence": "offline" }));
    }
    if body.user_id != who.user_id {
        let (me, them) = (who.user_id.to_string(), body.user_id.to_string());
        let visible = app
            .store
            .read(move |c| crate::store::presence::share_a_room(c, &me, &them))
            .await?;
        if !visible {
            return Err(Error::forbidden(
                "You are not allowed to see their presence",
            ));
        }
    }
    let now = app.clock.now_ms();
    app.presence.tick(now);
    json(&app.presence.get(body.user_id.as_str()).content(now))
}
