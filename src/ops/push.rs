//! Push rules that run: each new room event is evaluated against the push rules of every local
//! member (ruma's `Ruleset::get_actions`), and the events whose actions notify become
//! notification rows, the per-room counts `/sync` shows and the queue the push sender drains.
//!
//! The evaluator (`workers::push`) works in batches off the writer's critical path: a read
//! ([`evaluate`]) walks the events after its durable position and evaluates them, then one
//! write ([`commit`]) stores the rows, the queue and the new position together, after checking
//! that the position is still the one the batch started from. A kill at any point leaves either
//! the whole batch or none of it: no event is counted twice or missed.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::{
    events::room::power_levels::{RoomPowerLevels, RoomPowerLevelsEventContent},
    push::{Action, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
    serde::Raw,
    OwnedRoomId, OwnedUserId, RoomVersionId, UInt,
};
use serde_json::{json, Map, Value};

use crate::{
    error::{Error, Result},
    notify::Topic,
    store::{push as sp, queries as q, Connection, Tx},
};

/// Events evaluated per batch (each costs one evaluation per local member).
pub const BATCH: usize = 50;

/// Parsed rule sets by user, with the position of the account data they came from: a rule
/// change moves the position, so a stale entry is never used. Locked only inside the
/// evaluator's read closure (no `.await` while held).
#[derive(Default)]
pub struct RulesCache(Mutex<HashMap<String, (i64, Arc<Ruleset>)>>);

impl RulesCache {
    fn get(&self, c: &Connection, user: &str) -> Result<Arc<Ruleset>> {
        let pos = sp::get_push_rules_pos(c, user)?.unwrap_or(0);
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((p, rules)) = m.get(user) {
            if *p == pos {
                return Ok(rules.clone());
            }
        }
        let rules = Arc::new(load_rules(c, user)?);
        m.insert(user.to_owned(), (pos, rules.clone()));
        Ok(rules)
    }
}

/// A user's rule set: their `m.push_rules` account data, or the defaults.
pub fn load_rules(c: &Connection, user: &str) -> Result<Ruleset> {
    let uid = OwnedUserId::try_from(user).map_err(Error::internal)?;
    match q::get_account_data(c, user, "", "m.push_rules")? {
        Some(s) => {
            let v: Value = serde_json::from_str(&s)?;
            serde_json::from_value(v["global"].clone()).map_err(Error::internal)
        }
        None => Ok(default_rules(&uid)),
    }
}

/// A new user's rules: the spec's predefined rules (ruma's) plus the legacy mention rules
/// Synapse 1.163 still has by default (`.m.rule.contains_display_name`, `.m.rule.roomnotif`,
/// `.m.rule.contains_user_name`; the spec dropped them in favour of `m.mentions`). Without
/// them a message that names a user in its body only (clients and bridges that send no
/// `m.mentions`) highlights on Synapse and not here; with them the counts are the same
/// (`tests/push_synapse.rs`). Evaluation skips them for events that carry `m.mentions`.
pub fn default_rules(user: &ruma::UserId) -> Ruleset {
    let base = Ruleset::server_default(user);
    let Ok(mut v) = serde_json::to_value(&base) else {
        return base;
    };
    let highlight = json!(["notify", { "set_tweak": "sound", "value": "default" }, { "set_tweak": "highlight" }]);
    let display_name = json!({
        "rule_id": ".m.rule.contains_display_name", "default": true, "enabled": true,
        "conditions": [{ "kind": "contains_display_name" }],
        "actions": highlight,
    });
    let room_notif = json!({
        "rule_id": ".m.rule.roomnotif", "default": true, "enabled": true,
        "conditions": [
            { "kind": "sender_notification_permission", "key": "room" },
            { "kind": "event_match", "key": "content.body", "pattern": "@room" },
        ],
        "actions": ["notify", { "set_tweak": "highlight" }],
    });
    let user_name = json!({
        "rule_id": ".m.rule.contains_user_name", "default": true, "enabled": true,
        "pattern": user.localpart(),
        "actions": highlight,
    });
    // Synapse's order: each legacy rule right after its `m.mentions` successor.
    if let Some(rules) = v["override"].as_array_mut() {
        for (after, rule) in [
            (".m.rule.is_user_mention", display_name),
            (".m.rule.is_room_mention", room_notif),
        ] {
            let at = rules
                .iter()
                .position(|r| r["rule_id"] == after)
                .map_or(rules.len(), |i| i + 1);
            rules.insert(at, rule);
        }
    }
    match v["content"].as_array_mut() {
        Some(rules) => rules.insert(0, user_name),
        None => v["content"] = json!([user_name]),
    }
    serde_json::from_value(v).unwrap_or(base)
}

