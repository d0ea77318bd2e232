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
    push::{
        Action, AnyPushRule, AnyPushRuleRef, ConditionalPushRule, FlattenedJson, PatternedPushRule,
        PatternedPushRuleInit, PredefinedOverrideRuleId, PushConditionPowerLevelsCtx,
        PushConditionRoomCtx, Ruleset,
    },
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

/// The rule sets of the users the evaluator has met, with the position of the account data
/// they came from: a rule change moves the position, so a stale entry is never used. Locked
/// only inside the evaluator's read closure (no `.await` while held).
///
/// Every user gets the default rules stored at registration, and most never change them: such
/// a user's entry is a marker, and their events are evaluated against ONE shared default rule
/// set (see [`UserRules`]), so a 10,000-member room does not keep 10,000 parsed copies of the
/// same rules in memory. Only changed rule sets are kept parsed, one per user.
pub struct RulesCache {
    users: Mutex<HashMap<String, (i64, UserRules)>>,
    defaults: Defaults,
}

impl Default for RulesCache {
    fn default() -> Self {
        Self {
            users: Mutex::default(),
            defaults: Defaults::new(),
        }
    }
}

/// A user's rules as the evaluator holds them.
#[derive(Clone)]
pub enum UserRules {
    /// Exactly [`default_rules`] for the user: evaluated from the shared [`Defaults`].
    Default,
    /// Anything else, parsed.
    Custom(Arc<Ruleset>),
}

impl RulesCache {
    /// The rules of `user`, whose `m.push_rules` account data is at `pos` (`None`: none
    /// stored), loaded and classified only when the position moved.
    pub fn get(&self, c: &Connection, user: &str, pos: Option<i64>) -> Result<UserRules> {
        let pos = pos.unwrap_or(0);
        let mut m = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((p, rules)) = m.get(user) {
            if *p == pos {
                return Ok(rules.clone());
            }
        }
        let rules = self.load(c, user)?;
        m.insert(user.to_owned(), (pos, rules.clone()));
        Ok(rules)
    }

    fn load(&self, c: &Connection, user: &str) -> Result<UserRules> {
        let uid = OwnedUserId::try_from(user).map_err(Error::internal)?;
        let Some(s) = q::get_account_data(c, user, "", "m.push_rules")? else {
            return Ok(UserRules::Default);
        };
        // Compared as text with the user's own default set as registration stores it, so a
        // set that differs in anything (an older Hearth's defaults, one disabled rule, another
        // serialization) is evaluated as stored. Text, because parsing 10,000 stored sets
        // (and building 10,000 default sets to compare with) made a cold cache cost seconds.
        if self.defaults.stored_text(&uid).is_some_and(|d| d == s) {
            return Ok(UserRules::Default);
        }
        let v: Value = serde_json::from_str(&s)?;
        let rules = serde_json::from_value(v["global"].clone()).map_err(Error::internal)?;
        Ok(UserRules::Custom(Arc::new(rules)))
    }

    /// The actions of the first rule of `rules` that applies to `event` (flattened once per
    /// event) for `ctx.user_id`; empty if none does or the user sent it. The logic of ruma's
    /// `Ruleset::get_match`, which flattens the event again for every call.
    pub async fn actions(
        &self,
        rules: &UserRules,
        event: &FlattenedJson,
        ctx: &PushConditionRoomCtx,
    ) -> Vec<Action> {
        if event.get_str("sender") == Some(ctx.user_id.as_str()) {
            return Vec::new();
        }
        match rules {
            UserRules::Custom(set) => {
                for rule in set.iter() {
                    if rule.applies(event, ctx).await {
                        return rule.actions().to_vec();
                    }
                }
            }
            UserRules::Default => {
                for rule in self.defaults.set.iter() {
                    if self.defaults.applies(rule, event, ctx).await {
                        return rule.actions().to_vec();
                    }
                }
            }
        }
        Vec::new()
    }
}

/// The default rule set shared by every user who kept it: [`default_rules`] of a placeholder
/// user. Three of its rules name the user; evaluation puts in their place the same rules for
/// the user at hand, built by the same constructors ([`Defaults::own_rule`]), in the same
/// place: the order of evaluation, and so the result, is [`default_rules`]'s for that user
/// (`shared_defaults_are_each_users_defaults` checks it rule by rule).
struct Defaults {
    set: Ruleset,
    user_name: Option<PatternedPushRule>,
    /// `m.push_rules` as [`account::init_push_rules`](super::account::init_push_rules) stores
    /// the set for the placeholder user.
    text: String,
}

