//! `PUT /_matrix/federation/v1/send/{txnId}`: PDUs and EDUs pushed to us.

use std::collections::BTreeMap;

use ruma::{api::federation::transactions::send_transaction_message, OwnedEventId};
use serde_json::json;
use tide::Response;

use super::origin;
use crate::{
    error::{Error, Result},
    http::{json, Req},
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
    let task = app.spawner.spawn("federation-txn", async move {
        process(&a, &origin, &txn, r.pdus).await
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
) -> Result<PduResults> {
    let origin_name: ruma::OwnedServerName = origin
        .try_into()
        .map_err(|_| Error::bad_json("bad origin"))?;
    let mut out = Vec::new();
    for raw in pdus {
        let id = event_id_of(app, &raw).await;
        let result = match receive_pdu(app, &origin_name, &raw).await {
            Ok(Outcome::Accepted(_)) | Ok(Outcome::Duplicate) | Ok(Outcome::SoftFailed) => Ok(()),
            Ok(Outcome::Rejected(reason)) => Err(reason),
            Err(e) => Err(e.message),
        };
        if let Some(id) = id {
            out.push((id, result));
        }
    }
    let (o, t, now) = (origin.to_owned(), txn.to_owned(), app.clock.now_ms());
    app.store
        .write(move |tx| q::insert_received_txn(tx, &o, &t, now as i64))
        .await?;
    Ok(out)
}

/// The event ID of a raw PDU, when it can be computed (for the per-PDU results).
async fn event_id_of(app: &App, raw: &serde_json::value::RawValue) -> Option<OwnedEventId> {
    let (_, version) = crate::ops::federation::room_of(app, raw).await.ok()?;
    crate::room::receive::parse(raw, &version)
        .ok()
        .map(|(_, id, _)| id)
}
