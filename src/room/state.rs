//! Room state at a point of the event graph, and state resolution v2 (ruma's) where the graph
//! forks. Local sends append to the single forward extremity and take the fast path (the
//! `current_state` table); events whose `prev_events` are several extremities, or not the
//! latest one, get their state before by resolving the states after each prev event. This is
//! the path federation uses for events from other servers.

use std::collections::HashMap;

use crate::store::Connection;
use ruma::{
    events::StateEventType,
    room_version_rules::RoomVersionRules,
    state_res::{self, utils::event_id_set::EventIdSet},
    OwnedEventId,
};

use super::build::{load_pdu, Lookups};
use crate::{
    error::{Error, Result},
    notify::Topic,
    store::{queries as q, Tx},
};

pub type StateMap = state_res::StateMap<OwnedEventId>;

/// The state after an event (its stored state group).
pub fn state_after(conn: &Connection, event_id: &str) -> Result<StateMap> {
    let row = q::get_event(conn, event_id)?
        .ok_or_else(|| Error::not_found(format!("unknown event {event_id}")))?;
    let group = row
        .state_group
        .ok_or_else(|| Error::not_found(format!("no state is known at {event_id}")))?;
    to_state_map(q::load_state_group(conn, group)?)
}

fn to_state_map(m: q::StateMap) -> Result<StateMap> {
    m.into_iter()
        .map(|((t, k), e)| {
            Ok((
                (StateEventType::from(t), k),
                OwnedEventId::try_from(e).map_err(Error::internal)?,
            ))
        })
        .collect()
}

/// Every event in the auth chains of `roots` (not including the roots), from the
/// `event_auth` rows (one recursive query).
pub fn auth_chain(
    conn: &Connection,
    roots: impl IntoIterator<Item = OwnedEventId>,
) -> Result<EventIdSet<OwnedEventId>> {
    q::list_auth_chain(conn, roots.into_iter().map(|r| r.to_string()))?
        .into_iter()
        .map(|id| OwnedEventId::try_from(id).map_err(Error::internal))
        .collect()
}

/// Resolves several states of one room with state resolution v2.
pub fn resolve(
    conn: &Connection,
    rules: &RoomVersionRules,
    states: Vec<StateMap>,
) -> Result<StateMap> {
    if states.len() == 1 {
        return Ok(states.into_iter().next().unwrap_or_default());
    }
    let v2 = rules
        .state_res
        .v2_rules()
        .ok_or_else(|| Error::internal("room version without state resolution v2"))?;
    let chains = states
        .iter()
        .map(|s| auth_chain(conn, s.values().cloned()))
        .collect::<Result<Vec<_>>>()?;
    let lookups = Lookups::default();
    let resolved = state_res::resolve(
        &rules.authorization,
        v2,
        states.iter(),
        chains,
        |id| lookups.get(load_pdu(conn, id.as_str())),
        // Only room version 12 asks for the conflicted subgraph; Hearth does not serve it yet.
        |_| None,
    );
    // A failed read is an error, not an event missing from the resolution.
    lookups.finish()?;
    resolved.map_err(|e| Error::internal(format_args!("state resolution: {e}")))
}

/// The state before an event with these prev events.
pub fn state_before(
    conn: &Connection,
    rules: &RoomVersionRules,
    prev_events: &[OwnedEventId],
) -> Result<StateMap> {
    let states = prev_events
        .iter()
        .map(|p| state_after(conn, p.as_str()))
        .collect::<Result<Vec<_>>>()?;
    resolve(conn, rules, states)
}

fn entries_of(state: &StateMap) -> Vec<(String, String, String)> {
    state
        .iter()
        .map(|((t, k), e)| (t.to_string(), k.clone(), e.to_string()))
        .collect()
}

/// Stores `state` as a new state group: a delta against `base` when there is one and
/// nothing was removed from it, else whole. A fork therefore writes the keys that differ,
/// not the room's whole state.
pub fn insert_group_against(
    conn: &Connection,
    room_id: &str,
    base: Option<i64>,
    state: &StateMap,
) -> Result<i64> {
    let entries = entries_of(state);
    if let Some(b) = base {
        let old = q::load_state_group(conn, b)?;
        let removed = old
            .keys()
            .any(|(t, k)| !state.contains_key(&(StateEventType::from(t.as_str()), k.clone())));
        if !removed {
            let delta: Vec<(&str, &str, &str)> = entries
                .iter()
                .filter(|(t, k, e)| old.get(&(t.clone(), k.clone())) != Some(e))
                .map(|(t, k, e)| (t.as_str(), k.as_str(), e.as_str()))
                .collect();
            return q::insert_state_group(conn, room_id, Some(b), &delta);
        }
    }
    let refs: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|(t, k, e)| (t.as_str(), k.as_str(), e.as_str()))
        .collect();
    q::insert_state_group(conn, room_id, None, &refs)
}

/// Brings `current_state` (and the room's state group) to the resolution of the states after
/// every forward extremity, by delta: only the entries that differ are written. An entry set
/// to the event just persisted (`new`: its ID and position) takes that event's position; any
/// other change is a *state reset* (resolution undid or replaced state without a new event)
/// and takes a fresh stream position, so incremental syncs send it in their `state` section.
pub fn update_current_state(
    tx: &mut Tx<'_>,
    rules: &RoomVersionRules,
    room_id: &str,
    new: (&str, i64),
) -> Result<()> {
    let extremities: Vec<OwnedEventId> = q::list_forward_extremities(tx, room_id)?
        .into_iter()
        .map(|(e, _)| OwnedEventId::try_from(e).map_err(Error::internal))
        .collect::<Result<_>>()?;
    let resolved = state_before(tx, rules, &extremities)?;
    let current: HashMap<(String, String), String> = q::list_current_state(tx, room_id)?
        .into_iter()
        .map(|(t, k, e, _)| ((t, k), e))
        .collect();
    let mut changed: Vec<(String, String, String)> = entries_of(&resolved)
        .into_iter()
        .filter(|(t, k, e)| current.get(&(t.clone(), k.clone())) != Some(e))
        .collect();
    changed.sort();
    let removed: Vec<&(String, String)> = current
        .keys()
        .filter(|(t, k)| !resolved.contains_key(&(StateEventType::from(t.as_str()), k.clone())))
        .collect();
    if changed.is_empty() && removed.is_empty() {
        return Ok(());
    }
    let resets = changed.iter().any(|(_, _, e)| e != new.0) || !removed.is_empty();
    let reset_pos = if resets {
        Some(tx.next_pos([Topic::room(room_id)]))
    } else {
        None
    };
    for (t, k, e) in &changed {
        let pos = if e == new.0 {
            new.1
        } else {
            reset_pos.unwrap_or(new.1)
        };
        q::upsert_current_state(tx, room_id, t, k, e, pos)?;
    }
    for (t, k) in removed {
        q::delete_current_state(tx, room_id, t, k)?;
    }
    let base = q::get_room_state_group(tx, room_id)?;
    let group = insert_group_against(tx, room_id, base, &resolved)?;
    q::set_room_state_group(tx, room_id, group)
}
