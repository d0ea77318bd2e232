//! Events: send, state, redact, `/messages`, `/members`, `/joined_members`, `/event`,
//! `/context`.
//!
//! Who may read what: a joined user reads the room's history (within its history
//! visibility); a user who left or was banned reads up to their leaving; anyone reads a
//! `world_readable` room. `visible_range` is the one place that decides.

use std::sync::Arc;

use crate::store::{
    history::{self as h, Bounds, TopoKey},
    Connection,
};
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
pub fn visible_state(conn: &Connection, room_id: &str, user_id: &str) -> Result<Vec<EventRow>> {
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

/// A pagination token. `/messages` and `/context` hand out places in the topological order,
/// `t<depth>-<pos>` (Synapse's shape); stream positions are accepted too: `/sync`'s
/// `prev_batch` and older Hearth tokens (`t<pos>`), and `/sync`'s `next_batch` (`s<pos>_…`).
///
/// A token sits *between* events: the events at or before it are those with a key (or, for a
/// stream token, a position) at most its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    Stream(i64),
    Topo(TopoKey),
}

impl Token {
    pub fn parse(t: &str) -> Result<Self> {
        let bad = || Error::invalid_param("Invalid pagination token");
        if let Some(rest) = t.strip_prefix('t') {
            // The separator is the first '-' after the depth's first character (a stream
            // part may be negative: backfilled history).
            return match rest.get(1..).and_then(|r| r.find('-')).map(|i| i + 1) {
                Some(i) => Ok(Self::Topo((
                    rest[..i].parse().map_err(|_| bad())?,
                    rest[i + 1..].parse().map_err(|_| bad())?,
                ))),
                None => rest.parse().map(Self::Stream).map_err(|_| bad()),
            };
        }
        t.strip_prefix('s')
            .and_then(|s| s.split('_').next())
            .and_then(|d| d.parse().ok())
            .map(Self::Stream)
            .ok_or_else(bad)
    }

    /// The stream position a stream reader (the state at a token) uses.
    pub fn stream_pos(self) -> i64 {
        match self {
            Self::Stream(p) | Self::Topo((_, p)) => p,
        }
    }

    /// Narrows `b` to the events at or before this token.
    fn at_or_before(self, b: &mut Bounds) {
        match self {
            Self::Stream(p) => b.pos_hi = b.pos_hi.min(p),
            Self::Topo(k) => b.topo_hi = b.topo_hi.min(k),
        }
    }

    /// Whether this token stands below the topological key `k` (a stream token is taken as
    /// not: it names no place in the topology).
    fn below(self, k: TopoKey) -> bool {
        matches!(self, Self::Topo(t) if t < k)
    }

    /// Narrows `b` to the events after this token.
    fn after(self, b: &mut Bounds) {
        match self {
            Self::Stream(p) => b.pos_lo = b.pos_lo.max(p),
            Self::Topo(k) => b.topo_lo = b.topo_lo.max(k),
        }
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stream(p) => write!(f, "t{p}"),
            Self::Topo((d, p)) => write!(f, "t{d}-{p}"),
        }
    }
}

/// The stream position of a pagination token (`/members`' `at`).
pub fn parse_pos_token(t: &str) -> Result<i64> {
    Token::parse(t).map(Token::stream_pos)
}

