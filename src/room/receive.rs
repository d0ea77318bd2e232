//! Events from other servers: the checks on receipt that need no I/O, and the commit.
//!
//! The async "gather" half (fetching the origin's keys, missing events) lives in
//! `ops::federation`; it calls [`parse`] first, verifies signatures with ruma, then hands an
//! [`Incoming`] to [`commit`] inside one write closure. The commit re-reads everything it
//! depends on in the writer's transaction, so it is serialised with every other write to the
//! room without a lock.
//!
//! The checks, in the spec's order (server-server API, "Checks performed on receipt of a PDU"):
//! format and size ([`parse`]); signatures and hashes (the gather; a hash mismatch means the
//! event is stored redacted); auth against its own auth events and against the state before
//! it (failing either: *rejected*); auth against the current state (failing: *soft-failed*).

use std::collections::HashMap;

use ruma::{
    canonical_json::redact,
    events::StateEventType,
    room_version_rules::RoomVersionRules,
    signatures::{reference_hash, Verified},
    state_res::{
        check_pdu_format, check_state_dependent_auth_rules, check_state_independent_auth_rules,
    },
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, RoomVersionId,
};
use serde_json::value::RawValue;

use super::{
    build::{load_pdu, persist, Lookups, StateAt},
    state, Pdu,
};
use crate::{
    error::{Error, Result},
    store::{queries as q, Tx},
};

/// Largest PDU, in bytes (spec).
pub const MAX_PDU_BYTES: usize = 65_536;

/// A remote PDU after the checks that need no state: parsed, its ID computed, its signatures
/// verified (by the caller) and, on a hash mismatch, redacted.
pub struct Incoming {
    pub pdu: Pdu,
    /// The canonical JSON to store (redacted if its content hash did not match).
    pub json: String,
}

/// Step 1: the PDU's shape for its room version, its size, and its event ID (the reference
/// hash). Returns the canonical object (for signature checks) and the ID.
pub fn parse(
    raw: &RawValue,
    version: &RoomVersionId,
) -> Result<(CanonicalJsonObject, OwnedEventId, RoomVersionRules)> {
    if raw.get().len() > MAX_PDU_BYTES {
        return Err(Error::too_large("PDU larger than 65536 bytes"));
    }
    let rules = version
        .rules()
        .ok_or_else(|| Error::new(400, "M_UNSUPPORTED_ROOM_VERSION", "unknown room version"))?;
    let obj: CanonicalJsonObject = serde_json::from_str(raw.get())
        .map_err(|e| Error::bad_json(format!("PDU is not canonical JSON: {e}")))?;
    // The event format of the room version: required fields present with the right types,
    // ID lengths, at most 20 prev and 10 auth events, a non-negative depth (the canonical
    // JSON parse above bounds integers to ±(2^53-1)).
    check_pdu_format(&obj, &rules.event_format)
        .map_err(|e| Error::bad_json(format!("PDU: {e}")))?;
    // Only the create event starts the graph; anything else without a prev event has no
    // place in the room (and no state before it to be checked against).
    let is_create =
        matches!(obj.get("type"), Some(CanonicalJsonValue::String(t)) if t == "m.room.create");
    let no_prevs =
        matches!(obj.get("prev_events"), Some(CanonicalJsonValue::Array(a)) if a.is_empty());
    if no_prevs && !is_create {
        return Err(Error::bad_json("PDU: no prev_events"));
    }
    let id = reference_hash(&obj, &rules).map_err(|e| Error::bad_json(format!("PDU: {e}")))?;
    let event_id = OwnedEventId::try_from(format!("${id}")).map_err(Error::internal)?;
    // The fields the auth rules need, with the right types.
    Pdu::from_json(event_id.clone(), raw.get())?;
    Ok((obj, event_id, rules))
}

/// After signature verification: the PDU to commit, redacted if its hashes did not match.
pub fn finish(
    obj: CanonicalJsonObject,
    event_id: OwnedEventId,
    verified: Verified,
    rules: &RoomVersionRules,
) -> Result<Incoming> {
    let obj = match verified {
        Verified::All => obj,
        Verified::Signatures => redact(obj, &rules.redaction, None)
            .map_err(|e| Error::bad_json(format!("cannot redact PDU: {e}")))?,
    };
    let json = serde_json::to_string(&obj)?;
    let pdu = Pdu::from_json(event_id, &json)?;
    Ok(Incoming { pdu, json })
}

