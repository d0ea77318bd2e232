//! `POST /_matrix/client/v3/search`: full-text search of room events (the `room_events`
//! category, the only one the spec defines) over the FTS5 index `room::search` keeps.
//!
//! Which rooms: those the user is joined to, and those they left or were banned from after
//! having joined, each up to where [`visible_range`](super::events::visible_range) lets them
//! read (history visibility, their leave) — the same events `/messages` would show them.
//! Synapse searches joined rooms only (a TODO there); a user who may page back through a room
//! they left may search it too.
//!
//! Order and pages: `rank` (FTS5's bm25, the default as in Synapse) pages by offset; `recent`
//! (newest `origin_server_ts` first, as Synapse) pages after the last result. Synapse gives
//! no `next_batch` for `rank`; we do, so a client that pages gets every result once (while
//! nothing new is indexed between its requests). `count` is the number of results in all.

use std::collections::{BTreeMap, BTreeSet};

use ruma::api::client::search::search_events::v3::{
    self as search_events, GroupingKey, OrderBy, SearchKeys,
};
use serde_json::{json, Map, Value};
use tide::Response;

use super::{
    auth,
    events::{around, visible_bounds, visible_state, EventFilter},
    json, known_body, ruma_req_with_body, Req,
};
use crate::{
    error::{Error, Result},
    room::{
        format::{client_event, client_events, Viewer},
        search::{fts_query, marked_words, KEYS},
    },
    store::{
        queries as q,
        search::{search_events as run_search, SearchFrom, SearchOrder, SearchQuery, SearchRoom},
        Connection,
    },
};

/// Results per page when the filter sets no limit (Synapse's default filter limit).
const DEFAULT_LIMIT: usize = 10;
/// Most results per page, and most context events on each side of a result.
const MAX_LIMIT: usize = 100;

/// The `next_batch` token: `k<offset>` for `rank`, `t<origin_server_ts>_<pos>` for `recent`.
fn parse_batch(token: Option<&str>, order: SearchOrder) -> Result<SearchFrom> {
    let Some(t) = token else {
        return Ok(SearchFrom::Start);
    };
    let bad = || Error::invalid_param("Invalid next_batch");
    match order {
        SearchOrder::Rank => t
            .strip_prefix('k')
            .and_then(|o| o.parse::<i64>().ok())
            .filter(|o| *o >= 0)
            .map(SearchFrom::Offset)
            .ok_or_else(bad),
        SearchOrder::Recent => {
            let (ts, pos) = t
                .strip_prefix('t')
                .and_then(|r| r.split_once('_'))
                .ok_or_else(bad)?;
            Ok(SearchFrom::Before(
                ts.parse().map_err(|_| bad())?,
                pos.parse().map_err(|_| bad())?,
            ))
        }
    }
}

/// What the handler parsed, handed to the read.
struct Plan {
    user_id: String,
    device_id: String,
    fts: Option<String>,
    keys: Vec<&'static str>,
    filter: EventFilter,
    rooms: Option<Vec<String>>,
    not_rooms: Vec<String>,
    order: SearchOrder,
    from: SearchFrom,
    limit: usize,
    /// `(before, after, include_profile)` when `event_context` was given.
    context: Option<(usize, usize, bool)>,
    include_state: bool,
    group_by: Vec<GroupingKey>,
}

