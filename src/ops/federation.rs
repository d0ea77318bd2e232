//! Receiving events from other servers: the gather half (keys, signatures, hashes, missing
//! events), then `room::receive::commit` in one write.
//!
//! Dropping a gather at any await leaves nothing behind: it writes nothing until the commit,
//! and the key fetches it waits on are shielded (`fed::keys`).

use std::collections::{HashMap, HashSet};

use ruma::{
    api::federation::event::{get_event, get_missing_events},
    signatures::{required_server_signatures_to_verify_event, verify_event, PublicKeyMap},
    OwnedEventId, OwnedRoomId, RoomVersionId, ServerName, UInt,
};
use serde_json::value::RawValue;

use crate::{
    error::{Error, Result},
    fed::KeyContext,
    room::{
        build::room_version,
        receive::{self, Incoming, Missing, Outcome},
    },
    store::queries as q,
    App,
};

/// How many events one PDU may pull in through `/get_missing_events` and `/event`: ten of
/// Synapse's pages of missing events, so a server that was down a while catches up.
const MAX_FETCH: usize = 200;

/// What a key fetch needs, from the app (shared by inbound X-Matrix checks and PDU checks).
pub fn key_context(app: &App) -> KeyContext {
    KeyContext {
        client: app.fed.client.clone(),
        store: app.store.clone(),
        clock: app.clock.clone(),
    }
}

/// Checks 1–3: shape, size, event ID, signatures of every server that must have signed
/// (their keys fetched once for all waiters), content hash (a mismatch stores it redacted).
pub async fn verify_pdu(app: &App, raw: &RawValue, version: &RoomVersionId) -> Result<Incoming> {
    let (obj, event_id, rules) = receive::parse(raw, version)?;
    let servers = required_server_signatures_to_verify_event(&obj, &rules.signatures)
        .map_err(|e| Error::bad_json(format!("PDU {event_id}: {e}")))?;
    let ctx = key_context(app);
    let ts = match obj.get("origin_server_ts") {
        Some(ruma::CanonicalJsonValue::Integer(t)) => i64::from(*t),
        _ => {
            return Err(Error::bad_json(format!(
                "PDU {event_id}: no origin_server_ts"
            )))
        }
    };
    let mut map = PublicKeyMap::new();
    for server in servers {
        let key_ids: Vec<String> = obj
            .get("signatures")
            .and_then(|s| match s {
                ruma::CanonicalJsonValue::Object(o) => o.get(server.as_str()),
                _ => None,
            })
            .and_then(|s| match s {
                ruma::CanonicalJsonValue::Object(o) => Some(o.keys().cloned().collect()),
                _ => None,
            })
            .unwrap_or_default();
        let ids: Vec<&str> = key_ids
            .iter()
            .map(String::as_str)
            .filter(|k| k.starts_with("ed25519:"))
            .collect();
        if ids.is_empty() {
            return Err(Error::forbidden(format!(
                "PDU {event_id} is not signed by {server}"
            )));
        }
        // Keys are judged at the event's own time, so old keys verify old events.
        let set = app.fed.keys.for_request(&ctx, &server, &ids, ts).await?;
        map.insert(server.to_string(), set);
    }
    let verified = verify_event(&map, &obj, &rules)
        .map_err(|e| Error::forbidden(format!("PDU {event_id}: bad signature: {e}")))?;
    receive::finish(obj, event_id, verified, &rules)
}

/// The room a raw PDU claims, and its version as we know it (we must be in the room).
pub async fn room_of(app: &App, raw: &RawValue) -> Result<(OwnedRoomId, RoomVersionId)> {
    #[derive(serde::Deserialize)]
    struct R {
        room_id: OwnedRoomId,
    }
    let r: R = serde_json::from_str(raw.get())
        .map_err(|e| Error::bad_json(format!("PDU without a room ID: {e}")))?;
    let room = r.room_id.clone();
    let version = app
        .store
        .read(move |c| match q::get_room_version(c, room.as_str())? {
            Some(_) => room_version(c, &room).map(Some),
            None => Ok(None),
        })
        .await?
        .ok_or_else(|| Error::not_found(format!("This server is not in {}", r.room_id)))?;
    Ok((r.room_id, version))
}