/// The placeholder user of [`Defaults`]: its ID and localpart appear in the default set only
/// where the rules name the user.
const PLACEHOLDER: &str = "@hearth-default-rules-user:hearth-default-rules.invalid";
const PLACEHOLDER_LOCALPART: &str = "hearth-default-rules-user";

impl Defaults {
    fn new() -> Self {
        let placeholder = <&ruma::UserId>::try_from(PLACEHOLDER).expect("a valid user ID");
        let set = default_rules(placeholder);
        let user_name = set.content.get(CONTAINS_USER_NAME).cloned();
        let text = json!({ "global": &set }).to_string();
        Self {
            set,
            user_name,
            text,
        }
    }

    /// The text registration stores as `user`'s `m.push_rules` (`None` if the placeholder
    /// text cannot be told apart, which leaves every set to be parsed).
    fn stored_text(&self, user: &ruma::UserId) -> Option<String> {
        // JSON string bodies (quotes stripped), so a user ID that needs escaping stays exact.
        let body = |s: &str| {
            let q = serde_json::to_string(s).ok()?;
            Some(q[1..q.len() - 1].to_owned())
        };
        let (id, localpart) = (body(user.as_str())?, body(user.localpart())?);
        // The ID where the rules match it, the localpart where it stands alone.
        let parts: Vec<&str> = self.text.split(PLACEHOLDER).collect();
        let lone: usize = parts
            .iter()
            .map(|p| p.matches(PLACEHOLDER_LOCALPART).count())
            .sum();
        (parts.len() == 3 && lone == 1).then(|| {
            parts
                .iter()
                .map(|p| p.replace(PLACEHOLDER_LOCALPART, &localpart))
                .collect::<Vec<_>>()
                .join(&id)
        })
    }

    /// The rule of the shared set that stands at `rule`'s place for `user`, if it names the
    /// user (`None`: `rule` is the same for everyone).
    fn own_rule(&self, rule: AnyPushRuleRef<'_>, user: &ruma::UserId) -> Option<AnyPushRule> {
        let id = rule.rule_id();
        if matches!(rule, AnyPushRuleRef::Override(_)) {
            if id == PredefinedOverrideRuleId::InviteForMe.as_str() {
                return Some(AnyPushRule::Override(ConditionalPushRule::invite_for_me(
                    user,
                )));
            }
            if id == PredefinedOverrideRuleId::IsUserMention.as_str() {
                return Some(AnyPushRule::Override(ConditionalPushRule::is_user_mention(
                    user,
                )));
            }
        }
        if let (AnyPushRuleRef::Content(_), Some(r)) = (rule, &self.user_name) {
            if id == CONTAINS_USER_NAME {
                return Some(AnyPushRule::Content(
                    PatternedPushRuleInit {
                        actions: r.actions.clone(),
                        default: r.default,
                        enabled: r.enabled,
                        rule_id: r.rule_id.clone(),
                        pattern: user.localpart().to_owned(),
                    }
                    .into(),
                ));
            }
        }
        None
    }

    async fn applies(
        &self,
        rule: AnyPushRuleRef<'_>,
        event: &FlattenedJson,
        ctx: &PushConditionRoomCtx,
    ) -> bool {
        match self.own_rule(rule, &ctx.user_id) {
            Some(own) => own.as_ref().applies(event, ctx).await,
            None => rule.applies(event, ctx).await,
        }
    }
}

/// The legacy rule that names the user's localpart (see [`default_rules`]).
const CONTAINS_USER_NAME: &str = ".m.rule.contains_user_name";

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
    /// The members' rule positions ([`RulesCache::get`]'s keys), one query per room.
    rules_pos: HashMap<String, i64>,
}

