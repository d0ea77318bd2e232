//! `GET /sync`: initial and incremental, long-polling.
//!
//! The token is `s<pos>_<eph>`: the stream position covered (events, account data, receipts,
//! device-list changes, to-device messages, all from the writer's one counter) and the
//! ephemeral serial (typing and presence, both in memory); `s<pos>_<eph>_<td>` when a response held back to-device messages
//! (at most [`to_device::MAX_PER_SYNC`] per response): `td` is the last one sent, and the next
//! response starts after it. A response covers
//! exactly `(since, upto]` where `upto` is read from the notifier *before* the database, so
//! nothing committed later can slip in unannounced or be skipped.
//!
//! Long-poll: compute; if empty, watch the user and the rooms they are joined to (see
//! `notify`) and compute again when one of them announces a change (or at the deadline). A
//! message into a room wakes that room's members only, and a woken poll reads only the rooms
//! its user is in. The wait holds only listeners, so dropping the request at any point leaves
//! nothing behind.
//!
//! Lazy-loaded members: each device's member events already sent are remembered in memory
//! ([`LazyMembers`]) with the position of the response that carried them, and count as
//! delivered only once the client syncs from that position or later; a lost response or a
//! restart costs a duplicate, never a missing member.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::Duration,
};

use crate::store::Connection;
use futures_lite::FutureExt;
use ruma::api::client::sync::sync_events;
use serde_json::{json, Map, Value};
use tide::Response;

use super::{
    auth,
    events::{lazy_members_of, EventFilter},
    json, keys, to_device, Authed, Req,
};
use crate::{
    error::{Error, Result},
    notify::{Topic, Watch},
    ops::push,
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
    /// The filter's `presence` part (types, senders, limit).
    pub presence: EventFilter,
    /// `room.timeline.unread_thread_notifications`: counts by thread (see `ops::push`).
    pub unread_thread_notifications: bool,
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
            presence: EventFilter::from_json(v.get("presence").unwrap_or(&json!({})))?,
            unread_thread_notifications: timeline_json
                .get("unread_thread_notifications")
                .and_then(Value::as_bool)
                .unwrap_or(false),
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
    /// To-device messages up to here were delivered (and, once a request carries this token,
    /// acknowledged); equal to `pos` unless a response held some back.
    pub td: i64,
}

impl From<crate::notify::Marks> for Since {
    fn from(m: crate::notify::Marks) -> Self {
        Self {
            pos: m.pos,
            eph: m.eph,
            td: m.pos,
        }
    }
}

impl From<Since> for crate::notify::Marks {
    fn from(s: Since) -> Self {
        Self {
            pos: s.pos,
            eph: s.eph,
        }
    }
}

pub fn parse_since(t: &str) -> Result<Since> {
    let bad = || Error::invalid_param("Invalid since token");
    let rest = t.strip_prefix('s').ok_or_else(bad)?;
    let (p, e) = rest.split_once('_').ok_or_else(bad)?;
    let (e, td) = match e.split_once('_') {
        Some((e, td)) => (e, Some(td)),
        None => (e, None),
    };
    let pos: i64 = p.parse().map_err(|_| bad())?;
    let td = match td {
        Some(td) => td.parse().ok().filter(|td| *td <= pos).ok_or_else(bad)?,
        None => pos,
    };
    Ok(Since {
        pos,
        eph: e.parse().map_err(|_| bad())?,
        td,
    })
}

/// The token for a response covering `upto`, whose to-device messages end at `td`.
fn format_token(upto: Since, td: i64) -> String {
    if td == upto.pos {
        format!("s{}_{}", upto.pos, upto.eph)
    } else {
        format!("s{}_{}_{}", upto.pos, upto.eph, td)
    }
}