/// # `POST /_matrix/client/v3/search`
pub async fn search(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let (b, body): (search_events::Request, Value) = ruma_req_with_body(&mut req, &[]).await?;
    let Some(c) = b.search_categories.room_events else {
        // Synapse answers 400 too: `room_events` is the only category there is.
        return Err(Error::bad_json(
            "search_categories must have room_events, the only category supported",
        ));
    };
    let order = match &c.order_by {
        None | Some(OrderBy::Rank) => SearchOrder::Rank,
        Some(OrderBy::Recent) => SearchOrder::Recent,
        Some(other) => {
            return Err(Error::bad_json(format!(
                "Unknown order_by {:?}: expected \"rank\" or \"recent\"",
                other.as_str()
            )))
        }
    };
    for g in &c.groupings.group_by {
        if let Some(k) = &g.key {
            known_body("groupings key", k.as_str(), &["room_id", "sender"])?;
        }
    }
    // Unknown keys match nothing (as in Synapse); no keys given means all three.
    let keys: Vec<&'static str> = match &c.keys {
        None => KEYS.iter().map(|(_, k)| *k).collect(),
        Some(ks) => KEYS
            .iter()
            .map(|(_, k)| *k)
            .filter(|k| {
                ks.iter().any(|x| {
                    matches!(
                        (x, *k),
                        (SearchKeys::ContentBody, "content.body")
                            | (SearchKeys::ContentName, "content.name")
                            | (SearchKeys::ContentTopic, "content.topic")
                    )
                })
            })
            .collect(),
    };
    let filter = EventFilter::from_json(&serde_json::to_value(&c.filter)?)?;
    // Only the indexed types the filter lets through are searched.
    let keys = keys
        .into_iter()
        .filter(|k| KEYS.iter().any(|(t, kk)| kk == k && filter.allows_type(t)))
        .collect();
    let limit = c
        .filter
        .limit
        .map(|l| usize::try_from(u64::from(l)).unwrap_or(MAX_LIMIT))
        .unwrap_or(DEFAULT_LIMIT)
        .clamp(1, MAX_LIMIT);
    // ruma fills in `event_context`'s defaults when it is absent; Synapse gives context only
    // when it was asked for.
    let cap = |n: ruma::UInt| {
        usize::try_from(u64::from(n))
            .unwrap_or(MAX_LIMIT)
            .min(MAX_LIMIT)
    };
    let context = body["search_categories"]["room_events"]
        .get("event_context")
        .is_some()
        .then(|| {
            (
                cap(c.event_context.before_limit),
                cap(c.event_context.after_limit),
                c.event_context.include_profile,
            )
        });
    let plan = Plan {
        user_id: who.user_id.to_string(),
        device_id: who.device_id.to_string(),
        fts: fts_query(&c.search_term),
        keys,
        filter,
        rooms: c
            .filter
            .rooms
            .as_ref()
            .map(|r| r.iter().map(ToString::to_string).collect()),
        not_rooms: c.filter.not_rooms.iter().map(ToString::to_string).collect(),
        order,
        from: parse_batch(b.next_batch.as_deref(), order)?,
        limit,
        context,
        include_state: c.include_state.unwrap_or(false),
        group_by: c
            .groupings
            .group_by
            .iter()
            .filter_map(|g| g.key.clone())
            .collect(),
    };
    let app = req.state().clone();
    let now = app.clock.now_ms();
    let out = app.store.read(move |conn| answer(conn, &plan, now)).await?;
    json(&json!({ "search_categories": { "room_events": out } }))
}

