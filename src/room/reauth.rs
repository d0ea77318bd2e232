//! Re-authorising, once a partial-state room is complete, the events received or sent while
//! it was partial (Synapse's faster-joins notes: "each event re-authorised against full
//! state"). While partial, check 5 could only use the partial state, completed from each
//! event's own auth events, so a member's ban we did not know of let their event in, and a
//! membership we did not know of kept an event out. With the full state stored, each recorded
//! event (`partial_state_events`, written in its own write) is checked again against the state
//! before it, in stream order, and its verdict flipped where it differs:
//!
//! - accepted, now failing: marked rejected (it leaves the timeline, and stops being a forward
//!   extremity: the events before it take its place); if it is a state event, every state
//!   group after it names the state before it for its key instead, and the current state is
//!   recomputed, so clients see the correction as a state change at a new position;
//! - rejected, now passing: stored again as an accepted event of the room (at a new position).
//!
//! Batches of [`BATCH`] events, one write each, every row deleted with its verdict: a restart
//! resumes with the next event, and no write grows with the number of events.

use super::{
    build::{load_pdu, persist, StateAt},
    receive::check_state_before,
    state,
};
use crate::{
    error::{Error, Result},
    store::{partial as p, queries as q, reauth as r, Tx},
};

/// Events re-authorised per write.
pub const BATCH: usize = 100;

/// What one batch changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flipped {
    pub rejected: usize,
    pub accepted: usize,
}

/// Re-authorises the next [`BATCH`] recorded events of a room that is no longer partial.
/// Returns what flipped and whether events are left. A room still partial is left alone.
pub fn reauth_batch(tx: &mut Tx<'_>, room_id: &str) -> Result<(Flipped, bool)> {
    let mut flipped = Flipped::default();
    if p::is_partial_state_room(tx, room_id)? {
        return Ok((flipped, false));
    }
    let rows = r::list_partial_state_events(tx, room_id, BATCH)?;
    if rows.is_empty() {
        return Ok((flipped, false));
    }
    let rid = ruma::OwnedRoomId::try_from(room_id).map_err(Error::internal)?;
    let rules = super::build::room_version(tx, &rid)?
        .rules()
        .ok_or_else(|| Error::internal("room version without rules"))?;
    let mut state_changed = false;
    for (pos, eid) in &rows {
        r::delete_partial_state_event(tx, room_id, *pos)?;
        let (Some(row), Some(pdu)) = (q::get_event(tx, eid)?, load_pdu(tx, eid)?) else {
            continue;
        };
        let Some(first_prev) = pdu.prev_events.first() else {
            continue; // the create event: never received while partial
        };
        let before = state::state_before(tx, &rules, &pdu.prev_events)?;
        let at = StateAt::Resolved {
            before,
            base: q::get_event(tx, first_prev.as_str())?.and_then(|r| r.state_group),
        };
        let verdict = check_state_before(tx, &rules, &pdu, &at)?;
        match (row.state_group, verdict) {
            (Some(group), Some(reason)) => {
                let reason = format!("re-authorised on full state: {reason}");
                log::info!("{eid} rejected after the resync of {room_id}: {reason}");
                r::set_event_rejected(tx, eid, &reason)?;
                // The room's state then resolves over the extremities that replace it.
                state_changed |= r::drop_rejected_extremity(tx, room_id, eid)?;
                crate::store::search::delete_search(tx, eid)?;
                crate::store::sticky::delete_sticky(tx, eid)?;
                if let Some(key) = &pdu.state_key {
                    let kind = pdu.kind.to_string();
                    let was = at.get(tx, room_id, &kind, key)?;
                    r::replace_state_entry(
                        tx,
                        room_id,
                        group,
                        (kind.as_str(), key.as_str(), eid.as_str()),
                        was.as_deref(),
                    )?;
                    state_changed = true;
                }
                flipped.rejected += 1;
            }
            (None, None) => {
                log::info!("{eid} accepted after the resync of {room_id}");
                let json = row.json.clone();
                r::delete_rejected_event(tx, eid)?;
                persist(tx, &pdu, &json, &rules, None, at, false)?;
                flipped.accepted += 1;
            }
            _ => {}
        }
    }
    if state_changed {
        // No new event: every change is a reset at a fresh position.
        state::update_current_state(tx, &rules, room_id, ("", 0))?;
    }
    let more = r::has_partial_state_events(tx, room_id)?;
    Ok((flipped, more))
}
