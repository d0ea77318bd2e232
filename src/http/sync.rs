//! `GET /sync`: initial and incremental, long-polling.
//!
//! The token is `s<pos>_<eph>`: the stream position covered (events, account data, receipts,
//! all from the writer's one counter) and the ephemeral serial (typing). A response covers
//! exactly `(since, upto]` where `upto` is read from the notifier *before* the database, so
//! nothing committed later can slip in unannounced or be skipped.
//!
//! Long-poll: compute; if empty, wait on the notifier (or the deadline) and compute again.
//! The wait holds only a listener, so dropping the request at any point leaves nothing behind.

use std::{collections::HashSet, time::Duration};

use futures_lite::FutureExt;
use rusqlite::{params, Connection};
use serde_json::{json, Map, Value};
use tide::Response;

use super::{
    auth,
    events::{lazy_members_of, EventFilter},
    json, Authed, Req,
};
use crate::{
    error::{Error, Result},
    room::{
        build::stripped_state,
        format::{client_events, Viewer},
    },
    store::queries::{self as q, EventRow},
    App,
};

/// The longest long-poll we honour.
const MAX_TIMEOUT_MS: u64 = 300_000;

/// The parts of a sync filter Hearth applies.
#[derive(Clone, Default)]
pub struct SyncFilter {
    pub timeline: EventFilter,
    pub timeline_limit: usize,
    pub lazy_load_members: bool,
    pub include_leave: bool,
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
}

impl SyncFilter {
    pub fn from_json(v: &Value) -> Result<Self> {
        let room = v.get("room").cloned().unwrap_or(json!({}));
        let timeline_json = room.get("timeline").cloned().unwrap_or(json!({}));
        let timeline = EventFilter::from_json(&timeline_json)?;
        let list = |x: Option<&Value>| -> Option<Vec<String>> {
            x.and_then(Value::as_array).map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
        };
        Ok(Self {
            timeline_limit: timeline.limit.unwrap_or(10).clamp(1, 500),
            timeline,
            lazy_load_members: room
                .get("state")
                .and_then(|s| s.get("lazy_load_members"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            include_leave: room
                .get("include_leave")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            rooms: list(room.get("rooms")),
            not_rooms: list(room.get("not_rooms")).unwrap_or_default(),
        })
    }

    fn wants_room(&self, room_id: &str) -> bool {
        !self.not_rooms.iter().any(|r| r == room_id)
            && self
                .rooms
                .as_ref()
                .is_none_or(|rs| rs.iter().any(|r| r == room_id))
    }
}

/// A parsed `since`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Since {
    pub pos: i64,
    pub eph: i64,
}

pub fn parse_since(t: &str) -> Result<Since> {
    let bad = || Error::invalid_param("Invalid since token");
    let rest = t.strip_prefix('s').ok_or_else(bad)?;
    let (p, e) = rest.split_once('_').ok_or_else(bad)?;
    Ok(Since {
        pos: p.parse().map_err(|_| bad())?,
        eph: e.parse().map_err(|_| bad())?,
    })
}

/// # `GET /_matrix/client/v3/sync`
pub async fn sync(req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let app = req.state().clone();
    let get = |k: &str| {
        req.url()
            .query_pairs()
            .find(|(q, _)| q == k)
            .map(|(_, v)| v.into_owned())
    };
    let since = get("since").map(|s| parse_since(&s)).transpose()?;
    let timeout = match get("timeout") {
        Some(t) => t
            .parse::<u64>()
            .map_err(|_| Error::invalid_param("timeout must be an integer"))?,
        None => 0,
    }
    .min(MAX_TIMEOUT_MS);
    let full_state = matches!(get("full_state").as_deref(), Some("true"));
    let filter_param = get("filter");
    let filter = load_filter(&app, &who, filter_param.clone()).await?;
    let deadline = std::time::Instant::now() + Duration::from_millis(timeout);
    loop {
        let upto = Since {
            pos: app.notifier.pos(),
            eph: app.notifier.ephemeral(),
        };
        // Identical concurrent requests (a client retrying after a disconnect, two tabs of
        // one device) share one computation, run in its own task: dropping this request
        // never cancels it for the others.
        let key = SyncKey {
            user: who.user_id.to_string(),
            device: who.device_id.to_string(),
            since,
            upto,
            filter: filter_param.clone(),
            full_state,
        };
        let (a, w, f) = (app.clone(), who.clone(), filter.clone());
        let out = app
            .sync_cache
            .get_or_compute(key, move || async move {
                compute(&a, &w, since, upto, &f, full_state).await
            })
            .await?;
        let now = std::time::Instant::now();
        if out.has_data || since.is_none() || now >= deadline || app.shutdown.is_set() {
            return json(&out.body);
        }
        let wake = async {
            app.notifier.changed_since((upto.pos, upto.eph)).await;
            true
        };
        let expire = async {
            smol::Timer::at(deadline).await;
            false
        };
        if !wake.or(expire).await {
            // Deadline: answer with the empty response computed above.
            return json(&out.body);
        }
    }
}

async fn load_filter(app: &App, who: &Authed, f: Option<String>) -> Result<SyncFilter> {
    let Some(f) = f else {
        return Ok(SyncFilter {
            timeline_limit: 10,
            ..Default::default()
        });
    };
    let v: Value = if f.trim_start().starts_with('{') {
        serde_json::from_str(&f).map_err(|e| Error::not_json(format!("filter: {e}")))?
    } else {
        let id: i64 = f
            .parse()
            .map_err(|_| Error::invalid_param("Unknown filter"))?;
        let u = who.user_id.to_string();
        let stored = app
            .store
            .read(move |c| q::get_filter(c, &u, id))
            .await?
            .ok_or_else(|| Error::invalid_param("Unknown filter"))?;
        serde_json::from_str(&stored)?
    };
    SyncFilter::from_json(&v)
}

/// What makes two sync computations identical.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SyncKey {
    user: String,
    device: String,
    since: Option<Since>,
    upto: Since,
    filter: Option<String>,
    full_state: bool,
}