/// `first`: the position of the batch's first event in the room.
fn room_ctx(c: &Connection, room: &str, server: &str, first: i64) -> Result<RoomCtx> {
    let (members, count) = sp::list_joined_local(c, room, server, first)?;
    Ok(RoomCtx {
        members,
        count,
        power: power_ctx(c, room)?,
        rules_pos: sp::list_push_rules_pos(c, room)?,
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
            rooms.insert(room.clone(), room_ctx(c, &room, server, ev.pos)?);
        }
        let ctx = &rooms[&room];
        let room_id = OwnedRoomId::try_from(room.as_str()).map_err(Error::internal)?;
        let raw: Raw<Value> =
            Raw::from_json(serde_json::value::RawValue::from_string(ev.json.clone())?);
        // Flattened once for all the users (ruma's `get_actions` would do it for each).
        let flat = FlattenedJson::from_raw(&raw);
        let mut targets: Vec<(&str, Option<&str>, Option<i64>)> = ctx
            .members
            .iter()
            .filter(|m| m.since <= ev.pos && m.user_id != ev.sender)
            .map(|m| {
                let pos = ctx.rules_pos.get(&m.user_id).copied();
                (m.user_id.as_str(), m.display_name.as_deref(), pos)
            })
            .collect();
        let invitee = match (ev.kind.as_str(), ev.state_key.as_deref()) {
            ("m.room.member", Some(k))
                if v["content"]["membership"] == "invite"
                    && k.ends_with(&format!(":{server}"))
                    && !targets.iter().any(|(u, _, _)| *u == k) =>
            {
                Some((k, None, sp::get_push_rules_pos(c, k)?))
            }
            _ => None,
        };
        targets.extend(invitee);
        let thread = thread_of(&v);
        let ts = v["origin_server_ts"].as_i64().unwrap_or_default();
        // One context for the event, its user fields set for each user in turn (building one
        // per user cloned the power levels every time).
        let mut pctx: Option<PushConditionRoomCtx> = None;
        for (user, name, rules_pos) in targets {
            let uid = OwnedUserId::try_from(user).map_err(Error::internal)?;
            let rules = cache.get(c, user, rules_pos)?;
            let name = name.unwrap_or_default().to_owned();
            let pctx = match &mut pctx {
                Some(p) => {
                    p.user_id = uid;
                    p.user_display_name = name;
                    p
                }
                None => {
                    let mut p = PushConditionRoomCtx::new(
                        room_id.clone(),
                        UInt::new_saturating(ctx.count),
                        uid,
                        name,
                    );
                    if let Some(power) = &ctx.power {
                        p = p.with_power_levels(power.clone());
                    }
                    pctx.insert(p)
                }
            };
            // ruma's evaluation is async only for thread subscriptions (a feature Hearth does
            // not enable): nothing in it waits, so it runs to completion here.
            let actions = futures_lite::future::block_on(cache.actions(&rules, &flat, pctx));
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
                actions: serde_json::to_string(&actions)?,
                ts,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The users the checks run for: plain, with characters a pattern or JSON treats
    /// specially, and one whose localpart is the placeholder's.
    const USERS: [&str; 5] = [
        "@alice:example.org",
        "@m.9_x=y-z/w:127.0.0.1:8680",
        "@placeholder:other.example",
        "@hearth-default-rules-user:hearth-default-rules.invalid.example",
        "@bob:localhost",
    ];

    fn rule_json(rule: AnyPushRuleRef<'_>) -> Value {
        let (kind, rule) = match rule {
            AnyPushRuleRef::Override(r) => ("override", serde_json::to_value(r)),
            AnyPushRuleRef::Underride(r) => ("underride", serde_json::to_value(r)),
            AnyPushRuleRef::Content(r) => ("content", serde_json::to_value(r)),
            AnyPushRuleRef::Room(r) => ("room", serde_json::to_value(r)),
            AnyPushRuleRef::Sender(r) => ("sender", serde_json::to_value(r)),
            other => panic!("unexpected rule kind {}", other.rule_id()),
        };
        json!([kind, rule.unwrap()])
    }

    #[test]
    fn shared_defaults_are_each_users_defaults() {
        let defaults = Defaults::new();
        for user in USERS {
            let uid = OwnedUserId::try_from(user).unwrap();
            let own = default_rules(&uid);
            let shared: Vec<Value> = defaults
                .set
                .iter()
                .map(|r| match defaults.own_rule(r, &uid) {
                    Some(o) => rule_json(o.as_ref()),
                    None => rule_json(r),
                })
                .collect();
            let expected: Vec<Value> = own.iter().map(rule_json).collect();
            assert_eq!(shared, expected, "{user}");
            // The three rules that name the user are the ones replaced.
            let replaced = defaults
                .set
                .iter()
                .filter(|r| defaults.own_rule(*r, &uid).is_some())
                .count();
            assert_eq!(replaced, 3, "{user}");
            // The text registration stores for the user is recognised as the defaults.
            let stored = json!({ "global": own }).to_string();
            assert_eq!(defaults.stored_text(&uid), Some(stored), "{user}");
            // A changed set is not.
            let mut changed = own.clone();
            changed
                .set_enabled(
                    ruma::push::RuleKind::Override,
                    ".m.rule.is_user_mention",
                    false,
                )
                .unwrap();
            let changed = json!({ "global": changed }).to_string();
            assert_ne!(defaults.stored_text(&uid), Some(changed), "{user}");
        }
    }

    fn event(v: Value) -> (Raw<Value>, FlattenedJson) {
        let raw: Raw<Value> = Raw::from_json(serde_json::value::to_raw_value(&v).unwrap());
        let flat = FlattenedJson::from_raw(&raw);
        (raw, flat)
    }

    /// Every kind of event the default rules tell apart gets, from the shared defaults and
    /// from a parsed custom set alike, the actions of ruma's own `get_actions` on the user's
    /// full rule set.
    #[test]
    fn evaluation_matches_rulesets_get_actions() {
        let cache = RulesCache::default();
        let mut custom = default_rules(ruma::user_id!("@alice:example.org"));
        custom
            .set_enabled(ruma::push::RuleKind::Underride, ".m.rule.message", false)
            .unwrap();
        let room = "!r:example.org";
        let msg = |content: Value| {
            json!({ "type": "m.room.message", "sender": "@carol:example.org", "room_id": room,
                    "event_id": "$e", "origin_server_ts": 1, "content": content })
        };
        let mut events = vec![
            msg(json!({ "msgtype": "m.text", "body": "hello" })),
            msg(json!({ "msgtype": "m.notice", "body": "hello alice" })),
            msg(json!({ "msgtype": "m.text", "body": "hi alice and bob!" })),
            msg(json!({ "msgtype": "m.text", "body": "hi Alice Liddell" })),
            msg(json!({ "msgtype": "m.text", "body": "@room look" })),
            msg(json!({ "msgtype": "m.text", "body": "x", "m.mentions": { "room": true } })),
            json!({ "type": "m.reaction", "sender": "@carol:example.org", "room_id": room,
                    "content": { "m.relates_to": { "rel_type": "m.annotation", "event_id": "$e", "key": "x" } } }),
            json!({ "type": "m.room.encrypted", "sender": "@carol:example.org", "room_id": room,
                    "content": { "algorithm": "m.megolm.v1.aes-sha2" } }),
            json!({ "type": "m.room.tombstone", "sender": "@carol:example.org", "room_id": room,
                    "state_key": "", "content": { "body": "gone" } }),
        ];
        for user in USERS {
            events.push(msg(json!({ "msgtype": "m.text", "body": "plain",
                                    "m.mentions": { "user_ids": [user] } })));
            events.push(
                json!({ "type": "m.room.message", "sender": user, "room_id": room,
                                "content": { "msgtype": "m.text", "body": "alice, mine" } }),
            );
            events.push(
                json!({ "type": "m.room.member", "sender": "@carol:example.org",
                                "room_id": room, "state_key": user,
                                "content": { "membership": "invite" } }),
            );
            events.push(msg(json!({ "msgtype": "m.text",
                "body": format!("ping {}", user.trim_start_matches('@').split(':').next().unwrap()) })));
        }
        for user in USERS {
            let uid = OwnedUserId::try_from(user).unwrap();
            let full = default_rules(&uid);
            for count in [2u32, 5] {
                let ctx = PushConditionRoomCtx::new(
                    OwnedRoomId::try_from(room).unwrap(),
                    count.into(),
                    uid.clone(),
                    "Alice Liddell".to_owned(),
                );
                for ev in &events {
                    let (raw, flat) = event(ev.clone());
                    use futures_lite::future::block_on as block;
                    let want = block(full.get_actions(&raw, &ctx)).to_vec();
                    let shared = block(cache.actions(&UserRules::Default, &flat, &ctx));
                    assert_eq!(json!(shared), json!(want), "{user} {ev}");
                    let set = UserRules::Custom(Arc::new(custom.clone()));
                    let want = block(custom.get_actions(&raw, &ctx)).to_vec();
                    let got = block(cache.actions(&set, &flat, &ctx));
                    assert_eq!(json!(got), json!(want), "{user} custom {ev}");
                }
            }
        }
    }
}
