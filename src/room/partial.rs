//! Partial-state joins, joiner side (MSC3706, Synapse's faster-joins notes): storing what a
//! resync fetched, and turning a partial-state room into a fully stated one.
//!
//! While partial, a room's state groups all descend from the root group the join stored (the
//! partial state before the join, plus the join), or from roots copied from those (a delta
//! chain past its length cap is stored whole). The full state before the join only *adds*
//! keys to that partial state, so completing the room is adding the missing entries to those
//! roots (keys a root holds keep their event: it is either the same event or a later change)
//! and to the current state. Every state group of the room is then right at once, without
//! rewriting one row per event received while partial.

use std::collections::HashMap;

use super::receive::{check_auth_events, commit_outlier, load_auth_events, reject, Incoming};
use crate::{
    error::{Error, Result},
    notify::Topic,
    store::{partial as p, queries as q, Tx},
};

/// Stores events a resync fetched (state before the join and its auth chain) as outliers,
/// each checked against its own auth events first (a failing one is stored rejected and left
/// out of the state). Auth events come before the events they authorise; events whose auth
/// events are neither held nor fetched are left out. Returns how many were stored.
pub fn commit_fetched(tx: &mut Tx<'_>, mut events: Vec<Incoming>) -> Result<usize> {
    events.sort_by_key(|i| i.pdu.depth);
    let rules = match events.first() {
        Some(i) => super::build::room_version(tx, &i.pdu.room_id)?
            .rules()
            .ok_or_else(|| Error::internal("room version without rules"))?,
        None => return Ok(0),
    };
    let mut stored = 0;
    // Passes until nothing more can be checked: an auth event with a greater depth than the
    // event it authorises (depth is the sender's claim) is checked in a later pass.
    loop {
        let mut left = Vec::new();
        let before = stored;
        for inc in events {
            if q::get_event(tx, inc.pdu.event_id.as_str())?.is_some() {
                continue;
            }
            let (auth, missing) = load_auth_events(tx, &inc.pdu)?;
            if !missing.is_empty() {
                left.push(inc);
                continue;
            }
            match check_auth_events(tx, &rules, &inc.pdu, auth)? {
                Some(reason) => {
                    let _rejected = reject(tx, &inc, reason)?;
                }
                None => commit_outlier(tx, &inc)?,
            }
            stored += 1;
        }
        if left.is_empty() || stored == before {
            for inc in &left {
                log::warn!("resync: {} lacks auth events, left out", inc.pdu.event_id);
            }
            return Ok(stored);
        }
        events = left;
    }
}

/// Completes a partial-state room with the full state before its join (`state_ids`, as the
/// resident server's `/state_ids` named it; all held by now): the missing entries go into
/// every root state group since the join and into the current state (at one new stream
/// position, so clients see them as a state change), and the room stops being partial.
/// False if the room was not partial (already completed).
pub fn complete(
    tx: &mut Tx<'_>,
    room_id: &str,
    join_id: &str,
    state_ids: &[String],
) -> Result<bool> {
    if !p::is_partial_state_room(tx, room_id)? {
        return Ok(false);
    }
    let group = q::get_event(tx, join_id)?
        .and_then(|r| r.state_group)
        .ok_or_else(|| Error::internal(format_args!("the join {join_id} has no state")))?;
    let root = p::get_root_group(tx, group)?;
    // One event per key (a server naming two is answered by the first).
    let mut by_key: HashMap<(String, String), String> = HashMap::new();
    for (e, t, k) in p::list_state_keys_of(tx, state_ids)? {
        by_key.entry((t, k)).or_insert(e);
    }
    let entries: Vec<(String, String, String)> =
        by_key.into_iter().map(|((t, k), e)| (t, k, e)).collect();
    for g in p::list_root_groups_since(tx, room_id, root)? {
        p::insert_group_entries_if_absent(tx, g, &entries)?;
    }
    let pos = tx.next_pos([Topic::room(room_id)]);
    let mut added = 0;
    for (t, k, e) in &entries {
        if p::insert_current_state_if_absent(tx, room_id, (t, k, e), pos)? {
            added += 1;
        }
    }
    p::delete_partial_state_room(tx, room_id)?;
    p::upsert_partial_state_completed(tx, room_id, pos)?;
    tx.wake(Topic::PartialStateResync);
    log::info!("{room_id} is fully stated: {added} state entries added by the resync");
    Ok(true)
}

/// Check 5 while the room is partial-state: the state before the event lacks most members,
/// so a key it lacks is taken from the event's own auth events (already checked by check 4):
/// Synapse's "partial state resolved with the auth events", in its cheapest form. The resync
/// fills the state in afterwards.
pub(super) fn check_partial_state_before(
    tx: &Tx<'_>,
    rules: &ruma::room_version_rules::RoomVersionRules,
    pdu: &super::Pdu,
    state_at: &super::build::StateAt,
    auth: &[super::Pdu],
) -> Result<Option<String>> {
    let rid = pdu.room_id.as_str();
    let lookups = super::build::Lookups::default();
    let verdict =
        ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |t, k| {
            let kind = t.to_string();
            match lookups.get(state_at.get(tx, rid, &kind, k)) {
                Some(id) => lookups.get(super::build::load_pdu(tx, &id)),
                None => auth
                    .iter()
                    .find(|a| a.kind.to_string() == kind && a.state_key.as_deref() == Some(k))
                    .cloned(),
            }
        });
    lookups.finish()?;
    Ok(verdict
        .err()
        .map(|e| format!("state before (partial): {e}")))
}
