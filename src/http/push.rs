//! Notifications and pushers: `GET /notifications`, `GET /pushers`, `POST /pushers/set`.
//! (Push rules themselves are account data, in `user.rs`; evaluation is `ops::push`.)

use ruma::api::client::push::{
    get_notifications, get_pushers,
    set_pusher::{self, v3::PusherAction},
    PusherKind,
};
use serde_json::{json, Value};
use tide::Response;

use super::{auth, json, ruma_req, Req};
use crate::{
    error::{Error, Result},
    notify::Topic,
    ops::push::is_read,
    room::format::{client_event, Viewer},
    store::push as sp,
};

/// The notify path every HTTP pusher's URL must have (the spec; Synapse refuses others).
const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

/// `GET /notifications`: default and largest page.
const DEFAULT_LIMIT: u64 = 50;
const MAX_LIMIT: u64 = 1000;

/// # `GET /_matrix/client/v3/notifications`
///
/// The caller's notifications newest first; `from` is the `next_token` of the previous page
/// (an event position), `only=highlight` keeps the highlighted ones.
pub async fn notifications(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: get_notifications::v3::Request = ruma_req(&mut req, &[]).await?;
    let before = match body.from.as_deref() {
        None | Some("") => i64::MAX,
        Some(t) => t
            .parse::<i64>()
            .map_err(|_| Error::invalid_param("Invalid from token"))?,
    };
    let limit = body
        .limit
        .map(u64::from)
        .unwrap_or(DEFAULT_LIMIT)
        .clamp(1, MAX_LIMIT) as usize;
    let only_highlight = body.only.as_deref() == Some("highlight");
    let now = req.state().clock.now_ms();
    let page = req
        .state()
        .store
        .read(move |c| {
            let user = who.user_id.as_str();
            let rows = sp::list_notifications(c, user, before, limit, only_highlight)?;
            let viewer = Viewer {
                user_id: user,
                device_id: who.device_id.as_str(),
            };
            let mut out = Vec::with_capacity(rows.len());
            for n in &rows {
                let receipts = sp::list_receipt_positions(c, user, &n.room_id)?;
                out.push(json!({
                    "actions": serde_json::from_str::<Value>(&n.actions)?,
                    "event": client_event(c, &n.event, Some(viewer), now, true)?,
                    "profile_tag": null,
                    "read": is_read(&receipts, &n.thread_id, n.pos),
                    "room_id": n.room_id,
                    "ts": n.ts,
                }));
            }
            // A full page may have more behind it.
            let next = (rows.len() == limit)
                .then(|| rows.last().map(|n| n.pos.to_string()))
                .flatten();
            Ok((out, next))
        })
        .await?;
    let mut v = json!({ "notifications": page.0 });
    if let Some(next) = page.1 {
        v["next_token"] = json!(next);
    }
    json(&v)
}

/// # `GET /_matrix/client/v3/pushers`
pub async fn pushers(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let _: get_pushers::v3::Request = ruma_req(&mut req, &[]).await?;
    let list = req
        .state()
        .store
        .read(move |c| sp::list_pushers(c, who.user_id.as_str()))
        .await?;
    let pushers: Vec<Value> = list
        .iter()
        .filter_map(|p| serde_json::from_str(p).ok())
        .collect();
    json(&json!({ "pushers": pushers }))
}

/// The spec's limits: `app_id` at most 64 characters, `pushkey` at most 512 bytes.
fn check_ids(app_id: &str, pushkey: &str) -> Result<()> {
    if app_id.chars().count() > 64 {
        return Err(Error::invalid_param("app_id is longer than 64 characters"));
    }
    if pushkey.len() > 512 {
        return Err(Error::invalid_param("pushkey is longer than 512 bytes"));
    }
    Ok(())
}

/// # `POST /_matrix/client/v3/pushers/set`
///
/// `kind: "http"` adds or replaces the caller's pusher for (app ID, pushkey) (and, unless
/// `append`, removes other users' pushers with the same IDs); `kind: null` removes it. The
/// pusher belongs to the caller's device: logging it out or deleting it removes the pusher. Only
/// HTTP pushers exist here (email pushers need a mail server Hearth does not have).
pub async fn set_pusher(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: set_pusher::v3::Request = ruma_req(&mut req, &[]).await?;
    let user = who.user_id.to_string();
    match body.action {
        PusherAction::Delete(ids) => {
            check_ids(&ids.app_id, &ids.pushkey)?;
            req.state()
                .store
                .write(move |tx| sp::delete_pusher(tx, &user, &ids.app_id, &ids.pushkey))
                .await?;
        }
        PusherAction::Post(post) => {
            let pusher = post.pusher;
            check_ids(&pusher.ids.app_id, &pusher.ids.pushkey)?;
            let PusherKind::Http(data) = &pusher.kind else {
                return Err(Error::invalid_param("Only http pushers are supported"));
            };
            let url = data.url.clone();
            let parsed = http_types::Url::parse(&url)
                .map_err(|_| Error::invalid_param("'url' must be an absolute http(s) URL"))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(Error::invalid_param("'url' must be an http(s) URL"));
            }
            // Synapse's rule: the path must be exactly the notify endpoint.
            if parsed.path() != NOTIFY_PATH {
                return Err(Error::invalid_param(format!(
                    "'url' must have a path of '{NOTIFY_PATH}'"
                )));
            }
            let stored = serde_json::to_string(&pusher)?;
            let append = post.append;
            let device = who.device_id.to_string();
            req.state()
                .store
                .write(move |tx| {
                    sp::upsert_pusher(
                        tx,
                        &user,
                        &pusher.ids.app_id,
                        &pusher.ids.pushkey,
                        &url,
                        &stored,
                        append,
                        tx.now_ms as i64,
                    )?;
                    // Tied to the caller's device: logging it out removes the pusher.
                    crate::store::pushfix::set_pusher_device(
                        tx,
                        &user,
                        &pusher.ids.app_id,
                        &pusher.ids.pushkey,
                        &device,
                    )?;
                    tx.wake(Topic::PushQueue);
                    Ok(())
                })
                .await?;
        }
        _ => return Err(Error::bad_json("Unknown pusher action")),
    }
    json(&json!({}))
}