/// [`visible_range`] as bounds in the topological order, so history backfilled after the
/// user's join (which has later stream positions) is judged by where it sits in the room.
pub fn visible_bounds(conn: &Connection, room_id: &str, user_id: &str) -> Result<Bounds> {
    let (lo, hi) = visible_range(conn, room_id, user_id)?;
    let mut b = Bounds::default();
    if lo != 0 {
        b.topo_lo = match h::get_topo_key_after(conn, room_id, lo)? {
            Some((d, p)) => (d, p - 1),
            None => (i64::MAX, i64::MAX),
        };
    }
    if hi != i64::MAX {
        b.topo_hi =
            h::get_topo_key_at_or_before(conn, room_id, hi)?.unwrap_or((i64::MIN, i64::MIN));
    }
    Ok(b)
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

    /// Whether events of this type pass the filter's `types` and `not_types`.
    pub fn allows_type(&self, kind: &str) -> bool {
        !self.not_types.iter().any(|p| type_matches(p, kind))
            && self
                .types
                .as_ref()
                .is_none_or(|t| t.iter().any(|p| type_matches(p, kind)))
    }

    pub fn allows(&self, row: &EventRow) -> bool {
        self.allows_parts(&row.kind, &row.sender)
    }

    /// The filter on an event's type and sender (also for events that are not rows, such as
    /// presence).
    pub fn allows_parts(&self, kind: &str, sender: &str) -> bool {
        if self.not_senders.iter().any(|s| s == sender) {
            return false;
        }
        self.allows_type(kind)
            && self
                .senders
                .as_ref()
                .is_none_or(|s| s.iter().any(|x| x == sender))
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
/// Most backward extremities one backfill asks about.
const MAX_EXTREMITIES: usize = 20;
/// Most backfills one `/messages` waits for.
const MAX_BACKFILL_ROUNDS: usize = 3;

/// What one `/messages` asks for.
struct PageRequest {
    room_id: String,
    user_id: String,
    backward: bool,
    from: Option<Token>,
    to: Option<Token>,
    filter: EventFilter,
    limit: usize,
    /// The server's clock: which sticky events are live.
    now: i64,
}

/// One scan of a room's history in topological order.
struct Page {
    chunk: Vec<EventRow>,
    /// Where the next page starts (`None`: nothing was scanned, it is `from`).
    next: Option<Token>,
    /// The scan reached the end of what we hold in its direction (or the bound it was given).
    exhausted: bool,
    /// When a backward scan ran out of events and nothing but the room's beginning bounds it
    /// (no `to`, no history visibility limit): the backward extremities below it, where a
    /// backfill from another server would add history.
    extremities: Vec<String>,
}

/// Scans events from `from` in the asked direction, applying the filter, until `limit`
/// events are found, [`MAX_SCAN`] rows were scanned, or the events run out.
fn scan_page(c: &Connection, r: &PageRequest) -> Result<Page> {
    let vis = visible_bounds(c, &r.room_id, &r.user_id)?;
    let mut b = vis;
    if let Some(from) = r.from {
        if r.backward {
            from.at_or_before(&mut b);
        } else {
            from.after(&mut b);
        }
    }
    if let Some(to) = r.to {
        if r.backward {
            to.after(&mut b);
        } else {
            to.at_or_before(&mut b);
        }
    }
    let (mut chunk, mut next) = (Vec::new(), None);
    let (mut scanned, mut exhausted) = (0, false);
    let hidden_below = vis.topo_lo != Bounds::default().topo_lo;
    if !r.backward && hidden_below {
        // Forwards from below what history visibility lets this user see: first the room's
        // live sticky events down there (MSC4354: not hidden from a joined member), paged like
        // the rest; the scan below then goes on from the visible history.
        if let Some(from) = r.from.filter(|f| f.below(vis.topo_lo)) {
            if q::get_membership(c, &r.room_id, &r.user_id)?.as_deref() == Some("join") {
                let mut hb = Bounds::default();
                from.after(&mut hb);
                if let Some(to) = r.to {
                    to.at_or_before(&mut hb);
                }
                hb.topo_hi = hb.topo_hi.min(vis.topo_lo);
                (hb.pos_lo, hb.pos_hi) = (b.pos_lo, b.pos_hi);
                let rows = crate::store::sticky::list_live_sticky_topo(
                    c, &r.room_id, &hb, r.limit, r.now, false,
                )?;
                for (depth, row) in rows {
                    next = Some(Token::Topo((depth, row.pos)));
                    if r.filter.allows(&row) {
                        chunk.push(row);
                    }
                }
            }
        }
    }
    while chunk.len() < r.limit && scanned < MAX_SCAN {
        // One row more than needed: when it comes back, more follows (this response did not
        // reach the end); when it does not and every row was used, the end was reached.
        let want = (r.limit - chunk.len()).max(16).min(MAX_SCAN - scanned);
        let rows = h::list_room_events_topo(c, &r.room_id, &b, want + 1, r.backward)?;
        let n = rows.len();
        let mut consumed = 0;
        for (depth, row) in rows {
            if chunk.len() == r.limit || scanned == MAX_SCAN {
                break;
            }
            consumed += 1;
            scanned += 1;
            let key = if r.backward {
                b.topo_hi = (depth, row.pos - 1);
                b.topo_hi
            } else {
                b.topo_lo = (depth, row.pos);
                b.topo_lo
            };
            next = Some(Token::Topo(key));
            if r.filter.allows(&row) {
                chunk.push(row);
            }
        }
        if consumed == n && n <= want {
            exhausted = true;
            break;
        }
    }
    if r.backward && exhausted && hidden_below {
        // Below what history visibility lets this user see: the room's live sticky events,
        // which it does not hide from a joined member (MSC4354). Paged like the rest: a full
        // page with one of them left ends where it stopped (with an `end`), and the next page
        // from there finds only these.
        if q::get_membership(c, &r.room_id, &r.user_id)?.as_deref() == Some("join") {
            let mut hb = Bounds::default();
            if let Some(to) = r.to {
                to.after(&mut hb);
            }
            hb.topo_hi = b.topo_hi.min(vis.topo_lo);
            (hb.pos_lo, hb.pos_hi) = (b.pos_lo, b.pos_hi);
            let want = r.limit - chunk.len();
            let rows = crate::store::sticky::list_live_sticky_topo(
                c,
                &r.room_id,
                &hb,
                want + 1,
                r.now,
                true,
            )?;
            for (i, (depth, row)) in rows.into_iter().enumerate() {
                if i == want {
                    exhausted = false;
                    break;
                }
                b.topo_hi = (depth, row.pos - 1);
                next = Some(Token::Topo(b.topo_hi));
                if r.filter.allows(&row) {
                    chunk.push(row);
                }
            }
        }
    }
    let open_below = r.backward && r.to.is_none() && !hidden_below;
    let extremities = if exhausted && open_below {
        h::list_backward_extremities(c, &r.room_id, MAX_EXTREMITIES)?
    } else {
        Vec::new()
    };
    Ok(Page {
        chunk,
        next,
        exhausted,
        extremities,
    })
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/messages`
///
/// Pages by topology (depth, then stream position), so history backfilled later comes
/// before what users have seen. Going backwards past the oldest event held, where the room's
/// history before our join is missing, the history is backfilled from another server in the
/// room first (shared by concurrent requests; on failure, the answer is what we hold).
///
/// `end` is given whenever more might follow, and left out only when this response reached
/// the room's beginning (backwards) or its latest event (forwards), or the bound of what the
/// user may see: a client paging until `end` is absent misses nothing, whatever the filter
/// dropped or the scan limit cut.
pub async fn messages(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let app = req.state().clone();
    // A `limit` in the query wins over the filter's; ruma fills in 10 when it is absent.
    let limit_in_query = req.url().query_pairs().any(|(k, _)| k == "limit");
    let b: get_message_events::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    let backward = b.dir == Direction::Backward;
    let filter = room_filter(&b.filter)?;
    let limit = if limit_in_query {
        usize::try_from(u64::from(b.limit)).unwrap_or(usize::MAX)
    } else {
        filter.limit.unwrap_or(10)
    }
    .clamp(1, 1000);
    let r = Arc::new(PageRequest {
        room_id: b.room_id.to_string(),
        user_id: who.user_id.to_string(),
        backward,
        from: b.from.as_deref().map(Token::parse).transpose()?,
        to: b.to.as_deref().map(Token::parse).transpose()?,
        filter,
        limit,
        now: app.clock.now_ms() as i64,
    });
    let start = r.from.unwrap_or(if backward {
        Token::Stream(app.notifier.pos())
    } else {
        // Before every event, backfilled history included.
        Token::Topo((-1, 0))
    });
    let scan = |r: &Arc<PageRequest>| {
        let r = r.clone();
        app.store.read(move |c| scan_page(c, &r))
    };
    let mut page = scan(&r).await?;
    let mut progressed = false;
    for _ in 0..MAX_BACKFILL_ROUNDS {
        if page.extremities.is_empty() || page.chunk.len() == limit {
            break;
        }
        progressed = matches!(
            crate::ops::federation::backfill_shared(&app, &b.room_id, page.extremities.clone())
                .await,
            Ok(n) if n > 0
        );
        if !progressed {
            break;
        }
        page = scan(&r).await?;
    }
    // History we may still fetch counts as "more might follow", unless fetching it failed.
    let more = !page.exhausted
        || (!page.extremities.is_empty() && (progressed || page.chunk.len() == limit));
    let now = app.clock.now_ms();
    let out = app
        .store
        .read(move |c| {
            let state = if r.filter.lazy_load_members {
                lazy_members_of(c, &r.room_id, &page.chunk)?
            } else {
                Vec::new()
            };
            let v = Some(viewer(&who));
            let mut out = json!({
                "chunk": client_events(c, &page.chunk, v, now, true)?,
                "start": start.to_string(),
            });
            if more {
                out["end"] = page.next.unwrap_or(start).to_string().into();
            }
            if !state.is_empty() {
                out["state"] = client_events(c, &state, v, now, true)?.into();
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
    // A partial-state room's member list is incomplete until its resync.
    crate::ops::partial::wait_fully_stated(&app, &room_id).await?;
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
    crate::ops::partial::wait_fully_stated(req.state(), &room_id).await?;
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

/// Loads an event of `room_id` that the user may see, or `M_NOT_FOUND`; with its place in
/// the topological order.
///
/// History visibility does not hide a live sticky event from a joined member (MSC4354).
fn visible_event(
    conn: &Connection,
    room_id: &str,
    event_id: &str,
    user_id: &str,
    now: u64,
) -> Result<(EventRow, TopoKey)> {
    let vis = visible_bounds(conn, room_id, user_id)?;
    let not_found = || Error::not_found("Event not found");
    let row = q::get_event(conn, event_id)?.ok_or_else(not_found)?;
    let depth = q::get_event_depth(conn, event_id)?.ok_or_else(not_found)?;
    let key = (depth, row.pos);
    if q::get_event_room(conn, event_id)?.as_deref() != Some(room_id)
        || !crate::store::sticky::is_in_room(conn, event_id)?
    {
        return Err(not_found());
    }
    let hidden = key <= vis.topo_lo || key > vis.topo_hi;
    if hidden && !live_sticky_for_member(conn, room_id, event_id, user_id, now)? {
        return Err(not_found());
    }
    Ok((row, key))
}

/// Whether `event_id` is a live sticky event and `user_id` a joined member of its room.
fn live_sticky_for_member(
    conn: &Connection,
    room_id: &str,
    event_id: &str,
    user_id: &str,
    now: u64,
) -> Result<bool> {
    let live = crate::store::sticky::get_sticky_expiry(conn, event_id)?
        .is_some_and(|exp| exp > now as i64);
    Ok(live && q::get_membership(conn, room_id, user_id)?.as_deref() == Some("join"))
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
            let (row, _) = visible_event(c, &room_id, &event_id, who.user_id.as_str(), now)?;
            client_event(c, &row, Some(viewer(&who)), now, true)
        })
        .await?;
    json(&out)
}

/// The events around the one at `key` that the user may see: `n.0` before it (newest first)
/// and `n.1` after it, with the tokens where paging on from either side starts.
pub struct Around {
    pub before: Vec<EventRow>,
    pub start: Option<Token>,
    pub after: Vec<EventRow>,
    pub end: Option<Token>,
}

/// [`Around`] for `/context` and `/search`'s `event_context`.
pub fn around(
    c: &Connection,
    room_id: &str,
    user_id: &str,
    key: TopoKey,
    filter: &EventFilter,
    n: (usize, usize),
    now: i64,
) -> Result<Around> {
    let page = |backward: bool, n: usize| {
        let r = PageRequest {
            room_id: room_id.to_owned(),
            user_id: user_id.to_owned(),
            backward,
            from: Some(Token::Topo(if backward { (key.0, key.1 - 1) } else { key })),
            to: None,
            filter: filter.clone(),
            limit: n,
            now,
        };
        if n == 0 {
            return Ok((Vec::new(), r.from));
        }
        let p = scan_page(c, &r)?;
        Ok::<_, Error>((p.chunk, p.next.or(r.from)))
    };
    let (before, start) = page(true, n.0)?;
    let (after, end) = page(false, n.1)?;
    Ok(Around {
        before,
        start,
        after,
        end,
    })
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
            let (row, key) = visible_event(c, &room_id, &event_id, who.user_id.as_str(), now)?;
            let before_n = limit / 2;
            let Around {
                before,
                start,
                after,
                end,
            } = around(
                c,
                &room_id,
                who.user_id.as_str(),
                key,
                &filter,
                (before_n, limit - before_n),
                now as i64,
            )?;
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
                "start": start.map(|t| t.to_string()),
                "end": end.map(|t| t.to_string()),
                "state": client_events(c, &state_rows, v, now, true)?,
            }))
        })
        .await?;
    json(&out)
}
