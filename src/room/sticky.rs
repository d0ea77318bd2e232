//! Sticky events (MSC4354, unstable prefix `msc4354`): a message event whose PDU carries
//! `msc4354_sticky: {duration_ms}` stays sticky from `min(received_ts, origin_server_ts)` for
//! `min(duration_ms, 1 h)`. While sticky it reaches every member's `/sync` even outside the
//! timeline (`rooms.join.<id>.msc4354_sticky`), with `unsigned.msc4354_sticky_duration_ttl_ms`,
//! and history visibility does not hide it. Redaction ends stickiness (the key is not kept by
//! the redaction algorithm, and the index row is deleted with the redaction).

use serde_json::Value;

use crate::store::{sticky as s, Tx};

/// The longest a sticky event stays sticky, whatever its PDU asks for.
pub const MAX_DURATION_MS: u64 = 3_600_000;

/// The PDU key.
pub const PDU_KEY: &str = "msc4354_sticky";

/// The duration a PDU asks for (`msc4354_sticky.duration_ms`, a non-negative integer), if it
/// is sticky. Values above an hour are clamped (a remote server may send them; our clients
/// cannot: ruma's query type refuses them with `M_INVALID_PARAM`).
pub fn duration_ms(pdu: &Value) -> Option<u64> {
    pdu.get(PDU_KEY)?
        .get("duration_ms")?
        .as_u64()
        .map(|d| d.min(MAX_DURATION_MS))
}

/// When a sticky event stops being sticky.
pub fn expires_ts(origin_server_ts: i64, received_ts: i64, duration_ms: u64) -> i64 {
    origin_server_ts
        .min(received_ts)
        .saturating_add(duration_ms as i64)
}

/// The time left, for `unsigned.msc4354_sticky_duration_ttl_ms`: `None` once expired.
pub fn ttl_ms(expires_ts: i64, now: i64) -> Option<i64> {
    (expires_ts > now).then(|| expires_ts - now)
}

/// Indexes a newly persisted event if it is sticky (in the event's own write) and wakes the
/// expiry worker when it became the earliest expiry.
pub fn index_if_sticky(
    tx: &mut Tx<'_>,
    json: &str,
    event_id: &str,
    room_id: &str,
    pos: i64,
    origin_server_ts: i64,
    received_ts: i64,
) -> crate::error::Result<()> {
    // Cheap test first: nearly no event is sticky.
    if !json.contains(PDU_KEY) {
        return Ok(());
    }
    let v: Value = serde_json::from_str(json)?;
    let Some(d) = duration_ms(&v) else {
        return Ok(());
    };
    let expires = expires_ts(origin_server_ts, received_ts, d);
    if expires <= received_ts {
        return Ok(()); // never sticky at all (or already over when it reached us)
    }
    let earlier = s::next_sticky_expiry(tx)?.is_none_or(|e| expires < e);
    s::insert_sticky(
        tx,
        &s::StickyRow {
            event_id: event_id.to_owned(),
            room_id: room_id.to_owned(),
            pos,
            expires_ts: expires,
        },
    )?;
    if earlier {
        tx.wake(crate::notify::Topic::StickyExpiry);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn duration_expiry_and_ttl() {
        assert_eq!(
            duration_ms(&json!({ "msc4354_sticky": { "duration_ms": 5000 } })),
            Some(5000)
        );
        assert_eq!(
            duration_ms(&json!({ "msc4354_sticky": { "duration_ms": 99_999_999 } })),
            Some(MAX_DURATION_MS),
            "clamped to an hour"
        );
        assert_eq!(
            duration_ms(&json!({ "msc4354_sticky": { "duration_ms": -1 } })),
            None
        );
        assert_eq!(
            duration_ms(&json!({ "msc4354_sticky": { "duration_ms": "5" } })),
            None
        );
        assert_eq!(duration_ms(&json!({ "content": {} })), None);
        // The start is the earlier of the two clocks: a sender's clock in the future does not
        // extend stickiness.
        assert_eq!(expires_ts(1_000, 900, 100), 1_000);
        assert_eq!(expires_ts(800, 900, 100), 900);
        assert_eq!(ttl_ms(1_000, 400), Some(600));
        assert_eq!(ttl_ms(1_000, 1_000), None);
    }
}