/// What became of a received PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Part of the room now, at this stream position.
    Accepted(i64),
    /// Stored, but it fails the current state: not in current state, not sent to clients.
    SoftFailed,
    /// Failed the auth rules against its auth events or the state before it.
    Rejected(String),
    /// Already held.
    Duplicate,
}

/// Why a PDU cannot be committed yet: events it needs that the store lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub auth_events: Vec<OwnedEventId>,
    pub prev_events: Vec<OwnedEventId>,
}

/// Checks 4–6 and the write, in the writer's transaction. `Err(Missing)` (inside `Ok`) means
/// nothing was written: the caller fetches what is missing and tries again.
pub fn commit(tx: &mut Tx<'_>, inc: &Incoming) -> Result<std::result::Result<Outcome, Missing>> {
    let pdu = &inc.pdu;
    let eid = pdu.event_id.as_str();
    if q::get_event(tx, eid)?.is_some() {
        return Ok(Ok(Outcome::Duplicate));
    }
    let rid = pdu.room_id.as_str();
    let version = super::build::room_version(tx, &pdu.room_id)?;
    let rules = version
        .rules()
        .ok_or_else(|| Error::internal("room version without rules"))?;

    // What the checks need must be held: auth events (any, outliers too) and prev events
    // (with their state).
    let mut missing = Missing {
        auth_events: Vec::new(),
        prev_events: Vec::new(),
    };
    let (auth_pdus, missing_auth) = load_auth_events(tx, pdu)?;
    missing.auth_events = missing_auth;
    for p in &pdu.prev_events {
        let held = q::get_event(tx, p.as_str())?.is_some_and(|r| r.state_group.is_some());
        if !held {
            missing.prev_events.push(p.clone());
        }
    }
    if !missing.auth_events.is_empty() || !missing.prev_events.is_empty() {
        return Ok(Err(missing));
    }

    let partial = crate::store::partial::is_partial_state_room(tx, rid)?;
    let auth_kept = if partial {
        auth_pdus.clone()
    } else {
        Vec::new()
    };
    // Check 4: against its own auth events.
    if let Some(reason) = check_auth_events(tx, &rules, pdu, auth_pdus)? {
        return reject(tx, inc, reason);
    }

    // Check 5: against the state before it (its prev events' states, resolved).
    let extremities = q::list_forward_extremities(tx, rid)?;
    let on_tip = pdu.prev_events.len() == 1
        && extremities.len() == 1
        && extremities[0].0 == pdu.prev_events[0].as_str();
    let Some(first_prev) = pdu.prev_events.first() else {
        // `parse` refuses these; an event from another path must not reach the indexing.
        return Err(Error::bad_json("PDU: no prev_events"));
    };
    let state_at = if on_tip {
        StateAt::Current
    } else {
        let base = q::get_event(tx, first_prev.as_str())?.and_then(|r| r.state_group);
        StateAt::Resolved {
            before: state::state_before(tx, &rules, &pdu.prev_events)?,
            base,
        }
    };
    let verdict = if partial {
        super::partial::check_partial_state_before(tx, &rules, pdu, &state_at, &auth_kept)?
    } else {
        check_state_before(tx, &rules, pdu, &state_at)?
    };
    if let Some(reason) = verdict {
        let rejected = reject(tx, inc, reason)?;
        // Rejected on partial state: checked again once the state is full.
        crate::store::reauth::record_if_partial(tx, rid, eid)?;
        return Ok(rejected);
    }

    // Check 6: against the current state (the same check when it follows the tip). Skipped
    // while the room is partial-state: the current state lacks most members, so it would
    // soft-fail events of members we do not know yet (Synapse's faster-joins notes).
    let soft_failed = if on_tip || partial {
        false
    } else {
        let lookups = Lookups::default();
        let verdict = check_state_dependent_auth_rules(&rules.authorization, pdu, |t, k| {
            let id = lookups.get(q::get_current_state(tx, rid, &t.to_string(), k))?;
            lookups.get(load_pdu(tx, &id))
        });
        lookups.finish()?;
        verdict.is_err()
    };
    let persisted = persist(tx, pdu, &inc.json, &rules, None, state_at, soft_failed)?;
    Ok(Ok(if soft_failed {
        Outcome::SoftFailed
    } else {
        Outcome::Accepted(persisted.pos)
    }))
}

