//! To-device messages: `PUT /sendToDevice/{eventType}/{txnId}` and their delivery by `/sync`.
//!
//! A message is a row for its device at a stream position (the writer's counter, announced on
//! the recipient's topic), so it reaches `/sync` in order with everything else. `/sync` sends
//! each device its messages after the `since` token's to-device mark, at most
//! [`MAX_PER_SYNC`] at a time; the messages stay stored until a later `since` acknowledges them
//! (a retry with the old `since` gets them again), then they are deleted.
//!
//! Users of other servers get theirs as one `m.direct_to_device` EDU per server, queued in the
//! same write as the local deliveries; received EDUs are delivered by
//! [`crate::ops::e2ee::deliver_remote`],
//! once per `(sender, message_id)`.

use ruma::{api::client::to_device::send_event_to_device, to_device::DeviceIdOrAllDevices};
use serde_json::{json, Value};
use tide::Response;

use super::{auth, json, ruma_req, Req};
use crate::{
    error::{Error, Result},
    notify::Topic,
    store::{e2ee as e, queries as q, Connection},
    util::random_string,
};

/// Most to-device messages in one `/sync` response (Synapse sends 100); the rest wait for the
/// next one.
pub const MAX_PER_SYNC: usize = 100;

/// # `PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}`
pub async fn send(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: send_event_to_device::v3::Request =
        ruma_req(&mut req, &["event_type", "txn_id"]).await?;
    let app = req.state().clone();
    let kind = body.event_type.to_string();
    // Every content must be a JSON object; checked before the write so nothing is stored
    // for a request that fails.
    let mut messages = Vec::new();
    for (user, devices) in &body.messages {
        for (device, content) in devices {
            let v: Value = serde_json::from_str(content.json().get())
                .map_err(|err| Error::bad_json(format!("message for {user}: {err}")))?;
            if !v.is_object() {
                return Err(Error::bad_json(format!(
                    "message for {user}: content must be an object"
                )));
            }
            messages.push((
                user.clone(),
                device.clone(),
                content.json().get().to_owned(),
            ));
        }
    }
    let (sender, sender_device, txn) = (
        who.user_id.to_string(),
        who.device_id.to_string(),
        body.txn_id.to_string(),
    );
    let ours = app.server_name.clone();
    app.store
        .write(move |tx| {
            if !e::insert_to_device_txn(tx, &sender, &sender_device, &txn)? {
                // A retry: the first request delivered them.
                return Ok(());
            }
            // Other servers' users: `{server: {user: {device: content}}}`, one EDU each.
            let mut remote: std::collections::BTreeMap<String, serde_json::Map<String, Value>> =
                Default::default();
            for (user, device, content) in &messages {
                if user.server_name() != ours {
                    let d = match device {
                        DeviceIdOrAllDevices::AllDevices => "*".to_owned(),
                        DeviceIdOrAllDevices::DeviceId(d) => d.to_string(),
                    };
                    let per_user = remote
                        .entry(user.server_name().to_string())
                        .or_default()
                        .entry(user.to_string())
                        .or_insert_with(|| json!({}));
                    per_user[d] = serde_json::from_str(content)?;
                    continue;
                }
                let devices = match device {
                    DeviceIdOrAllDevices::AllDevices => e::list_device_ids(tx, user.as_str())?,
                    DeviceIdOrAllDevices::DeviceId(d) => {
                        // Messages to devices that do not exist are dropped, as Synapse does.
                        if !e::device_exists(tx, user.as_str(), d.as_str())? {
                            continue;
                        }
                        vec![d.to_string()]
                    }
                };
                for d in devices {
                    let pos = tx.next_pos([Topic::user(user.as_str())]);
                    e::insert_to_device(tx, user.as_str(), &d, pos, &sender, &kind, content)?;
                }
            }
            for (server, messages) in remote {
                let edu = json!({
                    "edu_type": "m.direct_to_device",
                    "content": {
                        "sender": sender, "type": kind,
                        "message_id": random_string(24), "messages": messages,
                    },
                });
                q::insert_outbox_edu(tx, &[server], &edu.to_string())?;
            }
            Ok(())
        })
        .await?;
    json(&json!({}))
}

/// The to-device part of a `/sync` response: a device's messages with `after < pos <= upto`
/// (at most [`MAX_PER_SYNC`]), and the to-device mark the next token carries (`upto`, or the
/// last message sent when more are waiting).
pub fn for_sync(
    c: &Connection,
    user: &str,
    device: &str,
    after: i64,
    upto: i64,
) -> Result<(Vec<Value>, i64)> {
    let rows = e::list_to_device(c, user, device, after, upto, MAX_PER_SYNC)?;
    let mark = match rows.last() {
        Some(last) if rows.len() == MAX_PER_SYNC => last.pos,
        _ => upto,
    };
    let events = rows
        .into_iter()
        .map(|r| {
            let content: Value = serde_json::from_str(&r.content)?;
            Ok(json!({ "sender": r.sender, "type": r.kind, "content": content }))
        })
        .collect::<Result<_>>()?;
    Ok((events, mark))
}
