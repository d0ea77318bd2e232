//! Sticky events (MSC4354, unstable prefix `msc4354`): a message event whose PDU carries
//! `msc4354_sticky: {duration_ms}` stays sticky from `min(received_ts, origin_server_ts)` for
//! `min(duration_ms, 1 h)`. While sticky it reaches every member's `/sync` even outside the
//! timeline (`rooms.join.<id>.msc4354_sticky`), with `unsigned.msc4354_sticky_duration_ttl_ms`,
//! and history visibility does not hide it. Redaction ends stickiness (the key is not kept by
//! the redaction algorithm, and the index row is deleted with the redaction).

use ruma::{events::TimelineEventType, room_version_rules::RoomVersionRules, UserId};
use serde_json::Value;

use super::{
    build::{load_pdu, Lookups},
    Pdu,
};
use crate::{
    notify::Topic,
    store::{queries as q, sticky as s, Tx},
};

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

/// [`duration_ms`] of a PDU as JSON text, parsing it only when it names the key (nearly no
/// event is sticky).
pub fn json_duration_ms(json: &str) -> Option<u64> {
    if !json.contains(PDU_KEY) {
        return None;
    }
    duration_ms(&serde_json::from_str(json).ok()?)
}

/// Whether a PDU (JSON text) received at `now` is a sticky event still sticky then.
pub fn is_live_on_receipt(json: &str, now: i64) -> bool {
    let Some(d) = json_duration_ms(json) else {
        return false;
    };
    let ts = serde_json::from_str::<Value>(json)
        .ok()
        .and_then(|v| v.get("origin_server_ts").and_then(Value::as_i64))
        .unwrap_or(now);
    expires_ts(ts, now, d) > now
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
    let Some(d) = json_duration_ms(json) else {
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

/// Before a newly persisted event changes the current state: the server it brings into the
/// room, if it is the join of the first member of another server (its join is what makes
/// that server one of the room's; a profile change is a join after a join and is not).
pub fn server_joining(tx: &Tx<'_>, pdu: &Pdu) -> crate::error::Result<Option<String>> {
    if pdu.kind != TimelineEventType::RoomMember {
        return Ok(None);
    }
    let joins = serde_json::from_str::<Value>(pdu.content.get())
        .ok()
        .is_some_and(|c| c.get("membership").and_then(Value::as_str) == Some("join"));
    let Some(user) = pdu.state_key.as_deref().and_then(|k| UserId::parse(k).ok()) else {
        return Ok(None);
    };
    if !joins {
        return Ok(None);
    }
    let server = user.server_name().as_str();
    let ours = q::get_meta(tx, "server_name")?;
    // A server the room's ACL denies is sent nothing (as `list_room_servers` leaves it out).
    if ours.as_deref() == Some(server)
        || q::server_has_joined_member(tx, pdu.room_id.as_str(), server, "")?
        || !crate::store::acl::server_allowed(tx, pdu.room_id.as_str(), user.server_name())?
    {
        return Ok(None);
    }
    Ok(Some(server.to_owned()))
}

/// What a persisted event (part of the room, not soft-failed) changes for sticky events, in
/// its own write:
///
/// - a server that joined (`joining`, from [`server_joining`]) is queued every unexpired
///   sticky event of ours in the room (the MSC's MUST: a newly joined server gets them even
///   if no later event would lead it to them), skipping those already queued for it;
/// - a change of the room's state (`state_changed`: a state event, or a fork resolved) gives
///   the room's soft-failed, unexpired sticky events a second look against the new current
///   state: those that pass now join the room at a new stream position, so `/sync` delivers
///   them (in the sticky section when the timeline does not carry them).
pub fn after_persist(
    tx: &mut Tx<'_>,
    rules: &RoomVersionRules,
    room_id: &str,
    joining: Option<String>,
    state_changed: bool,
) -> crate::error::Result<()> {
    let now = tx.now_ms as i64;
    if let Some(server) = joining {
        if let Some(ours) = q::get_meta(tx, "server_name")? {
            let ids = s::list_own_live_sticky_unqueued(tx, room_id, &ours, now, &server)?;
            let dest = [server];
            for id in &ids {
                q::insert_outbox_pdu(tx, &dest, id)?;
            }
            if !ids.is_empty() {
                log::info!(
                    "sticky: {} of our sticky events in {room_id} queued for {}, which joined",
                    ids.len(),
                    dest[0]
                );
            }
        }
    }
    if state_changed {
        reevaluate_soft_failed(tx, rules, room_id, now)?;
    }
    Ok(())
}

/// Soft-failed sticky events that pass the auth rules against the room's current state now
/// stop being soft-failed (MSC4354: re-evaluated when the state changes).
fn reevaluate_soft_failed(
    tx: &mut Tx<'_>,
    rules: &RoomVersionRules,
    room_id: &str,
    now: i64,
) -> crate::error::Result<()> {
    let since = now.saturating_sub(MAX_DURATION_MS as i64);
    for ev in s::list_recent_soft_failed_sticky(tx, room_id, since)? {
        let Some(d) = json_duration_ms(&ev.json) else {
            continue;
        };
        if expires_ts(ev.origin_server_ts, ev.received_ts, d) <= now {
            continue;
        }
        let Some(pdu) = load_pdu(tx, &ev.event_id)? else {
            continue;
        };
        if !passes_current_state(tx, rules, room_id, &pdu)? {
            continue;
        }
        let pos = tx.next_pos([Topic::room(room_id)]);
        s::un_soft_fail(tx, &ev.event_id, pos)?;
        index_if_sticky(
            tx,
            &ev.json,
            &ev.event_id,
            room_id,
            pos,
            ev.origin_server_ts,
            ev.received_ts,
        )?;
        log::info!(
            "sticky: {} passes the current state of {room_id} now; no longer soft-failed",
            ev.event_id
        );
    }
    Ok(())
}

/// Commits a live sticky event whose prev events we do not hold, given the state before it
/// (from the server that sent it): as history (`room::history`: checked against its auth
/// events and that state; never a forward extremity, no change to the current state), then,
/// if it also passes the current state, indexed at a new stream position of its room so
/// `/sync` delivers it in the sticky section. Failing the current state, it is soft-failed,
/// and re-evaluated like any soft-failed sticky event when the state changes.
pub fn commit_unconnected(
    tx: &mut Tx<'_>,
    inc: &super::receive::Incoming,
    state_before: super::state::StateMap,
) -> crate::error::Result<super::receive::Outcome> {
    use super::receive::Outcome;
    let pdu = &inc.pdu;
    let (eid, rid) = (pdu.event_id.as_str(), pdu.room_id.as_str());
    if crate::store::history::is_outlier(tx, eid)? == Some(false) {
        return Ok(Outcome::Duplicate);
    }
    let states = std::collections::HashMap::from([(pdu.event_id.clone(), state_before)]);
    let accepted = super::history::commit_batch(tx, std::slice::from_ref(inc), &states)?;
    let status = s::event_status(tx, eid)?;
    let received_ts = match status {
        Some((None, received_ts)) if accepted == 1 => received_ts,
        Some((Some(reason), _)) => return Ok(Outcome::Rejected(reason)),
        _ => return Ok(Outcome::Rejected("its auth events are missing".into())),
    };
    let version = super::build::room_version(tx, &pdu.room_id)?;
    let rules = version
        .rules()
        .ok_or_else(|| crate::error::Error::internal("room version without rules"))?;
    let origin_ts = u64::from(pdu.origin_server_ts.get()) as i64;
    if !passes_current_state(tx, &rules, rid, pdu)? {
        s::set_soft_failed(tx, eid)?;
        return Ok(Outcome::SoftFailed);
    }
    let pos = tx.next_pos([Topic::room(rid)]);
    index_if_sticky(tx, &inc.json, eid, rid, pos, origin_ts, received_ts)?;
    Ok(Outcome::Accepted(pos))
}

/// Check 6 of the checks on receipt: the auth rules against the room's current state.
fn passes_current_state(
    tx: &Tx<'_>,
    rules: &RoomVersionRules,
    room_id: &str,
    pdu: &Pdu,
) -> crate::error::Result<bool> {
    let lookups = Lookups::default();
    let verdict =
        ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |t, k| {
            let id = lookups.get(q::get_current_state(tx, room_id, &t.to_string(), k))?;
            lookups.get(load_pdu(tx, &id))
        });
    lookups.finish()?;
    Ok(verdict.is_ok())
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

    #[test]
    fn live_on_receipt_counts_from_the_earlier_clock() {
        let pdu = |ts: i64, d: i64| {
            json!({ "origin_server_ts": ts, "msc4354_sticky": { "duration_ms": d } }).to_string()
        };
        assert!(is_live_on_receipt(&pdu(10_000, 5_000), 12_000));
        assert!(
            !is_live_on_receipt(&pdu(1_000, 5_000), 12_000),
            "sent long ago"
        );
        // A clock ahead of ours buys nothing: counted from our receipt.
        assert!(is_live_on_receipt(&pdu(99_000, 5_000), 17_000));
        assert!(
            !is_live_on_receipt(r#"{"origin_server_ts": 1}"#, 0),
            "not sticky"
        );
        assert_eq!(json_duration_ms(&pdu(0, 7)), Some(7));
        assert_eq!(json_duration_ms("not json msc4354_sticky"), None);
    }
}