/// One notifying event for one user.
pub struct Notification {
    pub user: String,
    pub room: String,
    pub pos: i64,
    pub event_id: String,
    pub thread: String,
    pub highlight: bool,
    /// Whether to push it to the user's pushers (`notify`, not only in-app).
    pub remote: bool,
    pub actions: String,
    pub ts: i64,
}

/// What one batch found: positions `(from, to]` evaluated.
pub struct Batch {
    /// How many events it evaluated (a full batch means more may be waiting).
    pub events: usize,
    /// The stored position when the batch was read (at or below `from`: batches that found
    /// nothing move only the evaluator's in-memory position, and write nothing).
    pub stored: i64,
    pub from: i64,
    pub to: i64,
    pub found: Vec<Notification>,
}

/// What the evaluation of a room needs, read once per room per batch.
struct RoomCtx {
    members: Vec<sp::Member>,
    count: u64,
    power: Option<PushConditionPowerLevelsCtx>,
}

fn room_ctx(c: &Connection, room: &str, server: &str) -> Result<RoomCtx> {
    let (members, count) = sp::list_joined_local(c, room, server)?;
    Ok(RoomCtx {
        members,
        count,
        power: power_ctx(c, room)?,
    })
}

/// The room's power levels for `sender_notification_permission` (`@room`).
fn power_ctx(c: &Connection, room: &str) -> Result<Option<PushConditionPowerLevelsCtx>> {
    let Some(version) = q::get_room_version(c, room)? else {
        return Ok(None);
    };
    let Some(rules) = RoomVersionId::try_from(version.as_str())
        .ok()
        .and_then(|v| v.rules())
    else {
        return Ok(None);
    };
    let content = |kind: &str| -> Result<Option<Value>> {
        let Some(id) = q::get_current_state(c, room, kind, "")? else {
            return Ok(None);
        };
        Ok(q::get_event(c, &id)?
            .and_then(|row| serde_json::from_str::<Value>(&row.json).ok())
            .map(|v| v["content"].clone()))
    };
    let creator = q::get_current_state(c, room, "m.room.create", "")?
        .and_then(|id| q::get_event(c, &id).ok().flatten())
        .and_then(|row| OwnedUserId::try_from(row.sender).ok());
    // A content the type refuses (strings for numbers in old rooms) falls back to defaults.
    let pl = content("m.room.power_levels")?
        .and_then(|v| serde_json::from_value::<RoomPowerLevelsEventContent>(v).ok());
    let levels = RoomPowerLevels::new(pl.into(), &rules.authorization, creator);
    Ok(Some(levels.into()))
}

/// The thread an event belongs to for counts: its thread root, or `main`.
fn thread_of(v: &Value) -> String {
    let rel = &v["content"]["m.relates_to"];
    match (rel["rel_type"].as_str(), rel["event_id"].as_str()) {
        (Some("m.thread"), Some(root)) => root.to_owned(),
        _ => "main".to_owned(),
    }
}

