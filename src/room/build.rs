//! Building, authorising and persisting a local event, all inside one write closure:
//! the writer's transaction sees the latest forward extremities and current state, so two
//! concurrent sends never fork the room and an event is authorised against exactly the state
//! it is appended to. Signing costs ~20 µs; nothing here awaits.

use std::collections::BTreeMap;

use crate::store::Connection;
use ruma::{
    canonical_json::redact,
    events::{StateEventType, TimelineEventType},
    signatures::{hash_and_sign_event, reference_hash},
    state_res::{
        auth_types_for_event, check_state_dependent_auth_rules, check_state_independent_auth_rules,
    },
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedServerName, RoomId, RoomVersionId,
    UserId,
};
use serde_json::{json, Value};

use super::{power::PowerLevels, state, Pdu, SigningKey};
use crate::{
    error::{Error, Result},
    notify::Topic,
    store::{queries as q, Tx},
    util::check_id_len,
};

/// Largest PDU, in bytes of canonical JSON (spec: 65,536).
pub const MAX_PDU_BYTES: usize = 65_536;

/// What the server needs to sign events as itself.
pub struct Local {
    pub server_name: OwnedServerName,
    pub key: SigningKey,
}

/// An event a local user wants to send.
pub struct NewEvent {
    pub kind: TimelineEventType,
    pub state_key: Option<String>,
    pub content: Value,
    /// For `m.room.redaction` in room versions before 11.
    pub redacts: Option<OwnedEventId>,
    /// A sticky event's duration (MSC4354), put in the PDU as `msc4354_sticky`.
    pub sticky_ms: Option<u64>,
}

impl NewEvent {
    pub fn state(kind: impl Into<String>, state_key: impl Into<String>, content: Value) -> Self {
        Self {
            kind: kind.into().into(),
            state_key: Some(state_key.into()),
            content,
            redacts: None,
            sticky_ms: None,
        }
    }
    pub fn message(kind: impl Into<String>, content: Value) -> Self {
        Self {
            kind: kind.into().into(),
            state_key: None,
            content,
            redacts: None,
            sticky_ms: None,
        }
    }
}

/// Which client transaction caused an event (for dedupe and `unsigned.transaction_id`).
pub struct TxnRef<'a> {
    pub device_id: &'a str,
    pub txn_id: &'a str,
}

/// The result of a persisted local event.
pub struct Persisted {
    pub event_id: OwnedEventId,
    pub pos: i64,
}

pub fn room_version(conn: &Connection, room_id: &RoomId) -> Result<RoomVersionId> {
    let v = q::get_room_version(conn, room_id.as_str())?
        .ok_or_else(|| Error::not_found("Unknown room"))?;
    RoomVersionId::try_from(v.as_str()).map_err(Error::internal)
}

pub fn load_pdu(conn: &Connection, event_id: &str) -> Result<Option<Pdu>> {
    let Some(row) = q::get_event(conn, event_id)? else {
        return Ok(None);
    };
    let id = OwnedEventId::try_from(row.event_id.as_str()).map_err(Error::internal)?;
    Ok(Some(Pdu::from_json(id, &row.json)?))
}

fn current_pdu(conn: &Connection, room_id: &str, kind: &str, key: &str) -> Result<Option<Pdu>> {
    match q::get_current_state(conn, room_id, kind, key)? {
        Some(id) => load_pdu(conn, &id),
        None => Ok(None),
    }
}

/// Adapts a fallible lookup to ruma's callbacks, which return `Option`: a database error must
/// not read as "no such event" (that would turn a failing disk into a 403 or a wrong state
/// resolution), so the first one is kept and [`Lookups::finish`] returns it after the call,
/// whatever ruma concluded.
#[derive(Default)]
pub struct Lookups(std::cell::RefCell<Option<Error>>);

impl Lookups {
    pub fn get<T>(&self, r: Result<Option<T>>) -> Option<T> {
        match r {
            Ok(v) => v,
            Err(e) => {
                self.0.borrow_mut().get_or_insert(e);
                None
            }
        }
    }

