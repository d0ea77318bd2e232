//! `PUT /_matrix/federation/v1/send/{txnId}`: PDUs and EDUs pushed to us.

use std::collections::BTreeMap;

use ruma::{api::federation::transactions::send_transaction_message, OwnedEventId};
use serde_json::json;
use tide::Response;

use super::origin;
use crate::{
    error::{Error, Result},
    http::{json, Req},
    notify::Topic,
    ops::federation::receive_pdu,
    room::receive::Outcome,
    store::queries as q,
    App,
};

/// Spec limits for one transaction.
const MAX_PDUS: usize = 50;
const MAX_EDUS: usize = 100;

/// # `PUT /_matrix/federation/v1/send/{txnId}`
///
/// An accepted transaction is processed to its end in its own task even if the sender hangs
/// up (the sender retries with the same ID; a transaction already applied is not applied
/// again). PDUs are processed in the order given; the answer carries each one's result.
pub async fn send(mut req: Req) -> Result<Response> {
    let o = origin::<send_transaction_message::v1::Request>(&mut req, &["transaction_id"]).await?;
    let app = req.state().clone();
    let r = o.req;
    if r.origin != o.origin {
        return Err(Error::forbidden(
            "Transaction origin is not the signing server",
        ));
    }
    if r.pdus.len() > MAX_PDUS || r.edus.len() > MAX_EDUS {
        return Err(Error::too_large(format!(
            "At most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs per transaction"
        )));
    }
    let (origin, txn) = (o.origin.to_string(), r.transaction_id.to_string());
    let (o2, t2) = (origin.clone(), txn.clone());
    let seen = app
        .store
        .read(move |c| q::get_received_txn(c, &o2, &t2))
        .await?;
    if seen {
        return json(&json!({ "pdus": {} }));
    }
    let a = app.clone();
    let edus: Vec<serde_json::Value> = r
        .edus
        .iter()
        .filter_map(|e| serde_json::from_str(e.json().get()).ok())
        .collect();
    let task = app.spawner.spawn("federation-txn", async move {
        process(&a, &origin, &txn, r.pdus, edus).await
    });
    let results = task.await?;
    let pdus: BTreeMap<OwnedEventId, serde_json::Value> = results
        .into_iter()
        .map(|(id, r)| {
            let v = match r {
                Ok(()) => json!({}),
                Err(e) => json!({ "error": e }),
            };
            (id, v)
        })
        .collect();
    json(&json!({ "pdus": pdus }))
}

type PduResults = Vec<(OwnedEventId, std::result::Result<(), String>)>;

async fn process(
    app: &App,
    origin: &str,
    txn: &str,
    pdus: Vec<Box<serde_json::value::RawValue>>,
    edus: Vec<serde_json::Value>,
) -> Result<PduResults> {
    let origin_name: ruma::OwnedServerName = origin
        .try_into()
        .map_err(|_| Error::bad_json("bad origin"))?;
    let mut out = Vec::new();
    let mut retry_sticky = None;
    for raw in pdus {
        let (id, outcome) = receive_pdu(app, &origin_name, &raw).await;
        // A sticky event is never dropped silently (MSC4354): a live one we could not take
        // for a reason of ours, not a verdict on the event (a fetch failed, the store erred,
        // or the room is not known yet: our join is still being committed while the server
        // that let us in already pushes us its sticky events), makes the whole transaction
        // fail below, so the origin sends it again after its backoff. Bounded: once the
        // event is no longer sticky (an hour at most) it is answered like any other.
        if let Err(e) = &outcome {
            let ours = e.status >= 500 || e.errcode == "M_NOT_FOUND";
            if ours && crate::room::sticky::is_live_on_receipt(raw.get(), app.clock.now_ms() as i64)
            {
                retry_sticky.get_or_insert_with(|| e.message.clone());
            }
        }
        let result = match outcome {
            Ok(Outcome::Accepted(_)) | Ok(Outcome::Duplicate) | Ok(Outcome::SoftFailed) => Ok(()),
            Ok(Outcome::Rejected(reason)) => Err(reason),
            Err(e) => Err(e.message),
        };
        if let Some(id) = id {
            out.push((id, result));
        }
    }
    if let Some(why) = retry_sticky {
        // Nothing of the transaction is recorded: the retry is processed in full (the PDUs
        // taken this time are duplicates then; no EDU was applied).
        return Err(Error::new(
            503,
            "M_UNKNOWN",
            format!("A sticky event could not be processed now, retry later: {why}"),
        ));
    }
    // Typing and presence are in memory; receipts and the transaction's record are one write.
    let mut receipts = Vec::new();
    let mut to_device = Vec::new();
    let mut device_lists = Vec::new();
    for edu in &edus {
        match edu.get("edu_type").and_then(|t| t.as_str()) {
            Some("m.typing") => typing_edu(app, origin, &edu["content"]).await?,
            Some("m.receipt") => receipts.extend(receipt_rows(origin, &edu["content"])),
            Some("m.direct_to_device") => to_device.push(edu["content"].clone()),
            Some("m.device_list_update" | "m.signing_key_update") => {
                device_lists.push(edu["content"].clone())
            }
            Some("m.presence") => {
                crate::presence::receive_edu(app, origin, &edu["content"]).await?
            }
            _ => {}
        }
    }
    let ours = app.server_name.to_string();
    let (o, t, now) = (origin.to_owned(), txn.to_owned(), app.clock.now_ms());
    let origin_name = origin_name.clone();
    app.store
        .write(move |tx| {
            for r in &receipts {
                // Only for members of the room (or, while it is partial-state, users of one
                // of its servers we hold no membership of), from the sending server, if the
                // room's ACL lets that server in.
                if !crate::ops::partial::edu_sender_in_room(
                    tx,
                    &r.room_id,
                    &r.user_id,
                    &origin_name,
                )? {
                    continue;
                }
                let pos = tx.next_pos([Topic::room(r.room_id.as_str())]);
                q::upsert_receipt(
                    tx,
                    &r.room_id,
                    &r.kind,
                    &r.user_id,
                    &r.thread_id,
                    &r.event_id,
                    r.ts,
                    pos,
                )?;
            }
            for content in &to_device {
                crate::ops::e2ee::deliver_remote(tx, &o, &ours, content)?;
            }
            for content in &device_lists {
                crate::ops::e2ee::remote_device_list_changed(tx, &o, content)?;
            }
            q::insert_received_txn(tx, &o, &t, now as i64)
        })
        .await?;
    Ok(out)
}