/// The auth events of `pdu` that are held (outliers too), and the IDs of those that are not.
pub(super) fn load_auth_events(tx: &Tx<'_>, pdu: &Pdu) -> Result<(Vec<Pdu>, Vec<OwnedEventId>)> {
    let (mut held, mut missing) = (Vec::new(), Vec::new());
    for a in &pdu.auth_events {
        match load_pdu(tx, a.as_str())? {
            Some(p) => held.push(p),
            None => missing.push(a.clone()),
        }
    }
    Ok((held, missing))
}

/// Check 4: the auth rules against the event's own auth events. `Some(reason)` if it fails.
pub(super) fn check_auth_events(
    tx: &Tx<'_>,
    rules: &RoomVersionRules,
    pdu: &Pdu,
    auth_pdus: Vec<Pdu>,
) -> Result<Option<String>> {
    let by_key: HashMap<(StateEventType, String), Pdu> = auth_pdus
        .into_iter()
        .filter_map(|p| {
            let key = p.state_key.clone()?;
            Some(((StateEventType::from(p.kind.to_string()), key), p))
        })
        .collect();
    let lookups = Lookups::default();
    let verdict = check_state_independent_auth_rules(&rules.authorization, pdu, |id| {
        lookups.get(load_pdu(tx, id.as_str()))
    });
    lookups.finish()?;
    if let Err(e) = verdict {
        return Ok(Some(format!("auth events: {e}")));
    }
    if let Err(e) = check_state_dependent_auth_rules(&rules.authorization, pdu, |t, k| {
        by_key.get(&(t.clone(), k.to_owned())).cloned()
    }) {
        return Ok(Some(format!("auth events: {e}")));
    }
    Ok(None)
}

/// Check 5: the auth rules against the state before the event. `Some(reason)` if it fails.
pub(super) fn check_state_before(
    tx: &Tx<'_>,
    rules: &RoomVersionRules,
    pdu: &Pdu,
    state_at: &StateAt,
) -> Result<Option<String>> {
    let rid = pdu.room_id.as_str();
    let lookups = Lookups::default();
    let verdict = check_state_dependent_auth_rules(&rules.authorization, pdu, |t, k| {
        let id = lookups.get(state_at.get(tx, rid, &t.to_string(), k))?;
        lookups.get(load_pdu(tx, &id))
    });
    lookups.finish()?;
    Ok(verdict.err().map(|e| format!("state before: {e}")))
}

/// Stores a rejected event (so it is not fetched or checked again), outside the room.
pub(super) fn reject(
    tx: &mut Tx<'_>,
    inc: &Incoming,
    reason: String,
) -> Result<std::result::Result<Outcome, Missing>> {
    insert_outside_room(tx, inc, false, Some(&reason))?;
    log::info!("rejected {}: {reason}", inc.pdu.event_id);
    Ok(Ok(Outcome::Rejected(reason)))
}

/// Stores an event known without its state (an auth event fetched to check another, the
/// state a join response lists): never part of the timeline. The caller has checked its
/// signatures and hashes; the auth checks run when it is used.
pub fn commit_outlier(tx: &mut Tx<'_>, inc: &Incoming) -> Result<()> {
    if q::get_event(tx, inc.pdu.event_id.as_str())?.is_some() {
        return Ok(());
    }
    insert_outside_room(tx, inc, true, None)
}

/// An event row with no state and no place in the room (rejected, or an outlier).
fn insert_outside_room(
    tx: &mut Tx<'_>,
    inc: &Incoming,
    outlier: bool,
    rejected_reason: Option<&str>,
) -> Result<()> {
    let pdu = &inc.pdu;
    let pos = tx.next_pos([]);
    let kind = pdu.kind.to_string();
    let prevs: Vec<&str> = pdu.prev_events.iter().map(|e| e.as_str()).collect();
    let auths: Vec<&str> = pdu.auth_events.iter().map(|e| e.as_str()).collect();
    q::insert_event(
        tx,
        &q::NewEventRow {
            pos,
            event_id: pdu.event_id.as_str(),
            room_id: pdu.room_id.as_str(),
            kind: &kind,
            state_key: pdu.state_key.as_deref(),
            sender: pdu.sender.as_str(),
            origin_server_ts: u64::from(pdu.origin_server_ts.get()) as i64,
            received_ts: tx.now_ms as i64,
            depth: pdu.depth as i64,
            json: &inc.json,
            state_group: None,
            replaces_state: None,
            txn: None,
            outlier,
            rejected_reason,
            soft_failed: false,
            prev_events: &prevs,
            auth_events: &auths,
        },
    )
}

