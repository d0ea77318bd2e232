//! The client format of stored events (`ClientEvent` / `ClientEventWithoutRoomID` in the
//! spec): the PDU's public fields plus `unsigned` (`age`, `transaction_id` for the sending
//! device, `prev_content`/`replaces_state` for state, `redacted_because`).

use crate::store::Connection;
use serde_json::{json, Map, Value};

use crate::{
    error::Result,
    store::queries::{self as q, EventRow},
};

/// Who is looking: `transaction_id` is shown only to the device that sent the event.
#[derive(Clone, Copy)]
pub struct Viewer<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
}

pub fn client_event(
    conn: &Connection,
    row: &EventRow,
    viewer: Option<Viewer<'_>>,
    now_ms: u64,
    with_room_id: bool,
) -> Result<Value> {
    let pdu: Value = serde_json::from_str(&row.json)?;
    let mut ev = Map::new();
    for key in [
        "content",
        "origin_server_ts",
        "sender",
        "type",
        "state_key",
        "redacts",
        super::sticky::PDU_KEY,
    ] {
        if let Some(v) = pdu.get(key) {
            ev.insert(key.into(), v.clone());
        }
    }
    if with_room_id {
        if let Some(v) = pdu.get("room_id") {
            ev.insert("room_id".into(), v.clone());
        }
    }
    ev.insert("event_id".into(), row.event_id.clone().into());
    let mut unsigned = Map::new();
    let ts = pdu
        .get("origin_server_ts")
        .and_then(Value::as_u64)
        .unwrap_or(now_ms);
    unsigned.insert("age".into(), now_ms.saturating_sub(ts).into());
    if let (Some(v), Some(dev), Some(txn)) = (viewer, &row.txn_device, &row.txn_id) {
        if v.user_id == row.sender && v.device_id == dev {
            unsigned.insert("transaction_id".into(), txn.clone().into());
        }
    }
    if let Some(prev_id) = &row.replaces_state {
        unsigned.insert("replaces_state".into(), prev_id.clone().into());
        if let Some(prev) = q::get_event(conn, prev_id)? {
            let pv: Value = serde_json::from_str(&prev.json)?;
            if let Some(c) = pv.get("content") {
                unsigned.insert("prev_content".into(), c.clone());
            }
            unsigned.insert("prev_sender".into(), prev.sender.into());
        }
    }
    if let Some(by) = &row.redacted_by {
        if let Some(red) = q::get_event(conn, by)? {
            let rv: Value = serde_json::from_str(&red.json)?;
            unsigned.insert(
                "redacted_because".into(),
                json!({ "event_id": red.event_id, "type": rv["type"], "sender": rv["sender"], "content": rv["content"],
                        "origin_server_ts": rv["origin_server_ts"], "redacts": rv.get("redacts").cloned().unwrap_or(rv["content"]["redacts"].clone()) }),
            );
        }
    }
    if pdu.get(super::sticky::PDU_KEY).is_some() {
        // Live sticky events carry the time they stay sticky; expired or redacted ones
        // (no longer in the index) do not.
        if let Some(exp) = crate::store::sticky::get_sticky_expiry(conn, &row.event_id)? {
            if let Some(ttl) = super::sticky::ttl_ms(exp, now_ms as i64) {
                unsigned.insert("msc4354_sticky_duration_ttl_ms".into(), ttl.into());
            }
        }
    }
    ev.insert("unsigned".into(), Value::Object(unsigned));
    Ok(Value::Object(ev))
}

pub fn client_events(
    conn: &Connection,
    rows: &[EventRow],
    viewer: Option<Viewer<'_>>,
    now_ms: u64,
    with_room_id: bool,
) -> Result<Vec<Value>> {
    rows.iter()
        .map(|r| client_event(conn, r, viewer, now_ms, with_room_id))
        .collect()
}