/// How long a remote typing notification lasts without a refresh (Synapse sends one every
/// 30 s while typing continues).
const REMOTE_TYPING_MS: u64 = 30_000;

/// `m.typing`: `{room_id, user_id, typing}` for a user of the sending server who is joined
/// (or may be: `ops::partial::edu_sender_in_room`).
async fn typing_edu(app: &App, origin: &str, c: &serde_json::Value) -> Result<()> {
    let (Some(room), Some(user)) = (
        c.get("room_id").and_then(|v| v.as_str()),
        c.get("user_id").and_then(|v| v.as_str()),
    ) else {
        return Ok(());
    };
    let Ok(uid) = ruma::UserId::parse(user) else {
        return Ok(());
    };
    if uid.server_name().as_str() != origin {
        return Ok(());
    }
    let (r, u, o) = (
        room.to_owned(),
        user.to_owned(),
        uid.server_name().to_owned(),
    );
    let joined = app
        .store
        .read(move |c| crate::ops::partial::edu_sender_in_room(c, &r, &u, &o))
        .await?;
    if joined {
        let typing = c.get("typing").and_then(|v| v.as_bool()).unwrap_or(false);
        let until = typing.then(|| app.clock.now_ms() + REMOTE_TYPING_MS);
        app.typing.set(room, user, until);
    }
    Ok(())
}

struct ReceiptRow {
    room_id: String,
    kind: String,
    user_id: String,
    thread_id: String,
    event_id: String,
    ts: u64,
}

/// `m.receipt`: `{room_id: {receipt_type: {user_id: {event_ids, data: {ts, thread_id}}}}}`,
/// keeping only users of the sending server and the receipt types Hearth knows.
fn receipt_rows(origin: &str, c: &serde_json::Value) -> Vec<ReceiptRow> {
    let mut out = Vec::new();
    let Some(rooms) = c.as_object() else {
        return out;
    };
    for (room_id, kinds) in rooms {
        for (kind, users) in kinds.as_object().into_iter().flatten() {
            if kind != "m.read" {
                continue; // private receipts never leave their server
            }
            for (user_id, r) in users.as_object().into_iter().flatten() {
                let from_origin = ruma::UserId::parse(user_id.as_str())
                    .is_ok_and(|u| u.server_name().as_str() == origin);
                let event = r["event_ids"]
                    .as_array()
                    .and_then(|a| a.last())
                    .and_then(|e| e.as_str());
                if let (true, Some(event_id)) = (from_origin, event) {
                    out.push(ReceiptRow {
                        room_id: room_id.clone(),
                        kind: kind.clone(),
                        user_id: user_id.clone(),
                        thread_id: r["data"]["thread_id"].as_str().unwrap_or("").to_owned(),
                        event_id: event_id.to_owned(),
                        ts: r["data"]["ts"].as_u64().unwrap_or(0),
                    });
                }
            }
        }
    }
    out
}