    /// The first error seen, if any.
    pub fn finish(self) -> Result<()> {
        match self.0.into_inner() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Builds, signs, authorises and persists one local event. Fails with `M_FORBIDDEN` (and
/// writes nothing) when the auth rules reject it.
pub fn send(
    tx: &mut Tx<'_>,
    local: &Local,
    room_id: &RoomId,
    sender: &UserId,
    new: NewEvent,
    txn: Option<TxnRef<'_>>,
) -> Result<Persisted> {
    send_with_prevs(tx, local, room_id, sender, new, txn, None)
}

/// Where an event's state before comes from.
pub(super) enum StateAt {
    /// It follows the room's only forward extremity: the `current_state` table.
    Current,
    /// Anything else: resolved from the states after its prev events. `base` is the state
    /// group after the first prev event, which the event's own group is stored against.
    Resolved {
        before: state::StateMap,
        base: Option<i64>,
    },
}

impl StateAt {
    pub(super) fn get(
        &self,
        conn: &Connection,
        room_id: &str,
        kind: &str,
        key: &str,
    ) -> Result<Option<String>> {
        match self {
            StateAt::Current => q::get_current_state(conn, room_id, kind, key),
            StateAt::Resolved { before: m, .. } => Ok(m
                .get(&(StateEventType::from(kind), key.to_owned()))
                .map(|e| e.to_string())),
        }
    }
}

/// An event built but not yet hashed or signed: the template `/make_join` hands out, and
/// the first half of a local send.
pub struct Prepared {
    pub pdu: Value,
    pub rules: ruma::room_version_rules::RoomVersionRules,
    pub version: RoomVersionId,
    pub(super) state_at: StateAt,
}

/// Builds the unsigned PDU for `new` by `sender` on top of `prev_events` (default: the
/// forward extremities): depth, prev and auth events, `origin_server_ts = now_ms`.
pub fn prepare(
    tx: &Connection,
    origin: &str,
    room_id: &RoomId,
    sender: &UserId,
    new: NewEvent,
    prev_events: Option<Vec<OwnedEventId>>,
    now_ms: u64,
) -> Result<Prepared> {
    // The spec's size limits, for every event whatever part of a request it came from.
    check_id_len("event type", &new.kind.to_string(), Error::bad_json)?;
    if let Some(k) = &new.state_key {
        check_id_len("state key", k, Error::bad_json)?;
    }
    let version = room_version(tx, room_id)?;
    let rules = version
        .rules()
        .ok_or_else(|| Error::internal("room version without rules"))?;
    let rid = room_id.as_str();

    let content_raw = serde_json::value::to_raw_value(&new.content)?;
    let extremities = q::list_forward_extremities(tx, rid)?;
    let mut prev: Vec<(String, i64)> = match prev_events {
        None => extremities.clone(),
        Some(ids) => ids
            .iter()
            .map(|id| {
                let depth = q::get_event_depth(tx, id.as_str())?
                    .ok_or_else(|| Error::not_found(format!("unknown prev event {id}")))?;
                Ok((id.to_string(), depth))
            })
            .collect::<Result<_>>()?,
    };
    prev.sort_by_key(|p| std::cmp::Reverse(p.1));
    prev.truncate(20);
    let depth = prev.iter().map(|p| p.1).max().unwrap_or(0) + 1;
    let state_at = if prev.len() <= 1
        && extremities.len() <= 1
        && prev.first().map(|p| &p.0) == extremities.first().map(|e| &e.0)
    {
        StateAt::Current
    } else {
        let ids = prev
            .iter()
            .map(|p| OwnedEventId::try_from(p.0.as_str()).map_err(Error::internal))
            .collect::<Result<Vec<_>>>()?;
        let base = match ids.first() {
            Some(first) => q::get_event(tx, first.as_str())?.and_then(|r| r.state_group),
            None => None,
        };
        StateAt::Resolved {
            before: state::state_before(tx, &rules, &ids)?,
            base,
        }
    };

    let auth_events: Vec<String> = if new.kind == TimelineEventType::RoomCreate {
        Vec::new()
    } else {
        let types = auth_types_for_event(
            &new.kind,
            sender,
            new.state_key.as_deref(),
            &content_raw,
            &rules.authorization,
        )
        .map_err(Error::bad_json)?;
        let mut ids = Vec::new();
        for (t, k) in types {
            if let Some(id) = state_at.get(tx, rid, &t.to_string(), &k)? {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    };

    let mut pdu = json!({
        "room_id": rid,
        "sender": sender.as_str(),
        "origin": origin,
        "origin_server_ts": now_ms,
        "type": new.kind.to_string(),
        "content": new.content,
        "depth": depth,
        "prev_events": prev.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
        "auth_events": auth_events,
    });
    if let Some(k) = &new.state_key {
        pdu["state_key"] = k.clone().into();
    }
    if let Some(r) = &new.redacts {
        pdu["redacts"] = r.as_str().into();
    }
    if let Some(d) = new.sticky_ms {
        pdu[super::sticky::PDU_KEY] = json!({ "duration_ms": d });
    }
    Ok(Prepared {
        pdu,
        rules,
        version,
        state_at,
    })
}

/// Would `prepared` pass the auth rules against the state it was built on? (`/make_join`
/// refuses a join that could not succeed.)
pub fn check_prepared(conn: &Connection, room_id: &RoomId, prepared: &Prepared) -> Result<()> {
    let placeholder =
        OwnedEventId::try_from("$placeholder:hearth.invalid").map_err(Error::internal)?;
    let pdu = Pdu::from_json(placeholder, &prepared.pdu.to_string())?;
    let rid = room_id.as_str();
    let lookups = Lookups::default();
    let verdict = check_state_dependent_auth_rules(
        &prepared.rules.authorization,
        &pdu,
        |t: &StateEventType, k: &str| {
            let id = lookups.get(prepared.state_at.get(conn, rid, &t.to_string(), k))?;
            lookups.get(load_pdu(conn, &id))
        },
    );
    lookups.finish()?;
    verdict.map_err(|e| Error::forbidden(format!("Not allowed: {e}")))
}

/// Like [`send`], with explicit `prev_events` (default: the forward extremities). Events that
/// do not simply follow the single extremity are authorised against the resolved state of
/// their prev events, and the room's current state is re-resolved over the new extremities.
pub fn send_with_prevs(
    tx: &mut Tx<'_>,
    local: &Local,
    room_id: &RoomId,
    sender: &UserId,
    new: NewEvent,
    txn: Option<TxnRef<'_>>,
    prev_events: Option<Vec<OwnedEventId>>,
) -> Result<Persisted> {
    let rid = room_id.as_str();
    let is_redaction = new.kind == TimelineEventType::RoomRedaction;
    let Prepared {
        pdu,
        rules,
        state_at,
        ..
    } = prepare(
        tx,
        local.server_name.as_str(),
        room_id,
        sender,
        new,
        prev_events,
        tx.now_ms,
    )?;
    let mut obj = match CanonicalJsonValue::try_from(pdu) {
        Ok(CanonicalJsonValue::Object(o)) => o,
        Ok(_) => return Err(Error::bad_json("event is not an object")),
        Err(e) => {
            return Err(Error::bad_json(format!(
                "content is not canonical JSON: {e}"
            )))
        }
    };
    hash_and_sign_event(
        local.server_name.as_str(),
        &local.key.pair,
        &mut obj,
        &rules.redaction,
    )
    .map_err(|e| match e {
        ruma::signatures::JsonError::PduTooLarge => {
            Error::too_large("Event is larger than 65536 bytes")
        }
        e => Error::bad_json(format!("cannot sign event: {e}")),
    })?;
    let event_id = format!(
        "${}",
        reference_hash(&obj, &rules).map_err(|_| Error::too_large("Event too large"))?
    );
    let json = serde_json::to_string(&obj)?;
    if json.len() > MAX_PDU_BYTES {
        return Err(Error::too_large("Event is larger than 65536 bytes"));
    }
    let event_id = OwnedEventId::try_from(event_id).map_err(Error::internal)?;
    let pdu = Pdu::from_json(event_id.clone(), &json)?;

    let lookups = Lookups::default();
    let verdict = check_state_independent_auth_rules(&rules.authorization, &pdu, |id| {
        lookups.get(load_pdu(tx, id.as_str()))
    });
    lookups.finish()?;
    verdict.map_err(|e| Error::forbidden(format!("Event not allowed: {e}")))?;
    let lookups = Lookups::default();
    let verdict = check_state_dependent_auth_rules(
        &rules.authorization,
        &pdu,
        |t: &StateEventType, k: &str| {
            let id = lookups.get(state_at.get(tx, rid, &t.to_string(), k))?;
            lookups.get(load_pdu(tx, &id))
        },
    );
    lookups.finish()?;
    verdict.map_err(|e| Error::forbidden(format!("Event not allowed: {e}")))?;

    if is_redaction {
        check_redaction_allowed(tx, &pdu)?;
    }
    let persisted = persist(tx, &pdu, &json, &rules, txn, state_at, false)?;
    // Our own event goes to every other server in the room, queued in this same write. A
    // leave or ban also goes to its subject's server (one whose last user just left or was
    // kicked is no longer in the room). Invites go by `/invite`, not here.
    let mut destinations = q::list_room_servers(tx, rid, local.server_name.as_str())?;
    let membership = serde_json::from_str::<Value>(pdu.content.get())
        .ok()
        .and_then(|c| {
            c.get("membership")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
    if pdu.kind == TimelineEventType::RoomMember
        && matches!(membership.as_deref(), Some("leave" | "ban"))
    {
        if let Some(subject) = pdu.state_key.as_deref().and_then(|k| UserId::parse(k).ok()) {
            let server = subject.server_name().as_str().to_owned();
            if server != local.server_name.as_str() && !destinations.contains(&server) {
                destinations.push(server);
            }
        }
    }
    q::insert_outbox_pdu(tx, &destinations, pdu.event_id.as_str())?;
    Ok(persisted)
}

/// The auth rules (since v3) leave redaction permission to the server: the sender may redact
/// their own events, or anyone's with the `redact` power level.
fn check_redaction_allowed(conn: &Connection, pdu: &Pdu) -> Result<()> {
    let Some(target) = &pdu.redacts else {
        return Err(Error::bad_json("redaction without redacts"));
    };
    let Some(row) = q::get_event(conn, target.as_str())? else {
        return Ok(());
    };
    if row.sender == pdu.sender.as_str() {
        return Ok(());
    }
    let levels = power_levels(conn, pdu.room_id.as_str())?;
    if levels.user(pdu.sender.as_str()) >= levels.action("redact") {
        Ok(())
    } else {
        Err(Error::forbidden(
            "You may not redact other users' events in this room",
        ))
    }
}

/// The room's current power levels (and creator, from the create event's sender, which is
/// right for every room version, unlike `content.creator`, gone since v11).
pub fn power_levels(conn: &Connection, room_id: &str) -> Result<PowerLevels> {
    let content = current_content(conn, room_id, "m.room.power_levels", "")?;
    // No create event (an unknown room) means no creator; a failed read is an error.
    let creator = current_pdu(conn, room_id, "m.room.create", "")?
        .map(|c| c.sender.to_string())
        .unwrap_or_default();
    Ok(PowerLevels::new(content, creator))
}

/// The content of a current state event, as JSON.
pub fn current_content(
    conn: &Connection,
    room_id: &str,
    kind: &str,
    key: &str,
) -> Result<Option<Value>> {
    let Some(id) = q::get_current_state(conn, room_id, kind, key)? else {
        return Ok(None);
    };
    let Some(row) = q::get_event(conn, &id)? else {
        return Ok(None);
    };
    let v: Value = serde_json::from_str(&row.json)?;
    Ok(v.get("content").cloned())
}

/// Appends an authorised event: its row and graph edges, its state group (a delta against
/// its parent's), current state, the forward extremities, the txn-id row and the redaction it
/// applies. A soft-failed event (`soft_failed`) gets its row, edges and state group only: it
/// changes neither the current state nor the extremities, and redacts nothing.
pub(super) fn persist(
    tx: &mut Tx<'_>,
    pdu: &Pdu,
    json: &str,
    rules: &ruma::room_version_rules::RoomVersionRules,
    txn: Option<TxnRef<'_>>,
    state_at: StateAt,
    soft_failed: bool,
) -> Result<Persisted> {
    // The room's members see the event; a membership change also concerns its subject (an
    // invitee or a joiner is not watching the room yet).
    let subject = match (&pdu.state_key, pdu.kind == TimelineEventType::RoomMember) {
        (Some(user), true) => Some(Topic::user(user.as_str())),
        _ => None,
    };
    let topics: Vec<Topic> = if soft_failed {
        Vec::new()
    } else {
        std::iter::once(Topic::room(pdu.room_id.as_str()))
            .chain(subject)
            .collect()
    };
    let pos = tx.next_pos(topics);
    let rid = pdu.room_id.as_str();
    let eid = pdu.event_id.as_str();
    let kind = pdu.kind.to_string();
    let mut replaces = None;
    let forked = matches!(state_at, StateAt::Resolved { .. });
    let group = match (&pdu.state_key, state_at) {
        (key, StateAt::Resolved { before, base }) => {
            let mut after = before;
            if let Some(key) = key {
                replaces = after
                    .insert(
                        (StateEventType::from(kind.as_str()), key.clone()),
                        pdu.event_id.clone(),
                    )
                    .map(|e| e.to_string());
            }
            state::insert_group_against(tx, rid, base, &after)?
        }
        (Some(key), StateAt::Current) => {
            replaces = q::get_current_state(tx, rid, &kind, key)?;
            // (Soft-failed: the group still says what the state after it would be.)
            let parent = q::get_room_state_group(tx, rid)?;
            q::insert_state_group(tx, rid, parent, &[(kind.as_str(), key.as_str(), eid)])?
        }
        (None, StateAt::Current) => q::get_room_state_group(tx, rid)?
            .ok_or_else(|| Error::internal("non-state event in a room without state"))?,
    };
    let prevs: Vec<&str> = pdu.prev_events.iter().map(|e| e.as_str()).collect();
    let auths: Vec<&str> = pdu.auth_events.iter().map(|e| e.as_str()).collect();
    q::insert_event(
        tx,
        &q::NewEventRow {
            pos,
            event_id: eid,
            room_id: rid,
            kind: &kind,
            state_key: pdu.state_key.as_deref(),
            sender: pdu.sender.as_str(),
            origin_server_ts: u64::from(pdu.origin_server_ts.get()) as i64,
            received_ts: tx.now_ms as i64,
            depth: pdu.depth as i64,
            json,
            state_group: Some(group),
            replaces_state: replaces.as_deref(),
            txn: txn.as_ref().map(|t| (t.device_id, t.txn_id)),
            outlier: false,
            rejected_reason: None,
            soft_failed,
            prev_events: &prevs,
            auth_events: &auths,
        },
    )?;
    // Re-authorised against the full state once the room's resync completes.
    crate::store::reauth::record_if_partial(tx, rid, eid)?;
    if soft_failed {
        return Ok(Persisted {
            event_id: pdu.event_id.clone(),
            pos,
        });
    }
    // The push-rule evaluator walks new events by position; this only wakes it.
    tx.wake(Topic::PushEvaluator);
    if kind == "m.room.member" {
        // Joins bring presence to new members (the presence worker looks for them).
        tx.wake(Topic::Membership);
    }
    super::sticky::index_if_sticky(
        tx,
        json,
        eid,
        rid,
        pos,
        u64::from(pdu.origin_server_ts.get()) as i64,
        tx.now_ms as i64,
    )?;
    super::search::index(tx, pos, &kind, json)?;
    let joining = super::sticky::server_joining(tx, pdu)?;
    q::advance_forward_extremities(tx, rid, eid, &prevs)?;
    if let Some(t) = &txn {
        q::insert_txn_id(tx, pdu.sender.as_str(), t.device_id, t.txn_id, eid)?;
    }
    if let Some(target) = &pdu.redacts {
        apply_redaction(tx, rid, target.as_str(), eid, rules)?;
    }
    if forked {
        state::update_current_state(tx, rules, rid, (eid, pos))?;
    } else if let Some(key) = &pdu.state_key {
        q::upsert_current_state(tx, rid, &kind, key, eid, pos)?;
        q::set_room_state_group(tx, rid, group)?;
    }
    super::sticky::after_persist(tx, rules, rid, joining, forked || pdu.state_key.is_some())?;
    Ok(Persisted {
        event_id: pdu.event_id.clone(),
        pos,
    })
}

/// Redacts the stored JSON of `target` in place (ruma's redaction algorithm) if it is in the
/// same room; a redaction of an unknown event is kept and simply applies to nothing.
pub(super) fn apply_redaction(
    conn: &Connection,
    room_id: &str,
    target: &str,
    by: &str,
    rules: &ruma::room_version_rules::RoomVersionRules,
) -> Result<()> {
    let Some(row) = q::get_event(conn, target)? else {
        return Ok(());
    };
    if q::get_event_room(conn, target)?.as_deref() != Some(room_id) || row.redacted_by.is_some() {
        return Ok(());
    }
    let obj: CanonicalJsonObject = serde_json::from_str(&row.json)?;
    let redacted = redact(obj, &rules.redaction, None).map_err(Error::internal)?;
    crate::store::sticky::delete_sticky(conn, target)?;
    crate::store::search::delete_search(conn, target)?;
    // Its notifications go (as in Synapse): `/notifications` stops listing it and unread counts
    // drop; the redaction's own timeline entry wakes the room's syncs to carry the new counts.
    crate::store::pushfix::delete_push_actions_for_event(conn, room_id, target)?;
    q::set_event_redacted(conn, target, &serde_json::to_string(&redacted)?, by)
}

/// The stripped state an invite carries: the room's create event, join rules, name, avatar,
/// canonical alias, encryption and topic, and the inviter's own member event (the spec
/// recommends it and the matrix-rust-sdk shows "X invited you" from it, as Synapse sends it).
pub fn stripped_state(
    conn: &Connection,
    room_id: &str,
    inviter: Option<&str>,
) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let keys = [
        "m.room.create",
        "m.room.join_rules",
        "m.room.name",
        "m.room.avatar",
        "m.room.canonical_alias",
        "m.room.encryption",
        "m.room.topic",
    ]
    .map(|kind| (kind, ""));
    let inviter = inviter.map(|i| ("m.room.member", i));
    for (kind, key) in keys.into_iter().chain(inviter) {
        if let Some(id) = q::get_current_state(conn, room_id, kind, key)? {
            if let Some(row) = q::get_event(conn, &id)? {
                let v: Value = serde_json::from_str(&row.json)?;
                out.push(json!({ "type": kind, "state_key": key, "sender": v["sender"], "content": v["content"] }));
            }
        }
    }
    Ok(out)
}

/// Content of every current state event keyed by (type, state_key) — small helper for tests.
pub fn current_state_map(
    conn: &Connection,
    room_id: &str,
) -> Result<BTreeMap<(String, String), String>> {
    Ok(q::list_current_state(conn, room_id)?
        .into_iter()
        .map(|(t, k, e, _)| ((t, k), e))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_keep_the_first_error() {
        let l = Lookups::default();
        assert_eq!(l.get(Ok(Some(1))), Some(1));
        assert_eq!(l.get::<i32>(Ok(None)), None);
        assert_eq!(l.get::<i32>(Err(Error::internal("disk"))), None);
        assert_eq!(l.get::<i32>(Err(Error::forbidden("second"))), None);
        let e = l.finish().expect_err("an error was seen");
        assert_eq!(e.errcode, "M_UNKNOWN");
        assert!(Lookups::default().finish().is_ok());
    }
}
