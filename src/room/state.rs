//! Room state at a point of the event graph, and state resolution v2 (ruma's) where the graph
//! forks. Local sends append to the single forward extremity and take the fast path (the
//! `current_state` table); events whose `prev_events` are several extremities, or not the
//! latest one, get their state before by resolving the states after each prev event. This is
//! the path federation uses for events from other servers.

use std::collections::HashSet;

use ruma::{
    events::StateEventType,
    room_version_rules::RoomVersionRules,
    state_res::{self, utils::event_id_set::EventIdSet},
    OwnedEventId,
};
use rusqlite::{params, Connection};

use super::build::{load_pdu, Lookups};
use crate::{
    error::{Error, Result},
    store::queries as q,
};

pub type StateMap = state_res::StateMap<OwnedEventId>;

/// The state after an event (its stored state group).
pub fn state_after(conn: &Connection, event_id: &str) -> Result<StateMap> {
    let row = q::get_event(conn, event_id)?
        .ok_or_else(|| Error::not_found(format!("unknown event {event_id}")))?;
    to_state_map(q::load_state_group(conn, row.state_group)?)
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

/// Every event in the auth chains of `roots` (not including the roots).
pub fn auth_chain(
    conn: &Connection,
    roots: impl IntoIterator<Item = OwnedEventId>,
) -> Result<EventIdSet<OwnedEventId>> {
    let mut seen: HashSet<OwnedEventId> = HashSet::new();
    let mut todo: Vec<OwnedEventId> = Vec::new();
    for r in roots {
        if let Some(p) = load_pdu(conn, r.as_str())? {
            todo.extend(p.auth_events);
        }
    }
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        if let Some(p) = load_pdu(conn, id.as_str())? {
            todo.extend(p.auth_events.into_iter().filter(|a| !seen.contains(a)));
        }
    }
    Ok(seen.into_iter().collect())
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

/// Stores a whole state map as a new (root) state group.
pub fn insert_full_group(conn: &Connection, room_id: &str, state: &StateMap) -> Result<i64> {
    let entries = entries_of(state);
    let refs: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|(t, k, e)| (t.as_str(), k.as_str(), e.as_str()))
        .collect();
    q::insert_state_group(conn, room_id, None, &refs)
}

/// Rewrites `current_state` (and the room's state group) as the resolution of the states after
/// every forward extremity. Called after persisting an event off the fast path.
pub fn recompute_current_state(
    conn: &Connection,
    rules: &RoomVersionRules,
    room_id: &str,
) -> Result<()> {
    let extremities: Vec<OwnedEventId> = {
        let mut stmt =
            conn.prepare_cached("SELECT event_id FROM forward_extremities WHERE room_id = ?1")?;
        let rows = stmt.query_map([room_id], |r| r.get::<_, String>(0))?;
        rows.map(|r| {
            r.map_err(Error::from)
                .and_then(|e| OwnedEventId::try_from(e).map_err(Error::internal))
        })
        .collect::<Result<_>>()?
    };
    let resolved = state_before(conn, rules, &extremities)?;
    let entries = entries_of(&resolved);
    let group = insert_full_group(conn, room_id, &resolved)?;
    conn.execute(
        "UPDATE rooms SET state_group = ?2 WHERE room_id = ?1",
        params![room_id, group],
    )?;
    conn.execute("DELETE FROM current_state WHERE room_id = ?1", [room_id])?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO current_state (room_id, type, state_key, event_id, membership, pos)
         SELECT ?1, ?2, ?3, ?4, CASE WHEN ?2 = 'm.room.member' THEN json_extract(json, '$.content.membership') END, pos
         FROM events WHERE event_id = ?4",
    )?;
    for (t, k, e) in &entries {
        insert.execute(params![room_id, t, k, e])?;
    }
    Ok(())
}