/// Evaluates the events after `from` (at most [`BATCH`]) for every local member of their rooms
/// who is joined at the event (and for a local invitee, so `.m.rule.invite_for_me` works). A
/// pure read: [`commit`] stores the outcome.
pub fn evaluate(
    c: &Connection,
    server: &str,
    cache: &RulesCache,
    stored: i64,
    from: i64,
) -> Result<Batch> {
    let events = sp::list_events_after(c, from, BATCH)?;
    let to = events.last().map(|(_, e)| e.pos).unwrap_or(from);
    let count = events.len();
    let mut rooms: HashMap<String, RoomCtx> = HashMap::new();
    let mut found = Vec::new();
    for (room, ev) in events {
        // Redacted before it was evaluated: it notifies nobody (a redaction removes the
        // notifications of an event evaluated earlier, `build::apply_redaction`).
        if ev.redacted_by.is_some() {
            continue;
        }
        let v: Value = serde_json::from_str(&ev.json)?;
        if !rooms.contains_key(&room) {
            rooms.insert(room.clone(), room_ctx(c, &room, server)?);
        }
        let ctx = &rooms[&room];
        let room_id = OwnedRoomId::try_from(room.as_str()).map_err(Error::internal)?;
        let raw: Raw<Value> =
            Raw::from_json(serde_json::value::RawValue::from_string(ev.json.clone())?);
        let mut targets: Vec<(&str, Option<&str>)> = ctx
            .members
            .iter()
            .filter(|m| m.since <= ev.pos && m.user_id != ev.sender)
            .map(|m| (m.user_id.as_str(), m.display_name.as_deref()))
            .collect();
        let invitee = match (ev.kind.as_str(), ev.state_key.as_deref()) {
            ("m.room.member", Some(k))
                if v["content"]["membership"] == "invite"
                    && k.ends_with(&format!(":{server}"))
                    && !targets.iter().any(|(u, _)| *u == k) =>
            {
                Some(k)
            }
            _ => None,
        };
        targets.extend(invitee.map(|k| (k, None)));
        let thread = thread_of(&v);
        for (user, name) in targets {
            let uid = OwnedUserId::try_from(user).map_err(Error::internal)?;
            let rules = cache.get(c, user)?;
            let mut pctx = PushConditionRoomCtx::new(
                room_id.clone(),
                UInt::new_saturating(ctx.count),
                uid,
                name.unwrap_or_default().to_owned(),
            );
            if let Some(p) = &ctx.power {
                pctx = pctx.with_power_levels(p.clone());
            }
            // ruma's evaluation is async only for thread subscriptions (a feature Hearth does
            // not enable): nothing in it waits, so it runs to completion here.
            let actions = futures_lite::future::block_on(rules.get_actions(&raw, &pctx));
            if !actions.iter().any(Action::should_notify) {
                continue;
            }
            found.push(Notification {
                user: user.to_owned(),
                room: room.clone(),
                pos: ev.pos,
                event_id: ev.event_id.clone(),
                thread: thread.clone(),
                highlight: actions.iter().any(Action::is_highlight),
                remote: actions.iter().any(|a| matches!(a, Action::Notify)),
                actions: serde_json::to_string(actions)?,
                ts: v["origin_server_ts"].as_i64().unwrap_or_default(),
            });
        }
    }
    Ok(Batch {
        events: count,
        stored,
        from,
        to,
        found,
    })
}

/// A batch that evaluates nothing (`push.evaluate` off): the events after `from`, passed over.
pub fn skip(c: &Connection, stored: i64, from: i64) -> Result<Batch> {
    let events = sp::list_events_after(c, from, BATCH)?;
    Ok(Batch {
        events: events.len(),
        stored,
        from,
        to: events.last().map_or(from, |(_, e)| e.pos),
        found: Vec::new(),
    })
}

