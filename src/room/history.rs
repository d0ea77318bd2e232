//! Backfilled events: history older than what we hold, fetched from another server.
//!
//! They pass the same checks on receipt as live events (format, signatures and hashes in the
//! gather; auth against their own auth events; auth against the state before them when that
//! state is known), but they are *historical*: they never become forward extremities, never
//! change the current state and are not soft-failed against it (Synapse skips that check for
//! backfill too), and they take negative stream positions (`store::history`), so `/sync`
//! never sends them as new while `/messages` finds them by topology.

use std::collections::HashMap;

use ruma::{events::StateEventType, OwnedEventId};

use super::{
    build::StateAt,
    receive::{check_auth_events, check_state_before, load_auth_events, reject, Incoming, Outcome},
    state,
};
use crate::{
    error::{Error, Result},
    store::{history as h, queries as q, Tx},
};

/// Commits a batch of backfilled events, oldest first (by depth), in one write. Returns how
/// many became part of the room's history. An event whose auth events are still missing is
/// skipped (the gather fetched what it could).
///
/// `states` holds the state before events whose prev events we do not hold, as the other
/// server told it (`/state_ids`).
pub fn commit_batch(
    tx: &mut Tx<'_>,
    batch: &[Incoming],
    states: &HashMap<OwnedEventId, state::StateMap>,
) -> Result<usize> {
    // Positions below everything held, rising with the batch's topological order, so that
    // "the last event at or before a position" stays meaningful among backfilled events.
    let floor = h::get_backfill_floor(tx)?;
    let n = batch.len() as i64;
    let mut accepted = 0;
    for (i, inc) in batch.iter().enumerate() {
        let pos = floor - n + i as i64;
        if commit_historical(tx, inc, pos, states)? == Some(Outcome::Accepted(pos)) {
            accepted += 1;
        }
    }
    Ok(accepted)
}

/// One backfilled event at position `pos`. `None` when its auth events are missing.
fn commit_historical(
    tx: &mut Tx<'_>,
    inc: &Incoming,
    pos: i64,
    states: &HashMap<OwnedEventId, state::StateMap>,
) -> Result<Option<Outcome>> {
    let pdu = &inc.pdu;
    let eid = pdu.event_id.as_str();
    let was_outlier = match h::is_outlier(tx, eid)? {
        Some(false) => return Ok(Some(Outcome::Duplicate)),
        Some(true) => true,
        None => false,
    };
    let version = super::build::room_version(tx, &pdu.room_id)?;
    let rules = version
        .rules()
        .ok_or_else(|| Error::internal("room version without rules"))?;
    let (auth_pdus, missing) = load_auth_events(tx, pdu)?;
    if !missing.is_empty() {
        log::info!("backfill: {eid} lacks auth events {missing:?}; left out");
        return Ok(None);
    }
    if let Some(reason) = check_auth_events(tx, &rules, pdu, auth_pdus)? {
        if was_outlier {
            // Stays an outlier: it is held already and never shown as part of the room.
            return Ok(Some(Outcome::Rejected(reason)));
        }
        return reject(tx, inc, reason).map(|r| r.ok());
    }
    // The state before it: from its prev events when each is held with its state (the
    // batch is committed oldest first, so a run of history builds on itself), else the state
    // the gather asked the other server for (`/state_ids`). Without either, the event is kept
    // with its own auth checked and no state of its own.
    let mut prev_groups = Vec::new();
    for p in &pdu.prev_events {
        prev_groups.push(q::get_event(tx, p.as_str())?.and_then(|r| r.state_group));
    }
    let before = if pdu.prev_events.is_empty() {
        // The create event: nothing before it (its auth is the state-independent rules).
        None
    } else if prev_groups.iter().all(Option::is_some) {
        Some((
            state::state_before(tx, &rules, &pdu.prev_events)?,
            prev_groups[0],
        ))
    } else {
        states.get(&pdu.event_id).map(|m| (m.clone(), None))
    };
    let known = before.is_some() || pdu.prev_events.is_empty();
    let mut after = state::StateMap::new();
    let mut base = None;
    if let Some((before, b)) = before {
        let state_at = StateAt::Resolved { before, base: b };
        if let Some(reason) = check_state_before(tx, &rules, pdu, &state_at)? {
            if was_outlier {
                return Ok(Some(Outcome::Rejected(reason)));
            }
            return reject(tx, inc, reason).map(|r| r.ok());
        }
        if let StateAt::Resolved { before, .. } = state_at {
            after = before;
        }
        base = b;
    }
    let replaces = pdu.state_key.as_ref().and_then(|key| {
        after
            .insert(
                (StateEventType::from(pdu.kind.to_string()), key.clone()),
                pdu.event_id.clone(),
            )
            .map(|e| e.to_string())
    });
    let group = if known {
        Some(state::insert_group_against(
            tx,
            pdu.room_id.as_str(),
            base,
            &after,
        )?)
    } else {
        None
    };
    if was_outlier {
        h::promote_outlier(tx, eid, pos, group, replaces.as_deref())?;
    } else {
        let kind = pdu.kind.to_string();
        let prevs: Vec<&str> = pdu.prev_events.iter().map(|e| e.as_str()).collect();
        let auths: Vec<&str> = pdu.auth_events.iter().map(|e| e.as_str()).collect();
        q::insert_event(
            tx,
            &q::NewEventRow {
                pos,
                event_id: eid,
                room_id: pdu.room_id.as_str(),
                kind: &kind,
                state_key: pdu.state_key.as_deref(),
                sender: pdu.sender.as_str(),
                origin_server_ts: u64::from(pdu.origin_server_ts.get()) as i64,
                received_ts: tx.now_ms as i64,
                depth: pdu.depth as i64,
                json: &inc.json,
                state_group: group,
                replaces_state: replaces.as_deref(),
                txn: None,
                outlier: false,
                rejected_reason: None,
                soft_failed: false,
                prev_events: &prevs,
                auth_events: &auths,
            },
        )?;
    }
    // Searchable from now on, as the room shows it (a promoted outlier may have been redacted
    // while it was one).
    if let Some(row) = q::get_event(tx, eid)?.filter(|r| r.redacted_by.is_none()) {
        super::search::index(tx, pos, &row.kind, &row.json)?;
    }
    if let Some(target) = &pdu.redacts {
        super::build::apply_redaction(tx, pdu.room_id.as_str(), target.as_str(), eid, &rules)?;
    }
    Ok(Some(Outcome::Accepted(pos)))
}
