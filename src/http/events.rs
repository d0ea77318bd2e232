//! Events: send, state, redact, `/messages`, `/members`, `/joined_members`, `/event`,
//! `/context`.
//!
//! Who may read what: a joined user reads the room's history (within its history
//! visibility); a user who left or was banned reads up to their leaving; anyone reads a
//! `world_readable` room. `visible_range` is the one place that decides.

use crate::store::Connection;
use ruma::api::{
    client::{
        context::get_context,
        filter::RoomEventFilter,
        membership::{get_member_events, joined_members},
        message::{get_message_events, send_message_event},
        redact::redact_event,
        room::get_room_event,
        state::{
            get_state_event_for_key::{self, v3::StateEventFormat},
            get_state_events, send_state_event,
        },
    },
    Direction,
};
use serde_json::{json, Value};
use tide::Response;

use super::{auth, json, known_query, ruma_req, ruma_req_with_body, Authed, Req};
use crate::{
    error::{Error, Result},
    ops,
    room::{
        build::{current_content, NewEvent},
        format::{client_event, client_events, Viewer},
    },
    store::queries::{self as q, EventRow},
};

/// The stream positions `(lo, hi]` of a room's events this user may see.
pub fn visible_range(conn: &Connection, room_id: &str, user_id: &str) -> Result<(i64, i64)> {
    if q::get_room_version(conn, room_id)?.is_none() {
        return Err(Error::not_found("Unknown room"));
    }
    let hv = current_content(conn, room_id, "m.room.history_visibility", "")?
        .and_then(|c| {
            c.get("history_visibility")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "shared".into());
    if hv == "world_readable" {
        return Ok((0, i64::MAX));
    }
    let member = q::get_membership_pos(conn, room_id, user_id)?;
    let Some((membership, pos)) = member else {
        return Err(Error::forbidden("You are not in this room"));
    };
    // With `joined`/`invited` visibility, history starts at the user's first join/invite.
    let lo = if hv == "joined" || hv == "invited" {
        let wanted = if hv == "joined" { "join" } else { "invite" };
        q::get_first_membership_pos(conn, room_id, user_id, wanted)?
            .map(|p| p - 1)
            .unwrap_or(i64::MAX)
    } else {
        0
    };
    match membership.as_str() {
        "join" => Ok((lo, i64::MAX)),
        "leave" | "ban" => {
            let was_joined = q::was_ever_joined(conn, room_id, user_id)?;
            if was_joined {
                Ok((lo, pos))
            } else {
                Err(Error::forbidden("You are not in this room"))
            }
        }
        _ => Err(Error::forbidden("You are not in this room")),
    }
}

fn viewer(who: &Authed) -> Viewer<'_> {
    Viewer {
        user_id: who.user_id.as_str(),
        device_id: who.device_id.as_str(),
    }
}

/// # `PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}`
///
/// The content is free-form (any JSON object); the path goes through ruma's type.
pub async fn send_message(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let app = req.state().clone();
    let (b, content): (send_message_event::v3::Request, Value) =
        ruma_req_with_body(&mut req, &["room_id", "event_type", "txn_id"]).await?;
    let (kind, txn_id) = (b.event_type.to_string(), b.txn_id.to_string());
    if kind.is_empty() {
        return Err(Error::invalid_param("Invalid event type"));
    }
    let (u, d, t) = (
        who.user_id.to_string(),
        who.device_id.to_string(),
        txn_id.clone(),
    );
    // A retried transaction is answered without counting against the rate limit (the write
    // closure checks the transaction ID again, so this read is only a shortcut).
    if let Some(existing) = app.store.read(move |c| q::get_txn(c, &u, &d, &t)).await? {
        return json(&json!({ "event_id": existing }));
    }
    app.limits.check("send", who.user_id.as_str())?;
    let mut new = NewEvent::message(kind, content);
    // `org.matrix.msc4354.sticky_duration_ms` (0..=3,600,000; ruma refuses anything else).
    new.sticky_ms = b.sticky_duration_ms.map(|d| u64::from(d.get()));
    let event_id = ops::events::send_event(
        &app,
        &who.user_id,
        who.device_id.as_str(),
        b.room_id,
        new,
        Some(txn_id),
    )
    .await?;
    json(&json!({ "event_id": event_id }))
}

/// # `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
///
/// The content is free-form (any JSON object); the path goes through ruma's type.
pub async fn put_state(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let app = req.state().clone();
    let (b, content): (send_state_event::v3::Request, Value) =
        ruma_req_with_body(&mut req, &["room_id", "event_type", "state_key?"]).await?;
    let kind = b.event_type.to_string();
    if kind.is_empty() {
        return Err(Error::invalid_param("Invalid event type"));
    }
    let event_id = ops::events::send_event(
        &app,
        &who.user_id,
        who.device_id.as_str(),
        b.room_id,
        NewEvent::state(kind, b.state_key, content),
        None,
    )
    .await?;
    json(&json!({ "event_id": event_id }))
}