/// Receives one PDU from `origin`: verify, commit; if events it needs are missing, fetch them
/// from `origin` (bounded) and commit again.
///
/// Also returns the PDU's event ID when it could be computed (for `/send`'s per-PDU results),
/// so the PDU is parsed once.
pub async fn receive_pdu(
    app: &App,
    origin: &ServerName,
    raw: &RawValue,
) -> (Option<OwnedEventId>, Result<Outcome>) {
    let (room_id, version) = match room_of(app, raw).await {
        Ok(rv) => rv,
        Err(e) => return (None, Err(e)),
    };
    // A server the room's ACL denies may send nothing into it.
    if let Err(e) = crate::fed::acl::check(app, room_id.as_str(), origin).await {
        let id = receive::parse(raw, &version).ok().map(|(_, id, _)| id);
        return (id, Err(e));
    }
    let inc = match verify_pdu(app, raw, &version).await {
        Ok(inc) => inc,
        Err(e) => {
            let id = receive::parse(raw, &version).ok().map(|(_, id, _)| id);
            return (id, Err(e));
        }
    };
    let id = inc.pdu.event_id.clone();
    (
        Some(id),
        commit_fetching(app, origin, &room_id, &version, inc).await,
    )
}

/// Commits a verified PDU, fetching once (bounded) what it lacks from `origin`.
async fn commit_fetching(
    app: &App,
    origin: &ServerName,
    room_id: &OwnedRoomId,
    version: &RoomVersionId,
    inc: Incoming,
) -> Result<Outcome> {
    let mut budget = MAX_FETCH;
    let mut fetched_once = false;
    loop {
        let inc2 = Incoming {
            pdu: inc.pdu.clone(),
            json: inc.json.clone(),
        };
        match app
            .store
            .write(move |tx| receive::commit(tx, &inc2))
            .await?
        {
            Ok(outcome) => return Ok(outcome),
            Err(missing) if !fetched_once => {
                fetched_once = true;
                fetch_missing(app, origin, room_id, version, &inc, &missing, &mut budget).await?;
            }
            Err(missing) if missing.auth_events.is_empty() && live_sticky(app, &inc) => {
                return commit_unconnected_sticky(app, origin, room_id, version, inc).await;
            }
            Err(missing) => {
                return Err(Error::new(
                    400,
                    "M_MISSING_EVENTS",
                    format!(
                        "{}: missing auth events {:?}, prev events {:?}",
                        inc.pdu.event_id, missing.auth_events, missing.prev_events
                    ),
                ))
            }
        }
    }
}

/// Whether a received PDU is a sticky event still sticky now (MSC4354).
fn live_sticky(app: &App, inc: &Incoming) -> bool {
    crate::room::sticky::is_live_on_receipt(&inc.json, app.clock.now_ms() as i64)
}

/// A live sticky event whose prev events do not connect to what we hold: typically one sent
/// before we joined and pushed to us after (MSC4354: a server pushes its unexpired sticky
/// events to a server that joins), whose history our join never included. Rather than refuse
/// it (its sender would not send it again: the transaction succeeded), the state before it is
/// asked of `origin` (`/state_ids`, as backfill does) and the event is committed as history,
/// then delivered as a sticky event (`room::sticky::commit_unconnected`).
async fn commit_unconnected_sticky(
    app: &App,
    origin: &ServerName,
    room_id: &OwnedRoomId,
    version: &RoomVersionId,
    inc: Incoming,
) -> Result<Outcome> {
    // A budget of its own: the walk that failed to connect it may have used the first.
    let mut budget = MAX_FETCH;
    let state = state_ids_before(
        app,
        origin,
        room_id,
        version,
        &inc.pdu.event_id,
        &[],
        &mut budget,
    )
    .await?;
    app.store
        .write(move |tx| crate::room::sticky::commit_unconnected(tx, &inc, state))
        .await
}