/// The rooms the user may search, each with the part of its history they may see.
fn searchable_rooms(conn: &Connection, plan: &Plan) -> Result<Vec<SearchRoom>> {
    let mut out = Vec::new();
    for (room_id, membership, _) in q::list_user_rooms(conn, &plan.user_id)? {
        if !matches!(membership.as_str(), "join" | "leave" | "ban")
            || plan.rooms.as_ref().is_some_and(|r| !r.contains(&room_id))
            || plan.not_rooms.contains(&room_id)
        {
            continue;
        }
        match visible_bounds(conn, &room_id, &plan.user_id) {
            Ok(b) => out.push(SearchRoom {
                room_id,
                lo: b.topo_lo,
                hi: b.topo_hi,
            }),
            // Left before ever joining, or an unknown room: nothing to search.
            Err(e) if matches!(e.errcode, "M_FORBIDDEN" | "M_NOT_FOUND") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The `room_events` result.
fn answer(conn: &Connection, plan: &Plan, now: u64) -> Result<Value> {
    let rooms = searchable_rooms(conn, plan)?;
    let empty = json!({ "results": [], "count": 0, "highlights": [] });
    let Some(fts) = plan.fts.as_deref() else {
        return Ok(empty);
    };
    if rooms.is_empty() || plan.keys.is_empty() {
        return Ok(empty);
    }
    let (mut hits, count) = run_search(
        conn,
        &SearchQuery {
            fts,
            rooms: &rooms,
            keys: &plan.keys,
            senders: plan.filter.senders.as_deref(),
            not_senders: &plan.filter.not_senders,
            order: plan.order,
            from: plan.from,
            limit: plan.limit,
        },
    )?;
    let more = hits.len() > plan.limit;
    hits.truncate(plan.limit);
    let viewer = Some(Viewer {
        user_id: &plan.user_id,
        device_id: &plan.device_id,
    });
    let mut results = Vec::new();
    let mut highlights = BTreeSet::new();
    let mut groups: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
    let mut result_rooms = BTreeSet::new();
    for hit in &hits {
        let Some(row) = q::get_event(conn, &hit.event_id)? else {
            continue;
        };
        let ev = client_event(conn, &row, viewer, now, true)?;
        let room_id = ev["room_id"].as_str().unwrap_or_default().to_owned();
        marked_words(&hit.marked, &mut highlights);
        let mut result = json!({ "rank": hit.rank, "result": ev });
        if let Some((before, after, profile)) = plan.context {
            let a = around(
                conn,
                &room_id,
                &plan.user_id,
                (hit.depth, hit.pos),
                &EventFilter::default(),
                (before, after),
                now as i64,
            )?;
            let mut ctx = json!({
                "events_before": client_events(conn, &a.before, viewer, now, true)?,
                "events_after": client_events(conn, &a.after, viewer, now, true)?,
                "start": a.start.map(|t| t.to_string()),
                "end": a.end.map(|t| t.to_string()),
            });
            if profile {
                let senders = a
                    .before
                    .iter()
                    .chain(std::iter::once(&row))
                    .chain(&a.after)
                    .map(|r| r.sender.as_str());
                ctx["profile_info"] = profiles_at(conn, row.state_group, senders)?;
            }
            result["context"] = ctx;
        }
        for key in &plan.group_by {
            let (name, value) = match key {
                GroupingKey::RoomId => ("room_id", room_id.clone()),
                _ => ("sender", row.sender.clone()),
            };
            // As Synapse: a group's `order` is the rank of its best result.
            let group = groups
                .entry(name)
                .or_default()
                .entry(value)
                .or_insert_with(|| json!({ "results": [], "order": hit.rank }));
            if let Some(r) = group["results"].as_array_mut() {
                r.push(json!(row.event_id));
            }
        }
        result_rooms.insert(room_id);
        results.push(result);
    }
    let mut out = json!({
        "results": results,
        "count": count,
        "highlights": highlights.into_iter().collect::<Vec<_>>(),
    });
    if more {
        let next = match (plan.order, hits.last()) {
            (SearchOrder::Rank, _) => {
                let base = match plan.from {
                    SearchFrom::Offset(o) => o,
                    _ => 0,
                };
                Some(format!("k{}", base + hits.len() as i64))
            }
            (SearchOrder::Recent, Some(h)) => Some(format!("t{}_{}", h.origin_server_ts, h.pos)),
            (SearchOrder::Recent, None) => None,
        };
        out["next_batch"] = json!(next);
    }
    if !groups.is_empty() {
        out["groups"] = json!(groups);
    }
    if plan.include_state {
        let mut state = Map::new();
        for room in result_rooms {
            let rows = visible_state(conn, &room, &plan.user_id)?;
            state.insert(room, json!(client_events(conn, &rows, viewer, now, true)?));
        }
        out["state"] = Value::Object(state);
    }
    Ok(out)
}

/// `profile_info` of a result's context: each sender's display name and avatar in the room's
/// state at the result (historic, as Synapse gives them).
fn profiles_at<'a>(
    conn: &Connection,
    group: Option<i64>,
    senders: impl Iterator<Item = &'a str>,
) -> Result<Value> {
    let state = match group {
        Some(g) => q::load_state_group(conn, g)?,
        None => Default::default(),
    };
    let mut out = Map::new();
    for s in senders {
        if out.contains_key(s) {
            continue;
        }
        let content = match state.get(&("m.room.member".to_owned(), s.to_owned())) {
            Some(id) => match q::get_event(conn, id)? {
                Some(r) => serde_json::from_str::<Value>(&r.json)?["content"].take(),
                None => Value::Null,
            },
            None => Value::Null,
        };
        let mut p = Map::new();
        for k in ["displayname", "avatar_url"] {
            if let Some(v) = content.get(k).filter(|v| v.is_string()) {
                p.insert(k.to_owned(), v.clone());
            }
        }
        out.insert(s.to_owned(), Value::Object(p));
    }
    Ok(Value::Object(out))
}