/// The state a user may see: current state when joined, else the state when they left.
fn visible_state(conn: &Connection, room_id: &str, user_id: &str) -> Result<Vec<EventRow>> {
    let (_, hi) = visible_range(conn, room_id, user_id)?;
    let ids: Vec<String> = if hi == i64::MAX {
        q::list_current_state(conn, room_id)?
            .into_iter()
            .map(|(_, _, e, _)| e)
            .collect()
    } else {
        let group = q::get_state_group_at(conn, room_id, hi)?
            .ok_or_else(|| Error::not_found("No state"))?;
        q::load_state_group(conn, group)?.into_values().collect()
    };
    let mut rows = Vec::new();
    for id in ids {
        if let Some(r) = q::get_event(conn, &id)? {
            rows.push(r);
        }
    }
    rows.sort_by_key(|r| r.pos);
    Ok(rows)
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/state`
pub async fn get_state_all(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let b: get_state_events::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    let app = req.state().clone();
    let room_id = b.room_id.to_string();
    let now = app.clock.now_ms();
    let out = app
        .store
        .read(move |c| {
            let rows = visible_state(c, &room_id, who.user_id.as_str())?;
            client_events(c, &rows, Some(viewer(&who)), now, true)
        })
        .await?;
    json(&out)
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub async fn get_state(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let b: get_state_event_for_key::v3::Request =
        ruma_req(&mut req, &["room_id", "event_type", "state_key?"]).await?;
    known_query("format", b.format.as_str(), &["content", "event"])?;
    let full = b.format == StateEventFormat::Event;
    let (room_id, kind, key) = (b.room_id.to_string(), b.event_type.to_string(), b.state_key);
    let app = req.state().clone();
    let now = app.clock.now_ms();
    let out = app
        .store
        .read(move |c| {
            let rows = visible_state(c, &room_id, who.user_id.as_str())?;
            let row = rows
                .iter()
                .find(|r| r.kind == kind && r.state_key.as_deref() == Some(key.as_str()))
                .ok_or_else(|| Error::not_found("Event not found"))?;
            let ev = client_event(c, row, Some(viewer(&who)), now, true)?;
            Ok(if full { ev } else { ev["content"].clone() })
        })
        .await?;
    json(&out)
}

/// # `PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}`
pub async fn redact(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let app = req.state().clone();
    let b: redact_event::v3::Request =
        ruma_req(&mut req, &["room_id", "event_id", "txn_id"]).await?;
    let event_id = ops::events::redact(
        &app,
        &who.user_id,
        who.device_id.as_str(),
        b.room_id,
        b.event_id,
        b.reason,
        b.txn_id.to_string(),
    )
    .await?;
    json(&json!({ "event_id": event_id }))
}

/// A stream token for `/messages`: `t<pos>` (or a `/sync` `next_batch`, `s<pos>_<n>`).
pub fn parse_pos_token(t: &str) -> Result<i64> {
    let digits = t.strip_prefix('t').or_else(|| {
        t.strip_prefix('s')
            .map(|s| s.split('_').next().unwrap_or(""))
    });
    digits
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| Error::invalid_param("Invalid pagination token"))
}

/// The parts of a `RoomEventFilter` `/messages` and `/context` apply.
#[derive(Default, Clone)]
pub struct EventFilter {
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    pub lazy_load_members: bool,
    pub limit: Option<usize>,
}

fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

impl EventFilter {
    pub fn from_json(v: &Value) -> Result<Self> {
        let list = |k: &str| -> Result<Option<Vec<String>>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| Error::bad_json(format!("{k} must be strings")))
                    })
                    .collect::<Result<_>>()
                    .map(Some),
                Some(_) => Err(Error::bad_json(format!("{k} must be an array"))),
            }
        };
        Ok(Self {
            types: list("types")?,
            not_types: list("not_types")?.unwrap_or_default(),
            senders: list("senders")?,
            not_senders: list("not_senders")?.unwrap_or_default(),
            lazy_load_members: v
                .get("lazy_load_members")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            limit: v.get("limit").and_then(Value::as_u64).map(|l| l as usize),
        })
    }

    pub fn allows(&self, row: &EventRow) -> bool {
        if self.not_types.iter().any(|p| type_matches(p, &row.kind))
            || self.not_senders.contains(&row.sender)
        {
            return false;
        }
        self.types
            .as_ref()
            .is_none_or(|t| t.iter().any(|p| type_matches(p, &row.kind)))
            && self
                .senders
                .as_ref()
                .is_none_or(|s| s.contains(&row.sender))
    }
}

/// The parts of ruma's `RoomEventFilter` (parsed from the `filter` query parameter) that
/// `/messages` and `/context` apply.
fn room_filter(f: &RoomEventFilter) -> Result<EventFilter> {
    EventFilter::from_json(&serde_json::to_value(f)?)
}

/// The member events of the senders of `rows` (lazy-loading members), at current state.
pub fn lazy_members_of(
    conn: &Connection,
    room_id: &str,
    rows: &[EventRow],
) -> Result<Vec<EventRow>> {
    let mut senders: Vec<&str> = rows.iter().map(|r| r.sender.as_str()).collect();
    senders.sort();
    senders.dedup();
    let mut out = Vec::new();
    for s in senders {
        if let Some(id) = q::get_current_state(conn, room_id, "m.room.member", s)? {
            if let Some(r) = q::get_event(conn, &id)? {
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// Most rows a single `/messages` scans while filtering.
const MAX_SCAN: usize = 2000;

/// # `GET /_matrix/client/v3/rooms/{roomId}/messages`
pub async fn messages(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let app = req.state().clone();
    // A `limit` in the query wins over the filter's; ruma fills in 10 when it is absent.
    let limit_in_query = req.url().query_pairs().any(|(k, _)| k == "limit");
    let b: get_message_events::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    let room_id = b.room_id.to_string();
    let backward = b.dir == Direction::Backward;
    let from = b.from.as_deref().map(parse_pos_token).transpose()?;
    let to = b.to.as_deref().map(parse_pos_token).transpose()?;
    let filter = room_filter(&b.filter)?;
    let limit = if limit_in_query {
        usize::try_from(u64::from(b.limit)).unwrap_or(usize::MAX)
    } else {
        filter.limit.unwrap_or(10)
    }
    .clamp(1, 1000);
    let now = app.clock.now_ms();
    let current = app.notifier.pos();
    let out = app
        .store
        .read(move |c| {
            let (lo, hi) = visible_range(c, &room_id, who.user_id.as_str())?;
            let mut chunk = Vec::new();
            let mut scanned = 0;
            let mut exhausted = false;
            let mut cursor = if backward {
                from.unwrap_or(current)
            } else {
                from.unwrap_or(0)
            };
            while chunk.len() < limit && scanned < MAX_SCAN {
                let (after, upto) = if backward {
                    (to.unwrap_or(0).max(lo), cursor.min(hi))
                } else {
                    (cursor.max(lo), to.unwrap_or(i64::MAX).min(hi))
                };
                if after >= upto {
                    exhausted = true;
                    break;
                }
                let rows = q::list_room_events(c, &room_id, after, upto, limit, backward)?;
                if rows.is_empty() {
                    exhausted = true;
                    break;
                }
                for r in rows {
                    scanned += 1;
                    cursor = if backward { r.pos - 1 } else { r.pos };
                    if filter.allows(&r) {
                        chunk.push(r);
                        if chunk.len() == limit {
                            break;
                        }
                    }
                }
            }
            let state = if filter.lazy_load_members {
                lazy_members_of(c, &room_id, &chunk)?
            } else {
                Vec::new()
            };
            let v = Viewer {
                user_id: who.user_id.as_str(),
                device_id: who.device_id.as_str(),
            };
            let mut out = json!({
                "chunk": client_events(c, &chunk, Some(v), now, true)?,
                "start": format!("t{}", from.unwrap_or(if backward { current } else { 0 })),
            });
            if !exhausted || chunk.len() == limit {
                out["end"] = format!("t{cursor}").into();
            }
            if !state.is_empty() {
                out["state"] = client_events(c, &state, Some(v), now, true)?.into();
            }
            Ok(out)
        })
        .await?;
    json(&out)
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/members`
pub async fn members(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let app = req.state().clone();
    let b: get_member_events::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    let room_id = b.room_id.to_string();
    let known = ["join", "invite", "knock", "leave", "ban"];
    let mut filters = [None, None];
    for (slot, m) in filters.iter_mut().zip([&b.membership, &b.not_membership]) {
        if let Some(m) = m {
            known_query("membership", m.as_str(), &known)?;
            *slot = Some(m.as_str().to_owned());
        }
    }
    let [only, not] = filters;
    let at = b.at.as_deref().map(parse_pos_token).transpose()?;
    let now = app.clock.now_ms();
    let out = app
        .store
        .read(move |c| {
            let (_, hi) = visible_range(c, &room_id, who.user_id.as_str())?;
            let rows: Vec<EventRow> = match at.map(|a| a.min(hi)).or((hi != i64::MAX).then_some(hi))
            {
                None => visible_state(c, &room_id, who.user_id.as_str())?,
                Some(p) => {
                    let g = q::get_state_group_at(c, &room_id, p)?
                        .ok_or_else(|| Error::not_found("No state"))?;
                    q::get_events(c, q::load_state_group(c, g)?.into_values())?
                }
            };
            let mut chunk = Vec::new();
            for r in rows.iter().filter(|r| r.kind == "m.room.member") {
                let ev = client_event(c, r, Some(viewer(&who)), now, true)?;
                let m = ev["content"]["membership"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if only.as_ref().is_some_and(|o| *o != m) || not.as_ref().is_some_and(|n| *n == m) {
                    continue;
                }
                chunk.push(ev);
            }
            Ok(json!({ "chunk": chunk }))
        })
        .await?;
    json(&out)
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/joined_members`
pub async fn joined_members(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let b: joined_members::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    let room_id = b.room_id.to_string();
    let out = req
        .state()
        .store
        .read(move |c| {
            visible_range(c, &room_id, who.user_id.as_str())?;
            let mut joined = serde_json::Map::new();
            for (user, membership, event_id) in q::list_members(c, &room_id)? {
                if membership != "join" {
                    continue;
                }
                let content = match q::get_event(c, &event_id)? {
                    Some(r) => serde_json::from_str::<Value>(&r.json)?["content"].clone(),
                    None => Value::Null,
                };
                joined.insert(user, json!({ "display_name": content.get("displayname"), "avatar_url": content.get("avatar_url") }));
            }
            Ok(json!({ "joined": joined }))
        })
        .await?;
    json(&out)
}

/// Loads an event of `room_id` that the user may see, or `M_NOT_FOUND`.
fn visible_event(
    conn: &Connection,
    room_id: &str,
    event_id: &str,
    user_id: &str,
) -> Result<EventRow> {
    let (lo, hi) = visible_range(conn, room_id, user_id)?;
    let row = q::get_event(conn, event_id)?.ok_or_else(|| Error::not_found("Event not found"))?;
    if q::get_event_room(conn, event_id)?.as_deref() != Some(room_id)
        || row.pos <= lo
        || row.pos > hi
    {
        return Err(Error::not_found("Event not found"));
    }
    Ok(row)
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}`
pub async fn get_event(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let b: get_room_event::v3::Request = ruma_req(&mut req, &["room_id", "event_id"]).await?;
    let (room_id, event_id) = (b.room_id.to_string(), b.event_id.to_string());
    let app = req.state().clone();
    let now = app.clock.now_ms();
    let out = app
        .store
        .read(move |c| {
            let row = visible_event(c, &room_id, &event_id, who.user_id.as_str())?;
            client_event(c, &row, Some(viewer(&who)), now, true)
        })
        .await?;
    json(&out)
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}`
pub async fn context(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let b: get_context::v3::Request = ruma_req(&mut req, &["room_id", "event_id"]).await?;
    let (room_id, event_id) = (b.room_id.to_string(), b.event_id.to_string());
    let filter = room_filter(&b.filter)?;
    let limit = usize::try_from(u64::from(b.limit))
        .unwrap_or(usize::MAX)
        .min(100);
    let app = req.state().clone();
    let now = app.clock.now_ms();
    let out = app
        .store
        .read(move |c| {
            let row = visible_event(c, &room_id, &event_id, who.user_id.as_str())?;
            let (lo, hi) = visible_range(c, &room_id, who.user_id.as_str())?;
            let before_n = limit / 2;
            let after_n = limit - before_n;
            let before: Vec<EventRow> =
                q::list_room_events(c, &room_id, lo, row.pos - 1, MAX_SCAN, true)?
                    .into_iter()
                    .filter(|r| filter.allows(r))
                    .take(before_n)
                    .collect();
            let after: Vec<EventRow> =
                q::list_room_events(c, &room_id, row.pos, hi, MAX_SCAN, false)?
                    .into_iter()
                    .filter(|r| filter.allows(r))
                    .take(after_n)
                    .collect();
            let start = before.last().map(|r| r.pos - 1).unwrap_or(row.pos - 1);
            let end = after.last().map(|r| r.pos).unwrap_or(row.pos);
            let state_rows: Vec<EventRow> = if filter.lazy_load_members {
                let all: Vec<EventRow> = before
                    .iter()
                    .chain(after.iter())
                    .chain(std::iter::once(&row))
                    .cloned()
                    .collect();
                lazy_members_of(c, &room_id, &all)?
            } else {
                match row.state_group {
                    Some(g) => q::get_events(c, q::load_state_group(c, g)?.into_values())?,
                    None => Vec::new(),
                }
            };
            let v = Some(viewer(&who));
            Ok(json!({
                "event": client_event(c, &row, v, now, true)?,
                "events_before": client_events(c, &before, v, now, true)?,
                "events_after": client_events(c, &after, v, now, true)?,
                "start": format!("t{start}"),
                "end": format!("t{end}"),
                "state": client_events(c, &state_rows, v, now, true)?,
            }))
        })
        .await?;
    json(&out)
}