/// Stores a batch in the caller's write: the notification rows, one queue row per pusher of
/// the user for pushed ones, a stream position announcing the changed counts to the users
/// concerned, and the evaluator's new position. Refused if the stored position moved since the
/// batch was read (it is then stale). Returns whether anything was queued for pushers.
///
/// Events between the stored position and `from` found nothing when they were evaluated; after
/// a restart they are evaluated again, which can only add what a rule changed since made
/// notify, never count anything twice.
pub fn commit(tx: &mut Tx<'_>, batch: &Batch) -> Result<bool> {
    if sp::get_push_pos(tx)? != batch.stored {
        return Err(Error::internal("push position moved under a batch"));
    }
    let mut queued = false;
    let mut changed: Vec<(&str, &str)> = Vec::new();
    for n in &batch.found {
        sp::insert_push_action(
            tx,
            &sp::NewAction {
                user_id: &n.user,
                pos: n.pos,
                room_id: &n.room,
                event_id: &n.event_id,
                thread_id: &n.thread,
                highlight: n.highlight,
                actions: &n.actions,
                ts: n.ts,
            },
        )?;
        if n.remote {
            for pusher in sp::list_pusher_ids(tx, &n.user)? {
                sp::insert_push_queue(tx, pusher, &n.user, n.pos)?;
                queued = true;
            }
        }
        if !changed.contains(&(n.user.as_str(), n.room.as_str())) {
            changed.push((&n.user, &n.room));
        }
    }
    if !changed.is_empty() {
        let pos = tx.next_pos(changed.iter().map(|(u, _)| Topic::user(*u)));
        for (user, room) in &changed {
            sp::upsert_counts_changed(tx, user, room, pos)?;
        }
    }
    if queued {
        tx.wake(Topic::PushQueue);
    }
    sp::set_push_pos(tx, batch.to)?;
    Ok(queued)
}

// ---------------------------------------------------------------- counts

/// A room's counts for `/sync`: `unread_notifications`, and `unread_thread_notifications`
/// (by thread root) when the filter asks for them; otherwise every thread counts in the main
/// numbers, as Synapse does.
pub fn room_counts(
    c: &Connection,
    user: &str,
    room: &str,
    by_thread: bool,
) -> Result<(Value, Option<Value>)> {
    let (mut notif, mut hl) = (0, 0);
    let mut threads = Map::new();
    for (thread, n, h) in sp::list_unread_counts(c, user, room)? {
        if by_thread && thread != "main" {
            threads.insert(
                thread,
                json!({ "notification_count": n, "highlight_count": h }),
            );
        } else {
            notif += n;
            hl += h;
        }
    }
    let main = json!({ "notification_count": notif, "highlight_count": hl });
    Ok((main, by_thread.then_some(Value::Object(threads))))
}

/// The badge a push carries (`counts.unread`): the number of rooms with unread notifications
/// plus pending invites, Synapse's default (`push.group_unread_count_by_room`).
pub fn badge(c: &Connection, user: &str) -> Result<u64> {
    let rooms = q::list_user_rooms(c, user)?;
    let mut n = rooms.iter().filter(|(_, m, _)| m == "invite").count() as u64;
    for room in sp::list_rooms_with_notifications(c, user)? {
        if !rooms.iter().any(|(r, m, _)| *r == room && m == "join") {
            continue;
        }
        let unread: u64 = sp::list_unread_counts(c, user, &room)?
            .iter()
            .map(|(_, n, _)| n)
            .sum();
        n += u64::from(unread > 0);
    }
    Ok(n)
}

/// Whether the user has read (by receipt) the event at `pos` in `thread`.
pub fn is_read(receipts: &[(String, i64)], thread: &str, pos: i64) -> bool {
    receipts
        .iter()
        .any(|(t, p)| (t.is_empty() || t == thread) && *p >= pos)
}

/// A joined room's counts as one `/sync` response carries them.
pub struct SyncCounts {
    /// The evaluator changed them inside the response's window: the room is sent for them.
    pub changed: bool,
    main: Value,
    threads: Option<Value>,
}

impl SyncCounts {
    pub fn apply(&self, room: &mut Value) {
        room["unread_notifications"] = self.main.clone();
        if let Some(t) = &self.threads {
            room["unread_thread_notifications"] = t.clone();
        }
    }
}

/// The counts of a joined room for `/sync`, and whether they changed in `window` (`None` for
/// a room new to the client).
pub fn sync_counts(
    c: &Connection,
    user: &str,
    room: &str,
    by_thread: bool,
    window: Option<(i64, i64)>,
) -> Result<SyncCounts> {
    let changed = match window {
        Some((since, upto)) => sp::counts_changed_between(c, user, room, since, upto)?,
        None => false,
    };
    let (main, threads) = room_counts(c, user, room, by_thread)?;
    Ok(SyncCounts {
        changed,
        main,
        threads,
    })
}