/// Fetches what a PDU needs: auth events one by one (`/event`, stored as outliers), prev
/// events through `/get_missing_events` back to our forward extremities (committed oldest
/// first, each through the full checks).
async fn fetch_missing(
    app: &App,
    origin: &ServerName,
    room_id: &OwnedRoomId,
    version: &RoomVersionId,
    inc: &Incoming,
    missing: &Missing,
    budget: &mut usize,
) -> Result<()> {
    for id in &missing.auth_events {
        fetch_outlier(app, origin, version, id, budget).await?;
    }
    if missing.prev_events.is_empty() {
        return Ok(());
    }
    let events = walk_missing(app, origin, room_id, version, &inc.pdu.event_id, budget).await?;
    for raw in events {
        let e = verify_pdu(app, &raw, version).await?;
        for a in e.pdu.auth_events.clone() {
            fetch_outlier(app, origin, version, &a, budget).await?;
        }
        let e2 = Incoming {
            pdu: e.pdu.clone(),
            json: e.json.clone(),
        };
        // A missing-event that itself lacks prev events is left out (no recursion); the
        // PDU that needed it then fails with M_MISSING_EVENTS.
        let _ = app.store.write(move |tx| receive::commit(tx, &e2)).await?;
    }
    Ok(())
}

/// The events between our forward extremities and `latest`, oldest first, fetched from
/// `origin` with `/get_missing_events` page after page: a server answers at most a page
/// (Synapse 20 events, Hearth 100), so a gap longer than one page is walked back from the
/// oldest events fetched until they connect to events we hold, or `budget` runs out.
async fn walk_missing(
    app: &App,
    origin: &ServerName,
    room_id: &OwnedRoomId,
    version: &RoomVersionId,
    latest: &OwnedEventId,
    budget: &mut usize,
) -> Result<Vec<Box<RawValue>>> {
    let r = room_id.to_string();
    let earliest: Vec<OwnedEventId> = app
        .store
        .read(move |c| q::list_forward_extremities(c, &r))
        .await?
        .into_iter()
        .filter_map(|(e, _)| OwnedEventId::try_from(e).ok())
        .collect();
    // Event ID → (depth, prev events, the PDU).
    let mut fetched: HashMap<OwnedEventId, (u64, Vec<OwnedEventId>, Box<RawValue>)> =
        HashMap::new();
    let mut from = vec![latest.clone()];
    while *budget > 0 {
        let mut req = get_missing_events::v1::Request::new(room_id.clone(), earliest.clone(), from);
        req.limit = UInt::from((*budget).min(50) as u32);
        let res = app.fed.client.send(origin, req).await?;
        let before = fetched.len();
        for raw in res.events.into_iter().take(*budget) {
            // Malformed ones are left out here; the PDU that needs them then fails.
            let Ok((obj, id, _)) = receive::parse(&raw, version) else {
                continue;
            };
            let v: serde_json::Value = serde_json::to_value(&obj)?;
            let depth = v["depth"].as_u64().unwrap_or(0);
            let prevs = v["prev_events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str().and_then(|p| OwnedEventId::try_from(p).ok()))
                .collect();
            fetched.entry(id).or_insert((depth, prevs, raw));
        }
        let new = fetched.len() - before;
        if new == 0 {
            break;
        }
        *budget = budget.saturating_sub(new);
        // Prev events neither fetched nor held (with their state): the gap goes on.
        let unknown: HashSet<OwnedEventId> = fetched
            .values()
            .flat_map(|(_, prevs, _)| prevs.iter())
            .filter(|p| !fetched.contains_key(*p))
            .cloned()
            .collect();
        let ids: Vec<String> = unknown.iter().map(|e| e.to_string()).collect();
        let held: HashSet<String> = app
            .store
            .read(move |c| {
                let mut held = HashSet::new();
                for id in ids {
                    if q::get_event(c, &id)?.is_some_and(|r| r.state_group.is_some()) {
                        held.insert(id);
                    }
                }
                Ok(held)
            })
            .await?;
        from = fetched
            .iter()
            .filter(|(_, (_, prevs, _))| {
                prevs
                    .iter()
                    .any(|p| unknown.contains(p) && !held.contains(p.as_str()))
            })
            .map(|(id, _)| id.clone())
            .collect();
        if from.is_empty() {
            break;
        }
    }
    let mut events: Vec<(u64, Box<RawValue>)> =
        fetched.into_values().map(|(d, _, raw)| (d, raw)).collect();
    events.sort_by_key(|(d, _)| *d);
    Ok(events.into_iter().map(|(_, raw)| raw).collect())
}

/// Fetches one event by ID from `origin` and stores it as an outlier, unless held.
async fn fetch_outlier(
    app: &App,
    origin: &ServerName,
    version: &RoomVersionId,
    id: &OwnedEventId,
    budget: &mut usize,
) -> Result<()> {
    let eid = id.to_string();
    if app
        .store
        .read(move |c| Ok(q::get_event(c, &eid)?.is_some()))
        .await?
    {
        return Ok(());
    }
    if *budget == 0 {
        return Err(Error::new(
            400,
            "M_MISSING_EVENTS",
            "too many missing events",
        ));
    }
    *budget -= 1;
    let res = app
        .fed
        .client
        .send(origin, get_event::v1::Request::new(id.clone()))
        .await?;
    let inc = verify_pdu(app, &res.pdu, version).await?;
    if inc.pdu.event_id != *id {
        return Err(Error::forbidden(format!(
            "{origin} answered {id} with another event"
        )));
    }
    app.store
        .write(move |tx| receive::commit_outlier(tx, &inc))
        .await
}

/// Joins `user` (ours) to a room on another server: `/make_join` on the first of `via` that
/// answers, sign the template, `/send_join` (v2, full state), check the state and auth chain
/// it returns (signatures, hashes, and each event's auth against its own auth events), then
/// one commit: the room row, the state and auth chain as outliers, and our join on top of the
/// returned state, which becomes the room's current state.
pub async fn join_remote(
    app: &App,
    user: &ruma::UserId,
    room_id: &ruma::RoomId,
    via: &[ruma::OwnedServerName],
) -> Result<OwnedEventId> {
    through_any(app, room_id, via, "join", |server| {
        join_via(app, user, room_id, server)
    })
    .await
}

/// Runs `attempt` (a join or a knock, `what`) through each of `via` but us in turn until one
/// succeeds. No server reached means the room cannot be found from here (as Synapse answers);
/// a server that answered with a refusal keeps its answer.
pub(super) async fn through_any<'a, T, F, Fut>(
    app: &App,
    room_id: &ruma::RoomId,
    via: &'a [ruma::OwnedServerName],
    what: &str,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut(&'a ServerName) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut last_err = Error::not_found(format!("No server to {what} the room through"));
    for server in via.iter().filter(|s| **s != app.server_name) {
        match attempt(server).await {
            Ok(v) => return Ok(v),
            Err(e) => {
                log::info!("{what} {room_id} via {server} failed: {}", e.message);
                last_err = e;
            }
        }
    }
    if last_err.status >= 500 {
        return Err(Error::not_found(format!(
            "No server could be reached to {what} {room_id}: {}",
            last_err.message
        )));
    }
    Err(last_err)
}

async fn join_via(
    app: &App,
    user: &ruma::UserId,
    room_id: &ruma::RoomId,
    server: &ServerName,
) -> Result<OwnedEventId> {
    use ruma::api::federation::membership::{create_join_event, prepare_join_event};
    let mut mj = prepare_join_event::v1::Request::new(room_id.to_owned(), user.to_owned());
    mj.ver = supported_versions();
    let res = app.fed.client.send(server, mj).await?;
    let version = res.room_version.unwrap_or(RoomVersionId::V1);
    let rules = template_rules(&version)?;
    let (join_id, join_raw) = sign_template(app, &res.event, user, room_id, "join", &rules)?;
    let mut sj =
        create_join_event::v2::Request::new(room_id.to_owned(), join_id.clone(), join_raw.clone());
    sj.omit_members = app.config.federation.partial_joins;
    let state = app.fed.client.send(server, sj).await?.room_state;
    // A partial answer (MSC3706): the room is recorded as partial-state in the join's own
    // write, and the resync worker fetches the rest.
    let partial = state
        .members_omitted
        .then(|| crate::store::partial::PartialRoom {
            room_id: room_id.to_string(),
            join_event_id: join_id.to_string(),
            joined_via: server.to_string(),
        });
    let servers = state.servers_in_room.clone().unwrap_or_default();
    let is_partial = partial.is_some();

    // Check what came back before storing any of it.
    let mut state_events = Vec::new();
    for raw in &state.state {
        state_events.push(verify_pdu(app, raw, &version).await?);
    }
    let mut chain = Vec::new();
    for raw in &state.auth_chain {
        chain.push(verify_pdu(app, raw, &version).await?);
    }
    // A restricted join comes back signed by the server that vouched for it: that copy is the
    // one to keep and send on (other servers check the voucher's signature).
    let join = match &state.event {
        Some(signed) => {
            let inc = verify_pdu(app, signed, &version).await?;
            if inc.pdu.event_id != join_id {
                return Err(Error::new(
                    502,
                    "M_UNKNOWN",
                    "The send_join answer carries another event",
                ));
            }
            inc
        }
        None => receive::finish(
            serde_json::from_str(join_raw.get())?,
            join_id.clone(),
            ruma::signatures::Verified::All,
            &rules,
        )?,
    };
    crate::room::receive::check_join_state(&rules, &state_events, &chain, &join)?;
    let rid = room_id.to_owned();
    app.store
        .write(move |tx| {
            crate::room::receive::commit_join(tx, &rid, &version, state_events, chain, join)?;
            if let Some(room) = &partial {
                let now = tx.now_ms as i64;
                crate::store::partial::insert_partial_state_room(tx, room, now, &servers)?;
                tx.wake(crate::notify::Topic::PartialStateResync);
            }
            Ok(())
        })
        .await?;
    if is_partial {
        app.metrics
            .partial_joins_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(join_id)
}

/// Invites a user of another server into one of our rooms: build and sign the invite, have
/// the invitee's server co-sign it (`/invite` v2, with the room's stripped state), then commit
/// it like a received event (checked against the state at commit time) and queue it for the
/// other servers in the room, in one write.
pub async fn invite_remote(
    app: &App,
    inviter: &ruma::UserId,
    room_id: &ruma::RoomId,
    invitee: &ruma::UserId,
    reason: Option<String>,
) -> Result<OwnedEventId> {
    use ruma::api::federation::membership::create_invite;
    let (origin, now, room, who, target) = (
        app.server_name.to_string(),
        app.clock.now_ms(),
        room_id.to_owned(),
        inviter.to_owned(),
        invitee.to_owned(),
    );
    let mut content = serde_json::json!({ "membership": "invite" });
    if let Some(r) = reason {
        content["reason"] = r.into();
    }
    let (prepared, stripped) = app
        .store
        .read(move |c| {
            let new =
                crate::room::build::NewEvent::state("m.room.member", target.as_str(), content);
            let p = crate::room::build::prepare(c, &origin, &room, &who, new, None, now)?;
            crate::room::build::check_prepared(c, &room, &p)?;
            let stripped =
                crate::room::build::stripped_state(c, room.as_str(), Some(who.as_str()))?;
            Ok((p, stripped))
        })
        .await?;
    let version = prepared.version.clone();
    let mut obj: ruma::CanonicalJsonObject = serde_json::from_value(prepared.pdu)
        .map_err(|e| Error::internal(format_args!("invite: {e}")))?;
    ruma::signatures::hash_and_sign_event(
        app.server_name.as_str(),
        &app.local.key.pair,
        &mut obj,
        &prepared.rules.redaction,
    )
    .map_err(|e| Error::internal(format_args!("signing the invite: {e}")))?;
    let event_id = OwnedEventId::try_from(format!(
        "${}",
        ruma::signatures::reference_hash(&obj, &prepared.rules).map_err(Error::internal)?
    ))
    .map_err(Error::internal)?;
    let raw = serde_json::value::to_raw_value(&obj)?;
    let stripped = serde_json::from_value(serde_json::Value::Array(stripped))?;
    let req = create_invite::v2::Request::new(
        room_id.to_owned(),
        event_id.clone(),
        version.clone(),
        raw,
        stripped,
    );
    let res = app.fed.client.send(invitee.server_name(), req).await?;
    let inc = verify_pdu(app, &res.event, &version).await?;
    if inc.pdu.event_id != event_id {
        return Err(Error::new(
            502,
            "M_UNKNOWN",
            "The invitee's server returned another event",
        ));
    }
    let (us, theirs, rid) = (
        app.server_name.to_string(),
        invitee.server_name().to_string(),
        room_id.to_string(),
    );
    app.store
        .write(move |tx| match receive::commit(tx, &inc)? {
            Ok(Outcome::Accepted(_)) | Ok(Outcome::Duplicate) => {
                let mut dests = q::list_room_servers(tx, &rid, &us)?;
                dests.retain(|d| *d != theirs);
                q::insert_outbox_pdu(tx, &dests, inc.pdu.event_id.as_str())
            }
            Ok(other) => Err(Error::forbidden(format!(
                "The invite was refused: {other:?}"
            ))),
            Err(missing) => Err(Error::internal(format_args!(
                "our own invite refers to missing events: {missing:?}"
            ))),
        })
        .await?;
    Ok(event_id)
}

/// The room versions we can join or knock on: the `ver` of `/make_join` and `/make_knock`.
pub(super) fn supported_versions() -> Vec<RoomVersionId> {
    crate::room::SUPPORTED_VERSIONS
        .iter()
        .filter_map(|v| RoomVersionId::try_from(*v).ok())
        .collect()
}

/// The rules of the room version a membership template came with, if we support it.
pub(super) fn template_rules(
    version: &RoomVersionId,
) -> Result<ruma::room_version_rules::RoomVersionRules> {
    if !crate::room::is_supported_version(version) {
        return Err(Error::new(
            400,
            "M_UNSUPPORTED_ROOM_VERSION",
            format!("The room is version {version}, which Hearth does not support"),
        ));
    }
    version
        .rules()
        .ok_or_else(|| Error::internal("room version without rules"))
}

/// Our membership event from a `/make_join`, `/make_leave` or `/make_knock` template: checked to be `user`'s
/// own membership in `room_id`, then hashed and signed by us. Returns its ID and JSON.
pub(super) fn sign_template(
    app: &App,
    template: &RawValue,
    user: &ruma::UserId,
    room_id: &ruma::RoomId,
    membership: &str,
    rules: &ruma::room_version_rules::RoomVersionRules,
) -> Result<(OwnedEventId, Box<RawValue>)> {
    let mut obj: ruma::CanonicalJsonObject = serde_json::from_str(template.get())
        .map_err(|e| Error::bad_json(format!("membership template: {e}")))?;
    let expect = |k: &str, v: &str| matches!(obj.get(k), Some(ruma::CanonicalJsonValue::String(s)) if s == v);
    if !expect("type", "m.room.member")
        || !expect("state_key", user.as_str())
        || !expect("sender", user.as_str())
        || !expect("room_id", room_id.as_str())
    {
        return Err(Error::bad_json("The membership template is not ours"));
    }
    obj.insert("origin".into(), app.server_name.as_str().into());
    obj.insert(
        "origin_server_ts".into(),
        ruma::CanonicalJsonValue::Integer(
            ruma::Int::try_from(app.clock.now_ms() as i64).unwrap_or_default(),
        ),
    );
    let mut content = match obj.get("content") {
        Some(ruma::CanonicalJsonValue::Object(o)) => o.clone(),
        _ => ruma::CanonicalJsonObject::new(),
    };
    content.insert("membership".into(), membership.into());
    obj.insert("content".into(), ruma::CanonicalJsonValue::Object(content));
    ruma::signatures::hash_and_sign_event(
        app.server_name.as_str(),
        &app.local.key.pair,
        &mut obj,
        &rules.redaction,
    )
    .map_err(|e| Error::internal(format_args!("signing our {membership}: {e}")))?;
    let id = OwnedEventId::try_from(format!(
        "${}",
        ruma::signatures::reference_hash(&obj, rules).map_err(Error::internal)?
    ))
    .map_err(Error::internal)?;
    Ok((id, serde_json::value::to_raw_value(&obj)?))
}

/// Leaves (or declines an invite to) a room this server is not in, through the room's
/// server or the inviter's: `/make_leave`, sign, `/send_leave`, then record the leave
/// (the event as an outlier, the membership row) in one write.
pub async fn leave_remote(
    app: &App,
    user: &ruma::UserId,
    room_id: &ruma::RoomId,
    via: &[ruma::OwnedServerName],
) -> Result<()> {
    use ruma::api::federation::membership::{create_leave_event, prepare_leave_event};
    let mut last_err = Error::not_found("No server to leave the room through");
    for server in via.iter().filter(|s| **s != app.server_name) {
        let attempt = async {
            let res = app
                .fed
                .client
                .send(
                    server,
                    prepare_leave_event::v1::Request::new(room_id.to_owned(), user.to_owned()),
                )
                .await?;
            let version = res.room_version.unwrap_or(RoomVersionId::V1);
            let rules = version
                .rules()
                .ok_or_else(|| Error::new(400, "M_UNSUPPORTED_ROOM_VERSION", "unknown version"))?;
            let (id, raw) = sign_template(app, &res.event, user, room_id, "leave", &rules)?;
            app.fed
                .client
                .send(
                    server,
                    create_leave_event::v2::Request::new(
                        room_id.to_owned(),
                        id.clone(),
                        raw.clone(),
                    ),
                )
                .await?;
            receive::finish(
                serde_json::from_str(raw.get())?,
                id,
                ruma::signatures::Verified::All,
                &rules,
            )
        };
        match attempt.await {
            Ok(inc) => {
                let (r, u) = (room_id.to_string(), user.to_string());
                return app
                    .store
                    .write(move |tx| {
                        receive::commit_outlier(tx, &inc)?;
                        let pos = tx.next_pos([crate::notify::Topic::user(u.as_str())]);
                        q::upsert_current_state(
                            tx,
                            &r,
                            "m.room.member",
                            &u,
                            inc.pdu.event_id.as_str(),
                            pos,
                        )
                    })
                    .await;
            }
            Err(e) => {
                log::info!("leaving {room_id} via {server} failed: {}", e.message);
                last_err = e;
            }
        }
    }
    Err(last_err)
}

/// Most events asked for in one `/backfill`.
const BACKFILL_LIMIT: u32 = 100;
/// Most servers of the room asked in turn by one backfill.
const BACKFILL_SERVERS: usize = 3;
/// How long one backfill may take in all, before `/messages` answers with what it has.
const BACKFILL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Fills the history before `extremities` (backward extremities of `room_id`) from another
/// server in the room, once for every concurrent `/messages` that needs it: the work runs in
/// its own task in `app.backfill` (a `ResponseCache` keyed by the room and the extremities),
/// so a request dropped mid-way never cancels it for the others. The task is bounded by
/// [`BACKFILL_TIMEOUT`]; its result (the number of events added) is kept a short while, which
/// also keeps a failing or empty backfill from being retried by every request.
pub async fn backfill_shared(
    app: &App,
    room_id: &ruma::RoomId,
    extremities: Vec<String>,
) -> Result<usize> {
    let key = (room_id.to_string(), extremities.clone());
    let (app2, room) = (app.clone(), room_id.to_owned());
    app.backfill
        .get_or_compute(key, move || async move {
            let work = backfill(&app2, &room, &extremities);
            let timeout = async {
                smol::Timer::after(BACKFILL_TIMEOUT).await;
                Err(Error::new(504, "M_UNKNOWN", "backfill timed out"))
            };
            futures_lite::future::or(work, timeout).await
        })
        .await
}

/// Asks the room's other servers in turn for the events before `extremities` and commits
/// what the first that answers sends.
async fn backfill(app: &App, room_id: &ruma::RoomId, extremities: &[String]) -> Result<usize> {
    let (rid, us) = (room_id.to_string(), app.server_name.to_string());
    let servers = app
        .store
        .read(move |c| q::list_room_servers(c, &rid, &us))
        .await?;
    let v: Vec<OwnedEventId> = extremities
        .iter()
        .filter_map(|e| OwnedEventId::try_from(e.as_str()).ok())
        .collect();
    let mut last_err = Error::not_found("No other server in the room to backfill from");
    for server in servers.iter().take(BACKFILL_SERVERS) {
        let Ok(server) = ruma::OwnedServerName::try_from(server.as_str()) else {
            continue;
        };
        match backfill_from(app, &server, room_id, &v).await {
            Ok(n) => return Ok(n),
            Err(e) => {
                log::info!("backfilling {room_id} from {server} failed: {}", e.message);
                last_err = e;
            }
        }
    }
    Err(last_err)
}

/// One `/backfill` from `server`: every PDU checked (signatures, hashes; events of another
/// room left out), auth events the batch lacks fetched as outliers, then the batch committed
/// oldest first in one write as history (`room::history`).
async fn backfill_from(
    app: &App,
    server: &ServerName,
    room_id: &ruma::RoomId,
    v: &[OwnedEventId],
) -> Result<usize> {
    use ruma::api::federation::backfill::get_backfill;
    let room = room_id.to_owned();
    let version = app.store.read(move |c| room_version(c, &room)).await?;
    let req =
        get_backfill::v1::Request::new(room_id.to_owned(), v.to_vec(), UInt::from(BACKFILL_LIMIT));
    let res = app.fed.client.send(server, req).await?;
    let mut batch = Vec::new();
    for raw in res.pdus.iter().take(BACKFILL_LIMIT as usize) {
        match verify_pdu(app, raw, &version).await {
            Ok(inc) if inc.pdu.room_id == room_id => batch.push(inc),
            Ok(inc) => log::info!("backfill: {} is not in {room_id}", inc.pdu.event_id),
            Err(e) => log::info!("backfill from {server}: {}", e.message),
        }
    }
    batch.sort_by_key(|i| i.pdu.depth);
    let ids: std::collections::HashSet<OwnedEventId> =
        batch.iter().map(|i| i.pdu.event_id.clone()).collect();
    let mut budget = MAX_FETCH;
    for inc in &batch {
        for a in inc.pdu.auth_events.iter().filter(|a| !ids.contains(*a)) {
            if let Err(e) = fetch_outlier(app, server, &version, a, &mut budget).await {
                log::info!("backfill: auth event {a}: {}", e.message);
            }
        }
    }
    // The state before the batch's oldest events, whose prev events we do not hold, from
    // the same server, so they are checked against it and what builds on them has state.
    let prevs: Vec<(OwnedEventId, Vec<String>)> = batch
        .iter()
        .map(|i| {
            let missing = i.pdu.prev_events.iter().filter(|p| !ids.contains(*p));
            (
                i.pdu.event_id.clone(),
                missing.map(|p| p.to_string()).collect(),
            )
        })
        .collect();
    let edge: Vec<OwnedEventId> = app
        .store
        .read(move |c| {
            let mut edge = Vec::new();
            for (id, prevs) in prevs {
                let mut held = true;
                for p in &prevs {
                    held &= q::get_event(c, p)?.is_some_and(|r| r.state_group.is_some());
                }
                if !held {
                    edge.push(id);
                }
            }
            Ok(edge)
        })
        .await?;
    let mut states = std::collections::HashMap::new();
    for id in edge.into_iter().take(BACKFILL_STATE_FETCHES) {
        match state_ids_before(app, server, room_id, &version, &id, &batch, &mut budget).await {
            Ok(m) => {
                states.insert(id, m);
            }
            Err(e) => log::info!("backfill: the state before {id}: {}", e.message),
        }
    }
    app.store
        .write(move |tx| crate::room::history::commit_batch(tx, &batch, &states))
        .await
}

/// Most `/state_ids` one backfill asks.
const BACKFILL_STATE_FETCHES: usize = 3;

/// The state before `event_id` as `server` tells it (`/state_ids`): the state events it
/// names, checked and stored as outliers unless held or in `batch` (bounded by `budget`).
async fn state_ids_before(
    app: &App,
    server: &ServerName,
    room_id: &ruma::RoomId,
    version: &RoomVersionId,
    event_id: &OwnedEventId,
    batch: &[Incoming],
    budget: &mut usize,
) -> Result<crate::room::state::StateMap> {
    use ruma::api::federation::event::get_room_state_ids;
    let req = get_room_state_ids::v1::Request::new(event_id.clone(), room_id.to_owned());
    let res = app.fed.client.send(server, req).await?;
    let mut map = crate::room::state::StateMap::new();
    let mut from_store = Vec::new();
    for id in res.pdu_ids {
        match batch.iter().find(|i| i.pdu.event_id == id) {
            Some(i) => {
                let key = i.pdu.state_key.clone().ok_or_else(|| {
                    Error::bad_json(format!("{id} in the state is not a state event"))
                })?;
                map.insert((i.pdu.kind.to_string().into(), key), id);
            }
            None => {
                fetch_outlier(app, server, version, &id, budget).await?;
                from_store.push(id);
            }
        }
    }
    let held = app
        .store
        .read(move |c| {
            let mut out = Vec::new();
            for id in from_store {
                let pdu = crate::room::build::load_pdu(c, id.as_str())?
                    .ok_or_else(|| Error::internal(format_args!("{id} was just stored")))?;
                let key = pdu.state_key.clone().ok_or_else(|| {
                    Error::bad_json(format!("{id} in the state is not a state event"))
                })?;
                out.push(((pdu.kind.to_string().into(), key), id));
            }
            Ok(out)
        })
        .await?;
    map.extend(held);
    Ok(map)
}