/// # `GET /_matrix/client/v3/sync`
pub async fn sync(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let app = req.state().clone();
    // ruma's request type validates every parameter (types, the filter's shape); the filter
    // is then read from the raw query (an ID or inline JSON) into `SyncFilter`.
    let parsed: sync_events::v3::Request = super::ruma_req(&mut req, &[]).await?;
    super::known_query(
        "set_presence",
        parsed.set_presence.as_str(),
        &["online", "offline", "unavailable"],
    )?;
    let mut since = parsed.since.as_deref().map(parse_since).transpose()?;
    if let Some(s) = since.as_mut().filter(|s| s.eph > app.notifier.ephemeral()) {
        // A token from before a restart (the ephemeral serial starts again at 0): everything
        // in memory (typing, presence) is new to this client.
        s.eph = 0;
    }
    // Counts this sync for presence until the request ends, however it ends.
    let _presence = crate::presence::sync_started(
        &app,
        who.user_id.as_str(),
        who.device_id.as_str(),
        &parsed.set_presence,
    )
    .await?;
    let timeout = parsed
        .timeout
        .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
        .min(MAX_TIMEOUT_MS);
    let full_state = parsed.full_state;
    let filter_param = req
        .url()
        .query_pairs()
        .find(|(q, _)| q == "filter")
        .map(|(_, v)| v.into_owned());
    let filter = load_filter(&app, &who, filter_param.clone()).await?;
    let deadline = std::time::Instant::now() + Duration::from_millis(timeout);
    // The topics this poll watches, kept across wake-ups while the user's rooms stay the same.
    let mut watch: Option<(Vec<String>, Watch)> = None;
    let mut acked = false;
    loop {
        let mut upto = Since::from(app.notifier.marks());
        // An incremental sync waits (briefly) until the push evaluator has counted what it
        // covers, so a message and its unread counts go out in one response.
        if since.is_some() && crate::workers::push::wait_for_counts(&app, upto.pos).await {
            upto = Since::from(app.notifier.marks());
        }
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
        if let (Some(td), false) = (out.to_device_acked, acked) {
            // The client has the messages up to `td`: delete them (once per request). Lost
            // if this request is dropped first, which only delays the deletion.
            acked = true;
            let (u, d) = (who.user_id.to_string(), who.device_id.to_string());
            app.store
                .write(move |tx| crate::store::e2ee::delete_to_device_upto(tx, &u, &d, td))
                .await?;
        }
        let now = std::time::Instant::now();
        if out.has_data || since.is_none() || now >= deadline || app.shutdown.is_set() {
            return json(&out.body);
        }
        // Watch the user (new rooms, invites, account data) and every room they are joined
        // to. Created after the computation: a change committed since `upto` on a topic that
        // nobody watched yet is still seen, because a new slot starts at the global marks.
        if watch.as_ref().is_none_or(|(rooms, _)| *rooms != out.joined) {
            let topics = out
                .joined
                .iter()
                .map(|r| Topic::room(r.as_str()))
                .chain([Topic::user(who.user_id.as_str())]);
            watch = Some((out.joined.clone(), app.notifier.watch(topics)));
        }
        let Some((_, w)) = &watch else {
            return json(&out.body);
        };
        let wake = async {
            w.changed_since(upto.into()).await;
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
        app.metrics
            .sync_wakeups_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        // The spec's shape (ruma's `FilterDefinition`), not just any JSON: ruma's query parser
        // takes a filter that is not a valid definition for a filter ID.
        serde_json::from_str::<ruma::api::client::filter::FilterDefinition>(&f)
            .map_err(|e| Error::invalid_param(format!("filter: {e}")))?;
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
    /// The rooms the user is joined to (what a long-poll watches besides the user).
    pub joined: Vec<String>,
    /// The `since` token acknowledged to-device messages up to here that are still stored.
    pub to_device_acked: Option<i64>,
}

/// Per device: which member events were sent for lazy loading, and in the response up to
/// which position. In memory only (like Synapse's cache): losing it costs duplicates.
#[derive(Default)]
pub struct LazyMembers {
    map: Mutex<HashMap<DeviceKey, SentMembers>>,
}

/// (user, device).
type DeviceKey = (String, String);
/// (room, member) → (member event ID, `upto` of the response that carried it).
type SentMembers = HashMap<(String, String), (String, i64)>;

/// Bounds on the cache; past them it starts over (members are then sent again).
const LAZY_MAX_DEVICES: usize = 10_000;
const LAZY_MAX_PER_DEVICE: usize = 100_000;

impl LazyMembers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceKey, SentMembers>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets what a device was sent (an initial sync starts over).
    fn reset(&self, device: &DeviceKey) {
        self.lock().remove(device);
    }

    /// Keeps the member events this device has not been sent as of `since`.
    fn unsent(
        &self,
        device: &DeviceKey,
        room: &str,
        since: i64,
        rows: Vec<EventRow>,
    ) -> Vec<EventRow> {
        let map = self.lock();
        let Some(sent) = map.get(device) else {
            return rows;
        };
        rows.into_iter()
            .filter(|r| {
                let key = (room.to_owned(), r.state_key.clone().unwrap_or_default());
                !matches!(sent.get(&key), Some((id, at)) if *id == r.event_id && *at <= since)
            })
            .collect()
    }

    /// Records member events sent in the response that covers up to `upto`.
    fn record(&self, device: &DeviceKey, room: &str, upto: i64, rows: &[EventRow]) {
        let mut map = self.lock();
        if map.len() >= LAZY_MAX_DEVICES && !map.contains_key(device) {
            map.clear();
        }
        let sent = map.entry(device.clone()).or_default();
        if sent.len() >= LAZY_MAX_PER_DEVICE {
            sent.clear();
        }
        for r in rows.iter().filter(|r| r.kind == "m.room.member") {
            let key = (room.to_owned(), r.state_key.clone().unwrap_or_default());
            match sent.get_mut(&key) {
                // Sent before in an earlier response: the earliest position counts.
                Some((id, at)) if *id == r.event_id => *at = (*at).min(upto),
                _ => {
                    sent.insert(key, (r.event_id.clone(), upto));
                }
            }
        }
    }
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
    let ctx = Ctx {
        who: who.clone(),
        since,
        upto,
        filter: filter.clone(),
        full_state,
        now,
        lazy: app.lazy_members.clone(),
    };
    let uid = who.user_id.as_str();
    let presence =
        crate::presence::for_sync(app, uid, since, upto, &filter.presence, &rooms).await?;
    let mut out = app
        .store
        .read(move |c| build(c, &ctx, rooms, typing))
        .await?;
    out.has_data |= !presence.is_empty();
    out.body["presence"] = json!({ "events": presence });
    Ok(out)
}

/// Everything one sync computation needs besides the database.
#[derive(Clone)]
struct Ctx {
    who: Authed,
    since: Option<Since>,
    upto: Since,
    filter: SyncFilter,
    full_state: bool,
    now: u64,
    lazy: std::sync::Arc<LazyMembers>,
}

impl Ctx {
    fn device(&self) -> DeviceKey {
        (self.who.user_id.to_string(), self.who.device_id.to_string())
    }
}

/// Builds the response from the user's own rooms only: a room is looked at when the user's
/// membership changed in `(since, upto]` or when it has events or receipts in that range
/// (one indexed probe per room), never by scanning what changed server-wide.
fn build(
    c: &Connection,
    ctx: &Ctx,
    rooms: Vec<(String, String, i64)>,
    typing: Map<String, Value>,
) -> Result<SyncOutput> {
    // Sticky events first: when more are due than one response carries, the whole response
    // stops at the position of the last one it carries (see `sticky_due`).
    let joined: Vec<String> = rooms
        .iter()
        .filter(|(_, m, _)| m == "join")
        .map(|(r, _, _)| r.clone())
        .collect();
    let (mut sticky, stop) = sticky_due(c, ctx, &joined)?;
    let held_back = stop.is_some();
    let shortened;
    let ctx = match stop {
        Some(pos) => {
            shortened = Ctx {
                upto: Since {
                    pos,
                    eph: ctx.upto.eph,
                    td: pos,
                },
                ..ctx.clone()
            };
            &shortened
        }
        None => ctx,
    };
    let (since, upto, filter) = (ctx.since, ctx.upto, &ctx.filter);
    let user = ctx.who.user_id.as_str();
    let since_pos = since.map(|s| s.pos).unwrap_or(0);
    if since.is_none() {
        ctx.lazy.reset(&ctx.device());
    }
    let account_data = q::list_account_data_between(c, user, since_pos, upto.pos)?;
    let forgotten: HashSet<String> = q::list_forgotten_rooms(c, user)?.into_iter().collect();
    let e2ee = e2ee_sections(c, ctx, &rooms)?;

    let (mut join, mut invite, mut leave, mut knock) =
        (Map::new(), Map::new(), Map::new(), Map::new());
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
                use crate::ops::partial::{sync_view, SyncView};
                let view = sync_view(
                    c,
                    &room,
                    filter.lazy_load_members,
                    since.map(|s| s.pos),
                    upto.pos,
                )?;
                if view == SyncView::Hidden {
                    continue;
                }
                // New to this client: the whole room, timeline unbounded below.
                let fresh = since.is_none() || mpos > since_pos || view == SyncView::Fresh;
                let typing_ev = typing.get(&room).cloned();
                let room_sticky = sticky.remove(&room).unwrap_or_default();
                let counts = push::sync_counts(
                    c,
                    user,
                    &room,
                    filter.unread_thread_notifications,
                    (!fresh).then_some((since_pos, upto.pos)),
                )?;
                if !fresh
                    && !ctx.full_state
                    && !counts.changed
                    && room_ad.is_empty()
                    && typing_ev.is_none()
                    && room_sticky.is_empty()
                    && !q::room_changed_between(c, &room, since_pos, upto.pos)?
                {
                    continue;
                }
                let window = Window {
                    since: (!fresh).then_some(since_pos),
                    upto: upto.pos,
                    full_state: fresh || ctx.full_state,
                };
                let mut r = joined_room(c, ctx, &room, window)?;
                let mut ephemeral: Vec<Value> = typing_ev.into_iter().collect();
                if let Some(rec) =
                    receipts(c, &room, user, if fresh { 0 } else { since_pos }, upto.pos)?
                {
                    ephemeral.push(rec);
                }
                r["ephemeral"] = json!({ "events": ephemeral });
                // Sticky events not already in this response's (filtered) timeline.
                let in_timeline: HashSet<&str> = r["timeline"]["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["event_id"].as_str())
                    .collect();
                let ids: Vec<String> = room_sticky
                    .into_iter()
                    .filter(|id| !in_timeline.contains(id.as_str()))
                    .collect();
                let has_sticky = !ids.is_empty();
                if has_sticky {
                    let viewer = Viewer {
                        user_id: user,
                        device_id: ctx.who.device_id.as_str(),
                    };
                    let rows = q::get_events(c, ids)?;
                    r[STICKY_SECTION] =
                        json!({ "events": client_events(c, &rows, Some(viewer), ctx.now, false)? });
                }
                r["account_data"] = json!({ "events": room_ad });
                counts.apply(&mut r);
                let empty = !fresh
                    && !ctx.full_state
                    && !counts.changed
                    && r["timeline"]["events"].as_array().is_none_or(Vec::is_empty)
                    && ephemeral.is_empty()
                    && room_ad.is_empty()
                    && !has_sticky
                    && r["state"]["events"].as_array().is_none_or(Vec::is_empty);
                if !empty {
                    join.insert(room, r);
                }
            }
            "invite" if since.is_none() || mpos > since_pos => {
                // A remote invite to a room we are not in: the stripped state it came with.
                // Otherwise the room's, with the inviter's member event; then the invite itself.
                let own = match q::get_current_state(c, &room, "m.room.member", user)? {
                    Some(id) => q::get_event(c, &id)?,
                    None => None,
                };
                let mut events = match q::get_invite_state(c, &room, user)? {
                    Some(s) => serde_json::from_str::<Vec<Value>>(&s).unwrap_or_default(),
                    None => stripped_state(c, &room, own.as_ref().map(|r| r.sender.as_str()))?,
                };
                if let Some(row) = own {
                    let v: Value = serde_json::from_str(&row.json)?;
                    events.push(json!({ "type": "m.room.member", "state_key": user, "sender": v["sender"], "content": v["content"] }));
                }
                invite.insert(room, json!({ "invite_state": { "events": events } }));
            }
            "knock" if since.is_none() || mpos > since_pos => {
                knock.insert(room.clone(), super::knock::knocked_room(c, &room, user)?);
            }
            // A forgotten room is left out of initial syncs only: a leave that is new since
            // the token is still sent, as Synapse does, because clients forget a room right
            // after leaving it (the matrix-rust-sdk forgets every invite it declines) and then
            // wait for the leave to come down the long-poll.
            "leave" | "ban"
                if (since.is_some() && mpos > since_pos)
                    || (since.is_none() && filter.include_leave && !forgotten.contains(&room)) =>
            {
                // The timeline runs up to the leave event; nothing after it is visible.
                let window = Window {
                    since: since.map(|_| since_pos),
                    upto: mpos,
                    full_state: since.is_none() || ctx.full_state,
                };
                let r = joined_room(c, ctx, &room, window)?;
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
    let has_data = !join.is_empty()
        || !invite.is_empty()
        || !leave.is_empty()
        || !knock.is_empty()
        || !global_ad.is_empty()
        || held_back
        || e2ee.has_data;
    let mut body = json!({
        "next_batch": format_token(upto, e2ee.td),
        "rooms": { "join": join, "invite": invite, "leave": leave, "knock": knock },
        "account_data": { "events": global_ad },
        "presence": { "events": [] },
    });
    if let Some(o) = body.as_object_mut() {
        o.extend(e2ee.sections);
    }
    Ok(SyncOutput {
        body,
        has_data,
        joined,
        to_device_acked: e2ee.acked,
    })
}

/// The end-to-end encryption parts of a response.
struct E2eeSync {
    /// `to_device`, `device_lists`, `device_one_time_keys_count`,
    /// `device_unused_fallback_key_types`.
    sections: Map<String, Value>,
    has_data: bool,
    /// The to-device mark of the next token.
    td: i64,
    acked: Option<i64>,
}

/// To-device messages after the token's to-device mark, device-list changes (incremental
/// syncs only: an initial sync makes the client query every user anyway), and the device's
/// key counts.
fn e2ee_sections(c: &Connection, ctx: &Ctx, rooms: &[(String, String, i64)]) -> Result<E2eeSync> {
    let (user, device) = (ctx.who.user_id.as_str(), ctx.who.device_id.as_str());
    let after = ctx.since.map(|s| s.td).unwrap_or(0);
    let (events, td) = to_device::for_sync(c, user, device, after, ctx.upto.pos)?;
    let acked = match ctx.since {
        Some(s) if crate::store::e2ee::has_to_device_upto(c, user, device, s.td)? => Some(s.td),
        _ => None,
    };
    let (changed, left) = match ctx.since {
        Some(s) => keys::device_lists(c, user, rooms, s.pos, ctx.upto.pos)?,
        None => Default::default(),
    };
    let (counts, fallback) = keys::key_counts(c, user, device)?;
    let has_data = !events.is_empty() || !changed.is_empty() || !left.is_empty();
    let mut sections = Map::new();
    sections.insert("to_device".into(), json!({ "events": events }));
    sections.insert(
        "device_lists".into(),
        json!({ "changed": changed, "left": left }),
    );
    sections.insert("device_one_time_keys_count".into(), Value::Object(counts));
    sections.insert("device_unused_fallback_key_types".into(), json!(fallback));
    Ok(E2eeSync {
        sections,
        has_data,
        td,
        acked,
    })
}

/// The `/sync` section of a joined room that carries its sticky events (MSC4354, unstable).
const STICKY_SECTION: &str = "msc4354_sticky";

/// Sticky event IDs due in a response, by room.
type StickyByRoom = HashMap<String, Vec<String>>;

/// The most sticky events one `/sync` response carries (the MSC's suggestion).
pub const STICKY_PER_RESPONSE: usize = 100;

/// The sticky events due in this response, by room (event IDs), and the position the response
/// must stop at when more are due than [`STICKY_PER_RESPONSE`].
///
/// A sticky event enters a user's sticky stream at `key` = the later of its stream position
/// and the start of the user's current membership run in the room, so every live sticky event
/// of a room the user has just joined arrives with the join, whatever the history visibility
/// (a sticky event reaches every member while it is sticky). Due: live at `now`, in a room the
/// user is joined to, `since < key <= upto`. When more than the limit are due, the response
/// ends at the key of the last one it carries: everything up to there (timeline, state,
/// sticky events) is delivered and the next response goes on from it, so none is lost or sent
/// twice. Events sharing one key (those entering at a join) are never split, so a join into
/// a room with more live sticky events than the limit brings them all at once.
fn sticky_due(c: &Connection, ctx: &Ctx, joined: &[String]) -> Result<(StickyByRoom, Option<i64>)> {
    let user = ctx.who.user_id.as_str();
    let since = ctx.since.map(|s| s.pos).unwrap_or(i64::MIN);
    let now = ctx.now as i64;
    let joined: HashSet<&str> = joined.iter().map(String::as_str).collect();
    let mut due: Vec<(i64, i64, String, String)> = Vec::new();
    for room in crate::store::sticky::rooms_with_live_sticky(c, now)? {
        if !joined.contains(room.as_str()) || !ctx.filter.wants_room(&room) {
            continue;
        }
        let Some(run) = crate::store::sticky::join_run_start(c, &room, user)? else {
            continue;
        };
        for row in crate::store::sticky::list_live_sticky(c, &room, now, ctx.upto.pos)? {
            let key = row.pos.max(run);
            if key > since && key <= ctx.upto.pos {
                due.push((key, row.pos, room.clone(), row.event_id));
            }
        }
    }
    due.sort();
    let stop = match due.get(STICKY_PER_RESPONSE) {
        Some(first_left) if first_left.0 > due[STICKY_PER_RESPONSE - 1].0 => {
            Some(due[STICKY_PER_RESPONSE - 1].0)
        }
        // The limit falls inside one key: that key's events all go, the rest wait.
        Some(first_left) => due
            .iter()
            .find(|d| d.0 > first_left.0)
            .map(|_| first_left.0),
        None => None,
    };
    let mut by_room = StickyByRoom::new();
    for (key, _, room, id) in due {
        if stop.is_some_and(|s| key > s) {
            break;
        }
        by_room.entry(room).or_default().push(id);
    }
    Ok((by_room, stop))
}

/// What part of a room's history one response covers.
#[derive(Clone, Copy)]
struct Window {
    /// The client knows the room up to here (`None`: nothing yet; the timeline is then
    /// bounded only by its limit and the user's visibility).
    since: Option<i64>,
    upto: i64,
    /// Send the whole state at the timeline's start (new room, or `full_state=true`), not
    /// only what changed since `since`. Never widens the timeline.
    full_state: bool,
}

/// One joined (or left) room: timeline in `(since, upto]`, state, summary.
fn joined_room(c: &Connection, ctx: &Ctx, room: &str, w: Window) -> Result<Value> {
    let filter = &ctx.filter;
    let user = ctx.who.user_id.as_str();
    let viewer = Viewer {
        user_id: user,
        device_id: ctx.who.device_id.as_str(),
    };
    let (since, upto) = (w.since, w.upto);
    let limit = filter.timeline_limit;
    // A user who never joined (a rejected invite, a ban before joining) sees only the event
    // that ended their membership, and no room state. Database errors stay errors.
    let (lo, outsider) = match super::events::visible_range(c, room, user) {
        Ok((lo, _)) => (lo, false),
        Err(e) if e.status == 403 || e.status == 404 => (upto - 1, true),
        Err(e) => return Err(e),
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
    // Full state at the timeline's start for a room new to the client (or `full_state`);
    // for a gap, the state that changed between `since` and the timeline's start.
    let state_ids: Vec<String> = match since {
        _ if outsider => Vec::new(),
        _ if w.full_state => {
            // The state at the timeline's start; when nothing of the room precedes the
            // timeline here (a room joined through another server: what came before is held
            // as outliers), the state with the first timeline event, minus the timeline.
            let in_timeline: HashSet<&str> = timeline.iter().map(|r| r.event_id.as_str()).collect();
            let group = match q::get_state_group_at(c, room, start)? {
                Some(g) => Some(g),
                None => timeline.first().and_then(|r| r.state_group),
            };
            match group {
                Some(g) => q::load_state_group(c, g)?
                    .into_iter()
                    .filter(|((t, k), e)| {
                        !in_timeline.contains(e.as_str())
                            && (!filter.lazy_load_members || t != "m.room.member" || k == user)
                    })
                    .map(|(_, e)| e)
                    .collect(),
                None => Vec::new(),
            }
        }
        // Incremental: the state entries that changed in `(since, upto]` and are not in the
        // timeline: changes before a limited timeline's start, and state resets (resolution
        // changing the state without a new event; they take a fresh position).
        Some(s) => {
            let in_timeline: HashSet<&str> = timeline.iter().map(|r| r.event_id.as_str()).collect();
            q::list_current_state_ids_between(c, room, s, upto)?
                .into_iter()
                .filter(|id| !in_timeline.contains(id.as_str()))
                .collect()
        }
        None => Vec::new(),
    };
    let mut state_rows = q::get_events(c, state_ids)?;
    if filter.lazy_load_members && !outsider {
        // The member events of the timeline's senders that this device lacks, whether or
        // not the timeline is limited (those after the timeline's start are in it).
        let members: Vec<EventRow> = lazy_members_of(c, room, &timeline)?
            .into_iter()
            .filter(|r| r.pos <= start)
            .collect();
        let device = ctx.device();
        let members = match since {
            Some(s) if !w.full_state => ctx.lazy.unsent(&device, room, s, members),
            _ => members,
        };
        state_rows.extend(members);
    }
    state_rows.sort_by_key(|r| r.pos);
    state_rows.dedup_by(|a, b| a.event_id == b.event_id);
    if filter.lazy_load_members {
        // Whatever member events this response carries, in the state or the timeline.
        let device = ctx.device();
        ctx.lazy.record(&device, room, ctx.upto.pos, &state_rows);
        ctx.lazy.record(&device, room, ctx.upto.pos, &timeline);
    }
    let mut out = json!({
        "timeline": {
            "events": client_events(c, &timeline, Some(viewer), ctx.now, false)?,
            "limited": limited,
            "prev_batch": format!("t{start}"),
        },
        "state": { "events": client_events(c, &state_rows, Some(viewer), ctx.now, false)? },
    });
    let members_changed = w.full_state
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