#[derive(Clone)]
pub struct SyncOutput {
    pub body: Value,
    pub has_data: bool,
}

/// Computes one sync response covering `(since, upto]`.
pub async fn compute(
    app: &App,
    who: &Authed,
    since: Option<Since>,
    upto: Since,
    filter: &SyncFilter,
    full_state: bool,
) -> Result<SyncOutput> {
    let now = app.clock.now_ms();
    // Typing is in memory: collect it here, on the executor, for the rooms the user is in.
    let uid = who.user_id.to_string();
    let rooms = app.store.read(move |c| q::list_user_rooms(c, &uid)).await?;
    let mut typing = Map::new();
    for (room, membership, _) in &rooms {
        if membership == "join" {
            let (users, serial) = app.typing.users(room, now);
            if since.is_none_or(|s| serial > s.eph) {
                typing.insert(
                    room.clone(),
                    json!({ "type": "m.typing", "content": { "user_ids": users } }),
                );
            }
        }
    }
    let who = who.clone();
    let filter = filter.clone();
    app.store
        .read(move |c| {
            build(
                c, &who, since, upto, &filter, full_state, rooms, typing, now,
            )
        })
        .await
}

#[allow(clippy::too_many_arguments)]
fn build(
    c: &Connection,
    who: &Authed,
    since: Option<Since>,
    upto: Since,
    filter: &SyncFilter,
    full_state: bool,
    rooms: Vec<(String, String, i64)>,
    typing: Map<String, Value>,
    now: u64,
) -> Result<SyncOutput> {
    let user = who.user_id.as_str();
    let viewer = Viewer {
        user_id: user,
        device_id: who.device_id.as_str(),
    };
    let since_pos = since.map(|s| s.pos).unwrap_or(0);
    let changed: HashSet<String> = if since.is_some() {
        let mut set: HashSet<String> = q::list_rooms_changed_since(c, since_pos)?
            .into_iter()
            .collect();
        let mut stmt =
            c.prepare_cached("SELECT DISTINCT room_id FROM receipts WHERE pos > ?1 AND pos <= ?2")?;
        for r in stmt.query_map(params![since_pos, upto.pos], |r| r.get::<_, String>(0))? {
            set.insert(r?);
        }
        set
    } else {
        HashSet::new()
    };
    let account_data = q::list_account_data_since(c, user, since_pos)?;
    let forgotten: HashSet<String> = {
        let mut stmt =
            c.prepare_cached("SELECT room_id FROM forgotten_rooms WHERE user_id = ?1")?;
        let rows = stmt.query_map([user], |r| r.get::<_, String>(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };

    let (mut join, mut invite, mut leave) = (Map::new(), Map::new(), Map::new());
    for (room, membership, mpos) in rooms {
        if mpos > upto.pos || !filter.wants_room(&room) {
            continue;
        }
        let room_ad: Vec<Value> = account_data
            .iter()
            .filter(|(r, _, _)| *r == room)
            .map(|(_, t, content)| json!({ "type": t, "content": serde_json::from_str::<Value>(content).unwrap_or(Value::Null) }))
            .collect();
        match membership.as_str() {
            "join" => {
                let fresh = since.is_none() || mpos > since_pos || full_state;
                let typing_ev = typing.get(&room).cloned();
                if !fresh && !changed.contains(&room) && room_ad.is_empty() && typing_ev.is_none() {
                    continue;
                }
                let mut r = joined_room(
                    c,
                    &room,
                    user,
                    viewer,
                    if fresh { None } else { Some(since_pos) },
                    upto.pos,
                    filter,
                    now,
                )?;
                let mut ephemeral: Vec<Value> = typing_ev.into_iter().collect();
                if let Some(rec) =
                    receipts(c, &room, user, if fresh { 0 } else { since_pos }, upto.pos)?
                {
                    ephemeral.push(rec);
                }
                r["ephemeral"] = json!({ "events": ephemeral });
                r["account_data"] = json!({ "events": room_ad });
                let empty = !fresh
                    && r["timeline"]["events"].as_array().is_none_or(Vec::is_empty)
                    && ephemeral.is_empty()
                    && room_ad.is_empty()
                    && r["state"]["events"].as_array().is_none_or(Vec::is_empty);
                if !empty {
                    join.insert(room, r);
                }
            }
            "invite" if since.is_none() || mpos > since_pos => {
                let mut events = stripped_state(c, &room)?;
                if let Some(id) = q::get_current_state(c, &room, "m.room.member", user)? {
                    if let Some(row) = q::get_event(c, &id)? {
                        let v: Value = serde_json::from_str(&row.json)?;
                        events.push(json!({ "type": "m.room.member", "state_key": user, "sender": v["sender"], "content": v["content"] }));
                    }
                }
                invite.insert(room, json!({ "invite_state": { "events": events } }));
            }
            "leave" | "ban"
                if !forgotten.contains(&room)
                    && ((since.is_some() && mpos > since_pos)
                        || (since.is_none() && filter.include_leave)) =>
            {
                // The timeline runs up to the leave event; nothing after it is visible.
                let r = joined_room(
                    c,
                    &room,
                    user,
                    viewer,
                    since.map(|_| since_pos),
                    mpos,
                    filter,
                    now,
                )?;
                leave.insert(room, json!({ "timeline": r["timeline"], "state": r["state"], "account_data": { "events": room_ad } }));
            }
            _ => {}
        }
    }
    let global_ad: Vec<Value> = account_data
        .iter()
        .filter(|(r, _, _)| r.is_empty())
        .map(|(_, t, content)| json!({ "type": t, "content": serde_json::from_str::<Value>(content).unwrap_or(Value::Null) }))
        .collect();
    let has_data =
        !join.is_empty() || !invite.is_empty() || !leave.is_empty() || !global_ad.is_empty();
    let body = json!({
        "next_batch": format!("s{}_{}", upto.pos, upto.eph),
        "rooms": { "join": join, "invite": invite, "leave": leave, "knock": {} },
        "account_data": { "events": global_ad },
        "presence": { "events": [] },
    });
    Ok(SyncOutput { body, has_data })
}

/// One joined (or left) room: timeline in `(since, upto]`, state, summary. `since = None`
/// means the client knows nothing of the room yet: full state at the timeline's start.
#[allow(clippy::too_many_arguments)]
fn joined_room(
    c: &Connection,
    room: &str,
    user: &str,
    viewer: Viewer<'_>,
    since: Option<i64>,
    upto: i64,
    filter: &SyncFilter,
    now: u64,
) -> Result<Value> {
    let limit = filter.timeline_limit;
    // A user who never joined (a rejected invite, a ban before joining) sees only the event
    // that ended their membership, and no room state.
    let (lo, outsider) = match super::events::visible_range(c, room, user) {
        Ok((lo, _)) => (lo, false),
        Err(_) => (upto - 1, true),
    };
    let after = since.unwrap_or(0).max(lo);
    // Newest first, filtered, then back to stream order.
    let mut timeline: Vec<EventRow> = Vec::new();
    let mut limited = false;
    let mut cursor = upto;
    'scan: loop {
        let rows = q::list_room_events(c, room, after, cursor, limit * 2 + 8, true)?;
        if rows.is_empty() {
            break;
        }
        for r in rows {
            cursor = r.pos - 1;
            if filter.timeline.allows(&r) {
                if timeline.len() == limit {
                    limited = true;
                    break 'scan;
                }
                timeline.push(r);
            }
        }
    }
    timeline.reverse();
    let start = timeline.first().map(|r| r.pos - 1).unwrap_or(upto);
    // Full state at the timeline's start for a room new to the client; for a gap, the state
    // that changed between `since` and the timeline's start.
    let state_ids: Option<Vec<String>> = match since {
        _ if outsider => None,
        None => match q::get_state_group_at(c, room, start)? {
            Some(g) => Some(
                q::load_state_group(c, g)?
                    .into_iter()
                    .filter(|((t, k), _)| {
                        !filter.lazy_load_members || t != "m.room.member" || k == user
                    })
                    .map(|(_, e)| e)
                    .collect(),
            ),
            None => Some(Vec::new()),
        },
        Some(s) if limited => {
            let mut stmt = c.prepare_cached(
                "SELECT event_id FROM current_state WHERE room_id = ?1 AND pos > ?2 AND pos <= ?3",
            )?;
            let ids = stmt
                .query_map(params![room, s, start], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Some(ids)
        }
        Some(_) => None,
    };
    let mut state_rows = match state_ids {
        None => Vec::new(),
        Some(ids) => {
            let mut rows = q::get_events(c, ids)?;
            if filter.lazy_load_members {
                rows.extend(
                    lazy_members_of(c, room, &timeline)?
                        .into_iter()
                        .filter(|r| r.pos <= start),
                );
            }
            rows
        }
    };
    state_rows.sort_by_key(|r| r.pos);
    state_rows.dedup_by(|a, b| a.event_id == b.event_id);
    let mut out = json!({
        "timeline": {
            "events": client_events(c, &timeline, Some(viewer), now, false)?,
            "limited": limited,
            "prev_batch": format!("t{start}"),
        },
        "state": { "events": client_events(c, &state_rows, Some(viewer), now, false)? },
    });
    let members_changed = since.is_none()
        || timeline
            .iter()
            .chain(state_rows.iter())
            .any(|r| r.kind == "m.room.member");
    if members_changed {
        out["summary"] = summary(c, room, user)?;
    }
    Ok(out)
}

/// `m.heroes` and member counts, for clients naming rooms without a name.
fn summary(c: &Connection, room: &str, user: &str) -> Result<Value> {
    let members = q::list_members(c, room)?;
    let joined = members.iter().filter(|(_, m, _)| m == "join").count();
    let invited = members.iter().filter(|(_, m, _)| m == "invite").count();
    let mut heroes: Vec<&str> = members
        .iter()
        .filter(|(u, m, _)| u != user && (m == "join" || m == "invite"))
        .map(|(u, _, _)| u.as_str())
        .collect();
    heroes.sort();
    heroes.truncate(5);
    Ok(
        json!({ "m.heroes": heroes, "m.joined_member_count": joined, "m.invited_member_count": invited }),
    )
}

/// The `m.receipt` event for receipts in `(since, upto]`; private receipts only their owner's.
fn receipts(
    c: &Connection,
    room: &str,
    user: &str,
    since: i64,
    upto: i64,
) -> Result<Option<Value>> {
    let rows = q::list_receipts_between(c, room, since, upto)?;
    let mut content = Map::new();
    let mut any = false;
    for r in rows {
        if r.kind == "m.read.private" && r.user_id != user {
            continue;
        }
        any = true;
        let mut receipt = json!({ "ts": r.ts });
        if !r.thread_id.is_empty() {
            receipt["thread_id"] = r.thread_id.clone().into();
        }
        let ev = content.entry(r.event_id).or_insert_with(|| json!({}));
        ev[&r.kind][&r.user_id] = receipt;
    }
    Ok(any.then(|| json!({ "type": "m.receipt", "content": content })))
}