/// Checks a `/send_join` answer before anything of it is stored: every state and auth-chain
/// event passes the auth rules against its own auth events (found in the answer), the state
/// has the room's create event, and our join passes against the state.
pub fn check_join_state(
    rules: &RoomVersionRules,
    state: &[Incoming],
    chain: &[Incoming],
    join: &Incoming,
) -> Result<()> {
    let all: HashMap<OwnedEventId, Pdu> = state
        .iter()
        .chain(chain.iter())
        .map(|i| (i.pdu.event_id.clone(), i.pdu.clone()))
        .collect();
    let bad = |what: &str, id: &OwnedEventId, e: String| {
        Error::new(502, "M_UNKNOWN", format!("join answer: {what} {id}: {e}"))
    };
    for pdu in all.values() {
        if pdu.room_id != join.pdu.room_id {
            return Err(bad("event of another room", &pdu.event_id, String::new()));
        }
        check_state_independent_auth_rules(&rules.authorization, pdu, |id| all.get(id).cloned())
            .map_err(|e| bad("event", &pdu.event_id, e.to_string()))?;
        let auth: HashMap<(StateEventType, String), &Pdu> = pdu
            .auth_events
            .iter()
            .filter_map(|a| all.get(a))
            .filter_map(|p| {
                Some((
                    (
                        StateEventType::from(p.kind.to_string()),
                        p.state_key.clone()?,
                    ),
                    p,
                ))
            })
            .collect();
        check_state_dependent_auth_rules(&rules.authorization, pdu, |t, k| {
            auth.get(&(t.clone(), k.to_owned())).map(|p| (*p).clone())
        })
        .map_err(|e| bad("event", &pdu.event_id, e.to_string()))?;
    }
    let by_key: HashMap<(StateEventType, String), &Pdu> = state
        .iter()
        .filter_map(|i| {
            Some((
                (
                    StateEventType::from(i.pdu.kind.to_string()),
                    i.pdu.state_key.clone()?,
                ),
                &i.pdu,
            ))
        })
        .collect();
    if !by_key.contains_key(&(StateEventType::RoomCreate, String::new())) {
        return Err(Error::new(
            502,
            "M_UNKNOWN",
            "join answer: no create event in the state",
        ));
    }
    check_state_dependent_auth_rules(&rules.authorization, &join.pdu, |t, k| {
        by_key.get(&(t.clone(), k.to_owned())).map(|p| (*p).clone())
    })
    .map_err(|e| Error::forbidden(format!("The join is not allowed: {e}")))?;
    Ok(())
}

/// Stores a join made through another server, in one write: the room (if new to us), the
/// state and auth chain as outliers, and our join on top of that state; the room's current
/// state becomes the state after the join.
pub fn commit_join(
    tx: &mut Tx<'_>,
    room_id: &ruma::RoomId,
    version: &RoomVersionId,
    state: Vec<Incoming>,
    chain: Vec<Incoming>,
    join: Incoming,
) -> Result<()> {
    let rules = version
        .rules()
        .ok_or_else(|| Error::internal("room version without rules"))?;
    let creator = state
        .iter()
        .find(|i| i.pdu.kind.to_string() == "m.room.create")
        .map(|i| i.pdu.sender.to_string())
        .unwrap_or_default();
    q::insert_room_if_absent(
        tx,
        room_id.as_str(),
        version.as_str(),
        &creator,
        tx.now_ms as i64,
    )?;
    for inc in chain.iter().chain(state.iter()) {
        commit_outlier(tx, inc)?;
    }
    let before: state::StateMap = state
        .iter()
        .filter_map(|i| {
            Some((
                (
                    StateEventType::from(i.pdu.kind.to_string()),
                    i.pdu.state_key.clone()?,
                ),
                i.pdu.event_id.clone(),
            ))
        })
        .collect();
    if q::get_event(tx, join.pdu.event_id.as_str())?.is_some() {
        return Ok(());
    }
    persist(
        tx,
        &join.pdu,
        &join.json,
        &rules,
        None,
        StateAt::Resolved { before, base: None },
        false,
    )?;
    Ok(())
}
