//! Presence (`m.presence`): who is online, idle or offline, with a status message.
//!
//! **Kept in memory, persisted in batches.** Every `/sync` touches its user's presence (the
//! request is the client saying "I am here"), so presence lives in a map behind a std mutex
//! (never held across an `.await`); the presence worker (`workers::presence`) writes the
//! entries that changed once a minute and at shutdown, in one write, so a restart keeps status
//! messages without a sync ever costing a database write.
//!
//! **A stream without the database.** A change that others must see takes a serial from the
//! notifier's ephemeral counter (the `<eph>` part of the sync token, shared with typing), and
//! the same call wakes the rooms its user is joined to and the user itself: exactly the
//! long-polls of the users who share a room with them. An incremental `/sync` sends the
//! entries whose serial is in `(since.eph, upto.eph]`. The serial is taken and recorded under
//! the presence mutex, and `/sync` reads the marks before it reads this map, so a change is
//! either in the response or wakes the next long-poll (see `notify`). Announcing needs the
//! user's rooms (a database read), so a change is first queued (`announce`) and announced by
//! whoever gets there first: the worker, or the `/sync` request that noticed it (a dropped
//! request leaves the queue to the worker).
//!
//! **The state machine is Synapse's** (`synapse/handlers/presence.py`), kept **per device**
//! and combined into the user's state as Synapse's `_combine_device_states` does: the
//! highest of the devices' states wins (online > unavailable > offline), so a user is online
//! while any device is. A sync with `set_presence=online` (the default) makes its device
//! online and active now; after [`IDLE_MS`] without activity an online device becomes
//! `unavailable`; [`SYNC_ONLINE_MS`] after its last sync ended (and none running) it is
//! dropped (offline); the user is `currently_active` while active within [`ACTIVE_MS`]. A sync
//! with `set_presence=offline` does not touch presence at all, as in Synapse, and a
//! `PUT /presence` of `offline` sets only the caller's device: another device still syncing
//! keeps the user online. Remote users' states come in `m.presence`
//! EDUs and fall to offline after [`FEDERATION_TIMEOUT_MS`] without one.
//!
//! With `[presence] enabled = false` nothing is tracked: updates are accepted and dropped, and
//! `/sync` carries no presence (Synapse's `presence.enabled: false`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use event_listener::{Event, EventListener};
use ruma::presence::PresenceState;
use serde_json::{json, Value};

use crate::{
    error::Result,
    http::sync::Since,
    notify::{Notifier, Topic},
    store::presence::PresenceRow,
    App, Clock,
};

/// An online user without activity for this long becomes `unavailable` (Synapse's
/// `IDLE_TIMER`).
pub const IDLE_MS: u64 = 5 * 60 * 1000;
/// A user whose last sync ended this long ago (none running) becomes `offline` (Synapse's
/// `SYNC_ONLINE_TIMEOUT`).
pub const SYNC_ONLINE_MS: u64 = 30 * 1000;
/// `currently_active` while the last activity is this recent (Synapse's
/// `LAST_ACTIVE_GRANULARITY`).
pub const ACTIVE_MS: u64 = 60 * 1000;
/// A remote user we heard nothing about for this long is taken as offline (Synapse's
/// `FEDERATION_TIMEOUT`); other servers expect a ping within it...
pub const FEDERATION_TIMEOUT_MS: u64 = 30 * 60 * 1000;
/// ...so a local user who is not offline is re-sent this often (`FEDERATION_PING_INTERVAL`).
pub const FEDERATION_PING_MS: u64 = 25 * 60 * 1000;
/// Joins a sync looks at for new members' presence (a window holding more is a catch-up sync,
/// where most of them come with their rooms anyway).
const JOINS_LIMIT: usize = 1000;
/// At most one `m.presence` EDU per user (and so per destination) in this window: a user
/// flapping between states costs other servers one update per window, with the latest state.
pub const FEDERATION_MIN_INTERVAL_MS: u64 = 10 * 1000;

/// What others see of a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub state: PresenceState,
    pub status_msg: Option<String>,
    /// 0: never active.
    pub last_active_ts: u64,
    pub currently_active: bool,
}

impl Status {
    fn offline() -> Self {
        Self {
            state: PresenceState::Offline,
            status_msg: None,
            last_active_ts: 0,
            currently_active: false,
        }
    }

    /// The content of an `m.presence` event as Synapse formats it (`format_user_presence_state`):
    /// `last_active_ago` only when known, `currently_active` only when online.
    pub fn content(&self, now: u64) -> Value {
        let mut c = json!({ "presence": self.state.as_str() });
        if self.last_active_ts > 0 {
            c["last_active_ago"] = now.saturating_sub(self.last_active_ts).into();
        }
        if let Some(m) = self.status_msg.as_deref().filter(|m| !m.is_empty()) {
            c["status_msg"] = m.into();
        }
        if self.state == PresenceState::Online {
            c["currently_active"] = self.currently_active.into();
        }
        c
    }
}

/// One device of a local user (Synapse's `UserDevicePresenceState`).
struct Device {
    state: PresenceState,
    last_active_ts: u64,
    /// When the device was last seen: a sync ended or it set its presence (Synapse counts a
    /// device's activity and its syncs alike before timing it out to offline).
    last_sync_ts: u64,
    /// Syncs of this device running now (a device with one is never timed out).
    syncing: u32,
}

impl Device {
    fn new() -> Self {
        Self {
            state: PresenceState::Offline,
            last_active_ts: 0,
            last_sync_ts: 0,
            syncing: 0,
        }
    }

    /// The next time a timer may change this device.
    fn deadline(&self) -> u64 {
        let mut d = u64::MAX;
        if self.state == PresenceState::Online {
            d = self.last_active_ts + IDLE_MS;
        }
        if self.syncing == 0 {
            d = d.min(self.last_sync_ts.max(self.last_active_ts) + SYNC_ONLINE_MS);
        }
        d
    }
}

/// Synapse's `_combine_device_states`: the highest-priority state of any device.
fn combine<'a>(devices: impl IntoIterator<Item = &'a Device>) -> PresenceState {
    fn rank(s: &PresenceState) -> u8 {
        match s {
            PresenceState::Online => 2,
            PresenceState::Unavailable => 1,
            _ => 0,
        }
    }
    devices
        .into_iter()
        .map(|d| &d.state)
        .filter(|s| rank(s) > 0)
        .max_by_key(|s| rank(s))
        .cloned()
        .unwrap_or(PresenceState::Offline)
}

struct Entry {
    status: Status,
    local: bool,
    /// Local: when the user was last seen on any device (persisted).
    last_sync_ts: u64,
    /// Local: the devices seen recently (dropped when they time out to offline).
    devices: HashMap<String, Device>,
    /// Local: when other servers were last sent this user's state; remote: when we last
    /// heard about it.
    last_fed_ts: u64,
    /// The ephemeral serial of the last announced change (0: never announced).
    serial: i64,
}

impl Entry {
    fn new(local: bool) -> Self {
        Self {
            status: Status::offline(),
            local,
            last_sync_ts: 0,
            devices: HashMap::new(),
            last_fed_ts: 0,
            serial: 0,
        }
    }

    /// The next time a timer may change this entry (`u64::MAX`: none).
    fn deadline(&self) -> u64 {
        let s = &self.status;
        if !self.local {
            return match s.state {
                PresenceState::Offline => u64::MAX,
                _ => self.last_fed_ts + FEDERATION_TIMEOUT_MS,
            };
        }
        let mut d = u64::MAX;
        if s.state != PresenceState::Offline {
            d = self.last_fed_ts + FEDERATION_PING_MS;
        }
        if s.currently_active {
            d = d.min(s.last_active_ts + ACTIVE_MS);
        }
        self.devices
            .values()
            .map(Device::deadline)
            .fold(d, u64::min)
    }
}

#[derive(Default)]
struct Inner {
    users: HashMap<String, Entry>,
    /// Changed, not yet announced to `/sync` (no serial, no wake-up yet).
    announce: BTreeSet<String>,
    /// Local users whose state other servers should be sent.
    federate: BTreeSet<String>,
    /// Changed since the last persistence write.
    dirty: BTreeSet<String>,
    /// No timer fires before this (`tick` is free until then).
    next_deadline: u64,
}

/// The in-memory presence of local and remote users (see the module doc).
pub struct Presence {
    enabled: bool,
    server_name: String,
    clock: Arc<dyn Clock>,
    notifier: Notifier,
    inner: Mutex<Inner>,
    /// Wakes the worker: something to announce, federate or persist. Data-less.
    work: Event,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // Short sync critical sections; a panic inside one leaves at worst a stale entry.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Synapse's `should_notify`: is the change from `old` to `new` worth telling anyone?
fn should_notify(old: &Status, new: &Status) -> bool {
    if old == new {
        return false;
    }
    if old.status_msg != new.status_msg || old.state != new.state {
        return true;
    }
    if old.state == PresenceState::Online {
        new.currently_active != old.currently_active
            || (new.last_active_ts.saturating_sub(old.last_active_ts) > ACTIVE_MS
                && !new.currently_active)
    } else {
        new.last_active_ts.saturating_sub(old.last_active_ts) > ACTIVE_MS
    }
}

/// The states a client may set.
pub fn known_state(s: &PresenceState) -> bool {
    matches!(
        s,
        PresenceState::Online | PresenceState::Unavailable | PresenceState::Offline
    )
}

/// Stops counting a running sync when dropped (however the request ends), recording when it
/// ended: the user goes offline [`SYNC_ONLINE_MS`] after the last one.
pub struct SyncGuard {
    app: Option<App>,
    user: String,
    device: String,
}

impl Drop for SyncGuard {
    fn drop(&mut self) {
        let Some(app) = self.app.take() else { return };
        let p = &app.presence;
        let now = p.clock.now_ms();
        let mut inner = lock(&p.inner);
        if let Some(e) = inner.users.get_mut(&self.user) {
            if let Some(d) = e.devices.get_mut(&self.device) {
                d.syncing = d.syncing.saturating_sub(1);
                d.last_sync_ts = now;
            }
            e.last_sync_ts = now;
            let d = e.deadline();
            inner.next_deadline = inner.next_deadline.min(d);
        }
        drop(inner);
        p.work.notify(usize::MAX);
    }
}

impl Presence {
    pub fn new(
        enabled: bool,
        server_name: &str,
        clock: Arc<dyn Clock>,
        notifier: Notifier,
    ) -> Self {
        Self {
            enabled,
            server_name: server_name.to_owned(),
            clock,
            notifier,
            inner: Mutex::default(),
            work: Event::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn is_local(&self, user: &str) -> bool {
        user.split_once(':')
            .is_some_and(|(_, s)| s == self.server_name)
    }

    /// Loads what the last run persisted (before serving). Timers then run from the stored
    /// times: a local user not syncing again goes offline [`SYNC_ONLINE_MS`] after start.
    pub fn load(&self, rows: Vec<PresenceRow>) {
        let now = self.clock.now_ms();
        let mut inner = lock(&self.inner);
        for r in rows {
            let Some(state) = parse_state(&r.state) else {
                continue;
            };
            let local = self.is_local(&r.user_id);
            let mut e = Entry::new(local);
            e.status = Status {
                state,
                status_msg: r.status_msg,
                last_active_ts: r.last_active_ts,
                currently_active: false,
            };
            e.last_sync_ts = r.last_sync_ts;
            if local && e.status.state != PresenceState::Offline {
                // The devices are not persisted: one stands for them all, timed out from the
                // stored times like any other.
                e.devices.insert(
                    String::new(),
                    Device {
                        state: e.status.state.clone(),
                        last_active_ts: r.last_active_ts,
                        last_sync_ts: r.last_sync_ts,
                        syncing: 0,
                    },
                );
            }
            // Remote: as if just heard (their server pings within the timeout). Local: not
            // yet sent since the restart.
            e.last_fed_ts = if local { 0 } else { now };
            // Announced by the worker as it starts (or the first sync): visible to initial
            // syncs and to incremental ones with a token from before the restart.
            inner.announce.insert(r.user_id.clone());
            if local && e.status.state != PresenceState::Offline {
                inner.federate.insert(r.user_id.clone());
            }
            inner.users.insert(r.user_id, e);
        }
        inner.next_deadline = 0;
    }

    /// A listener for the worker: fires when there is something to announce, federate or
    /// persist, or a timer may have moved closer.
    pub fn listen(&self) -> EventListener {
        self.work.listen()
    }

    /// Applies a new status to `user` (Synapse's `handle_update`): recomputes
    /// `currently_active` for a local online user and, if the change is worth telling, queues
    /// the announcement, the federation update (local users) and the persistence write.
    fn update(&self, inner: &mut Inner, user: &str, f: impl FnOnce(&mut Entry)) {
        let now = self.clock.now_ms();
        let local = self.is_local(user);
        let e = inner
            .users
            .entry(user.to_owned())
            .or_insert_with(|| Entry::new(local));
        let old = e.status.clone();
        f(e);
        if e.local {
            e.status.state = combine(e.devices.values());
            e.status.currently_active = e.status.state == PresenceState::Online
                && now.saturating_sub(e.status.last_active_ts) < ACTIVE_MS;
        }
        let d = e.deadline();
        let notify = should_notify(&old, &e.status);
        inner.next_deadline = inner.next_deadline.min(d);
        if notify {
            inner.announce.insert(user.to_owned());
            inner.dirty.insert(user.to_owned());
            if local {
                inner.federate.insert(user.to_owned());
            }
            self.work.notify(usize::MAX);
        }
    }

    /// A `/sync` of `device` starts (Synapse's `user_syncing` + `set_state(is_sync=True)`):
    /// the device is `set_presence` and, if online, active now; the status message is kept.
    /// Returns the guard that records the end of the sync. `offline` leaves presence alone.
    pub fn sync_started(
        &self,
        app: &App,
        user: &str,
        device: &str,
        set_presence: &PresenceState,
    ) -> SyncGuard {
        let noop = SyncGuard {
            app: None,
            user: String::new(),
            device: String::new(),
        };
        if !self.enabled || !known_state(set_presence) || *set_presence == PresenceState::Offline {
            return noop;
        }
        self.change(user, |e, now| {
            e.devices
                .entry(device.to_owned())
                .or_insert_with(Device::new)
                .syncing += 1;
            set_device(e, device, set_presence.clone(), now);
        });
        SyncGuard {
            app: Some(app.clone()),
            user: user.to_owned(),
            device: device.to_owned(),
        }
    }

    /// `PUT /presence/{userId}/status` from `device` (Synapse's `set_state`): the device's
    /// state, and the user's status message (absent clears it); online also means active now.
    pub fn set(&self, user: &str, device: &str, state: PresenceState, status_msg: Option<String>) {
        self.change(user, |e, now| {
            set_device(e, device, state, now);
            e.status.status_msg = status_msg;
        });
    }

    /// An `m.presence` update about a remote user (already checked: from their server, sharing
    /// a room with one of ours).
    pub fn set_remote(&self, user: &str, status: Status) {
        self.change(user, |e, now| {
            e.last_fed_ts = now;
            e.status = status;
        });
    }

    /// [`Presence::update`] at the clock's time, if presence is enabled.
    fn change(&self, user: &str, f: impl FnOnce(&mut Entry, u64)) {
        if !self.enabled {
            return;
        }
        let now = self.clock.now_ms();
        let mut inner = lock(&self.inner);
        self.update(&mut inner, user, |e| f(e, now));
    }

    /// Runs the timers that are due at `now` (Synapse's `handle_timeouts`): idle, offline
    /// after the last sync, `currently_active` running out, federation pings and remote
    /// users going silent. Free until the earliest deadline.
    pub fn tick(&self, now: u64) {
        if !self.enabled {
            return;
        }
        let mut inner = lock(&self.inner);
        if now < inner.next_deadline {
            return;
        }
        let due: Vec<String> = inner
            .users
            .iter()
            .filter(|(_, e)| e.deadline() <= now)
            .map(|(u, _)| u.clone())
            .collect();
        for user in due {
            let mut ping = false;
            self.update(&mut inner, &user, |e| {
                if !e.local {
                    e.status.state = PresenceState::Offline;
                    e.status.currently_active = false;
                    return;
                }
                // Per device, as Synapse's `handle_timeout`: idle, then dropped when it has
                // not synced for a while; `update` combines what is left.
                e.devices.retain(|_, d| {
                    if d.state == PresenceState::Online
                        && now.saturating_sub(d.last_active_ts) > IDLE_MS
                    {
                        d.state = PresenceState::Unavailable;
                    }
                    d.syncing > 0
                        || now.saturating_sub(d.last_sync_ts.max(d.last_active_ts))
                            <= SYNC_ONLINE_MS
                });
                ping = now.saturating_sub(e.last_fed_ts) > FEDERATION_PING_MS;
            });
            if ping {
                inner.federate.insert(user);
                self.work.notify(usize::MAX);
            }
        }
        inner.next_deadline = inner
            .users
            .values()
            .map(Entry::deadline)
            .min()
            .unwrap_or(u64::MAX)
            .max(now + 1);
    }

    /// The earliest time [`Presence::tick`] has work.
    pub fn next_deadline(&self) -> u64 {
        lock(&self.inner).next_deadline
    }

    /// Users with a change not yet announced.
    pub fn pending_announcements(&self) -> Vec<String> {
        lock(&self.inner).announce.iter().cloned().collect()
    }

    /// Announces `user`'s change on `topics` (their rooms and themselves): one serial for all,
    /// recorded with the entry under the same lock that `/sync` reads it under.
    pub fn announce(&self, user: &str, topics: &[Topic]) {
        let mut inner = lock(&self.inner);
        if !inner.announce.remove(user) {
            return; // announced meanwhile by another caller
        }
        let serial = self.notifier.bump_ephemeral_many(topics);
        if let Some(e) = inner.users.get_mut(user) {
            e.serial = serial;
        }
    }

    /// Local users due to be sent to other servers at `now` (at most one update per user per
    /// [`FEDERATION_MIN_INTERVAL_MS`]), with their states, marked as sent; and the earliest
    /// time one still waiting may go.
    pub fn take_federation_due(&self, now: u64) -> (Vec<(String, Status)>, Option<u64>) {
        let mut inner = lock(&self.inner);
        let mut due = Vec::new();
        let mut later: Option<u64> = None;
        let users: Vec<String> = inner.federate.iter().cloned().collect();
        for user in users {
            let Some(e) = inner.users.get_mut(&user) else {
                inner.federate.remove(&user);
                continue;
            };
            let at = e.last_fed_ts + FEDERATION_MIN_INTERVAL_MS;
            if e.last_fed_ts != 0 && at > now {
                later = Some(later.map_or(at, |l: u64| l.min(at)));
                continue;
            }
            e.last_fed_ts = now;
            due.push((user.clone(), e.status.clone()));
            inner.federate.remove(&user);
        }
        (due, later)
    }

    /// The rows changed since the last persistence write, taken out of the dirty set (give
    /// them back with [`Presence::mark_dirty`] if the write fails).
    pub fn take_dirty(&self) -> Vec<PresenceRow> {
        let mut inner = lock(&self.inner);
        let dirty = std::mem::take(&mut inner.dirty);
        dirty
            .into_iter()
            .filter_map(|u| {
                let e = inner.users.get(&u)?;
                Some(PresenceRow {
                    state: e.status.state.as_str().to_owned(),
                    status_msg: e.status.status_msg.clone(),
                    last_active_ts: e.status.last_active_ts,
                    last_sync_ts: e.last_sync_ts,
                    user_id: u,
                })
            })
            .collect()
    }

    pub fn mark_dirty(&self, users: impl IntoIterator<Item = String>) {
        lock(&self.inner).dirty.extend(users);
    }

    /// A user's status now (offline if unknown).
    pub fn get(&self, user: &str) -> Status {
        lock(&self.inner)
            .users
            .get(user)
            .map(|e| e.status.clone())
            .unwrap_or_else(Status::offline)
    }

    /// The entries a sync covering ephemeral serials `(since, upto]` sends: those announced in
    /// that range, or for an initial sync (`since = None`) every one that is not offline
    /// (Synapse leaves offline users out of initial syncs by default).
    pub fn changed_between(&self, since: Option<i64>, upto: i64) -> Vec<(String, Status)> {
        let inner = lock(&self.inner);
        inner
            .users
            .iter()
            .filter(|(_, e)| match since {
                Some(s) => e.serial > s && e.serial <= upto,
                None => e.serial > 0 && e.status.state != PresenceState::Offline,
            })
            .map(|(u, e)| (u.clone(), e.status.clone()))
            .collect()
    }
}

/// Sets one device's state at `now` (it was seen now, and active if online) and, as Synapse
/// does, the user's `last_active_ts` when the combined state is online.
fn set_device(e: &mut Entry, device: &str, state: PresenceState, now: u64) {
    let d = e
        .devices
        .entry(device.to_owned())
        .or_insert_with(Device::new);
    d.last_sync_ts = now;
    if state == PresenceState::Online {
        d.last_active_ts = now;
    }
    d.state = state;
    e.last_sync_ts = now;
    if combine(e.devices.values()) == PresenceState::Online {
        e.status.last_active_ts = now;
    }
}

fn parse_state(s: &str) -> Option<PresenceState> {
    let p = PresenceState::from(s);
    known_state(&p).then_some(p)
}

/// Announces every queued change: reads each user's joined rooms and wakes them and the user
/// with one new serial. Called by the worker and by `/sync` before it computes (so a sync
/// sees a change it just caused or a timer it just ran); dropped halfway, what is left stays
/// queued for the worker.
pub async fn announce_pending(app: &App) -> Result<()> {
    let users = app.presence.pending_announcements();
    if users.is_empty() {
        return Ok(());
    }
    let u = users.clone();
    let rooms = app
        .store
        .read(move |c| {
            u.iter()
                .map(|user| crate::store::presence::list_joined_rooms(c, user))
                .collect::<Result<Vec<_>>>()
        })
        .await?;
    for (user, rooms) in users.iter().zip(rooms) {
        let topics: Vec<Topic> = rooms
            .into_iter()
            .map(Topic::Room)
            .chain([Topic::user(user.as_str())])
            .collect();
        app.presence.announce(user, &topics);
    }
    Ok(())
}

/// Called by `/sync` as it starts: counts the sync (until the guard drops), runs due timers
/// and announces pending changes so this very response is up to date.
pub async fn sync_started(
    app: &App,
    user: &str,
    device: &str,
    set_presence: &PresenceState,
) -> Result<SyncGuard> {
    let guard = app.presence.sync_started(app, user, device, set_presence);
    if app.presence.enabled() {
        app.presence.tick(app.clock.now_ms());
        announce_pending(app).await?;
    }
    Ok(guard)
}

/// The `m.presence` events of a sync covering `(since, upto]`: the user's own and those of users
/// sharing a room with them whose change was announced in `(since.eph, upto.eph]`; for a
/// room joined in `(since.pos, upto.pos]`, its members' current presence (Synapse sends a new
/// member everyone's presence, not only what changes later); and the current presence of
/// users who joined one of the user's rooms in that window (Synapse's
/// `newly_joined_or_invited_users`); through the sync filter's `presence` part. `rooms` are
/// the user's rooms (room, membership, position).
pub async fn for_sync(
    app: &App,
    user: &str,
    since: Option<Since>,
    upto: Since,
    filter: &crate::http::events::EventFilter,
    rooms: &[(String, String, i64)],
) -> Result<Vec<Value>> {
    if !app.presence.enabled() {
        return Ok(Vec::new());
    }
    let new_rooms: Vec<String> = rooms
        .iter()
        .filter(|(_, m, pos)| {
            m == "join" && since.is_some_and(|s| *pos > s.pos && *pos <= upto.pos)
        })
        .map(|(r, _, _)| r.clone())
        .collect();
    let changed = app.presence.changed_between(since.map(|s| s.eph), upto.eph);
    // Joins into the user's rooms in the window (an incremental sync whose window holds events).
    let joins_window = since.map(|s| (s.pos, upto.pos)).filter(|(a, b)| a < b);
    if changed.is_empty() && new_rooms.is_empty() && joins_window.is_none() {
        return Ok(Vec::new());
    }
    let joined: BTreeSet<String> = rooms
        .iter()
        .filter(|(_, m, _)| m == "join")
        .map(|(r, _, _)| r.clone())
        .collect();
    let me = user.to_owned();
    let (visible, members) = app
        .store
        .read(move |c| {
            let mut visible = Vec::new();
            for (u, s) in changed {
                if u == me || crate::store::presence::share_a_room(c, &me, &u)? {
                    visible.push((u, s));
                }
            }
            let mut members = Vec::new();
            for room in &new_rooms {
                members.extend(
                    crate::store::queries::list_members(c, room)?
                        .into_iter()
                        .filter(|(_, m, _)| m == "join")
                        .map(|(u, _, _)| u),
                );
            }
            if let Some((after, upto)) = joins_window {
                for j in crate::store::pushfix::list_joins_between(c, after, upto, JOINS_LIMIT)? {
                    if joined.contains(&j.room_id) && j.user_id != me {
                        members.push(j.user_id);
                    }
                }
            }
            Ok((visible, members))
        })
        .await?;
    let mut out: BTreeMap<String, Status> = visible.into_iter().collect();
    for m in members {
        if let std::collections::btree_map::Entry::Vacant(v) = out.entry(m) {
            let s = app.presence.get(v.key());
            if s.state != PresenceState::Offline {
                v.insert(s);
            }
        }
    }
    let now = app.clock.now_ms();
    Ok(out
        .into_iter()
        .filter(|(u, _)| filter.allows_parts("m.presence", u))
        .take(filter.limit.unwrap_or(usize::MAX))
        .map(|(u, s)| json!({ "type": "m.presence", "sender": u, "content": s.content(now) }))
        .collect())
}

/// An `m.presence` EDU from `origin`: each update about one of origin's users who shares a
/// room with one of ours is kept (as Synapse's `incoming_presence`); the rest are ignored, as
/// is everything when presence is disabled. Items are parsed one by one with ruma's type, so
/// one malformed item does not cost the others.
pub async fn receive_edu(app: &App, origin: &str, content: &Value) -> Result<()> {
    use ruma::api::federation::transactions::edu::PresenceUpdate;
    if !app.presence.enabled() {
        return Ok(());
    }
    // (update, whether `last_active_ago` was given: Synapse leaves it out for a user never
    // active, which ruma's type requires, so it is parsed as 0 and remembered as unknown).
    let updates: Vec<(PresenceUpdate, bool)> = content
        .get("push")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let mut v = v.clone();
            let known = v.get("last_active_ago").is_some();
            if let (false, Some(o)) = (known, v.as_object_mut()) {
                o.insert("last_active_ago".into(), 0.into());
            }
            Some((serde_json::from_value::<PresenceUpdate>(v).ok()?, known))
        })
        .filter(|(u, _)| u.user_id.server_name().as_str() == origin && known_state(&u.presence))
        .collect();
    if updates.is_empty() {
        return Ok(());
    }
    let us = app.server_name.to_string();
    let updates = app
        .store
        .read(move |c| {
            let mut out = Vec::new();
            for (u, known) in updates {
                if crate::store::presence::shares_room_with_server(c, u.user_id.as_str(), &us)? {
                    out.push((u, known));
                }
            }
            Ok(out)
        })
        .await?;
    let now = app.clock.now_ms();
    for (u, known) in updates {
        let ago: u64 = u.last_active_ago.into();
        let status = Status {
            state: u.presence,
            status_msg: u.status_msg,
            last_active_ts: if known { now.saturating_sub(ago) } else { 0 },
            currently_active: u.currently_active,
        };
        app.presence.set_remote(u.user_id.as_str(), status);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

    use super::*;

    struct TestClock(AtomicU64);

    impl Clock for TestClock {
        fn now_ms(&self) -> u64 {
            self.0.load(SeqCst)
        }
    }

    fn presence() -> (Presence, Arc<TestClock>) {
        let clock = Arc::new(TestClock(AtomicU64::new(1_000_000)));
        let p = Presence::new(true, "x", clock.clone(), Notifier::default());
        (p, clock)
    }

    #[test]
    fn federation_updates_are_coalesced_to_one_per_window_with_the_latest_state() {
        let (p, clock) = presence();
        let t0 = clock.now_ms();
        p.set("@a:x", "D", PresenceState::Online, None);
        let (due, later) = p.take_federation_due(t0);
        assert_eq!(due.len(), 1);
        assert_eq!(later, None);
        // Two more changes inside the window: held back, then sent once, as they ended.
        clock.0.store(t0 + 1_000, SeqCst);
        p.set("@a:x", "D", PresenceState::Unavailable, Some("brb".into()));
        clock.0.store(t0 + 2_000, SeqCst);
        p.set(
            "@a:x",
            "D",
            PresenceState::Unavailable,
            Some("back soon".into()),
        );
        let (due, later) = p.take_federation_due(t0 + 2_000);
        assert!(due.is_empty());
        assert_eq!(later, Some(t0 + FEDERATION_MIN_INTERVAL_MS));
        let (due, _) = p.take_federation_due(t0 + FEDERATION_MIN_INTERVAL_MS);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1.status_msg.as_deref(), Some("back soon"));
        assert!(p.take_federation_due(t0 + 60_000).0.is_empty(), "sent once");
        // Remote users are never sent back out.
        p.set_remote("@r:y", Status::offline());
        assert!(p.take_federation_due(t0 + 120_000).0.is_empty());
    }

    #[test]
    fn activity_while_online_and_active_is_not_news() {
        let (p, clock) = presence();
        p.set("@a:x", "D", PresenceState::Online, None);
        assert_eq!(p.pending_announcements(), vec!["@a:x".to_owned()]);
        p.announce("@a:x", &[]);
        assert!(p.pending_announcements().is_empty());
        // Active again 5 s later: still online and currently active, nothing to announce,
        // nothing to persist beyond the first change.
        clock.0.store(clock.now_ms() + 5_000, SeqCst);
        p.set("@a:x", "D", PresenceState::Online, None);
        assert!(p.pending_announcements().is_empty());
        assert_eq!(p.take_dirty().len(), 1);
        assert!(p.take_dirty().is_empty());
        // A minute with no sync and no activity: offline, no longer active. That is news.
        let later = clock.now_ms() + ACTIVE_MS + 1;
        clock.0.store(later, SeqCst);
        p.tick(later);
        assert_eq!(p.pending_announcements(), vec!["@a:x".to_owned()]);
        let s = p.get("@a:x");
        assert_eq!(
            (s.state, s.currently_active),
            (PresenceState::Offline, false)
        );
    }

    #[test]
    fn disabled_presence_keeps_nothing() {
        let clock = Arc::new(TestClock(AtomicU64::new(5)));
        let p = Presence::new(false, "x", clock, Notifier::default());
        p.set("@a:x", "D", PresenceState::Online, Some("hi".into()));
        p.set_remote("@r:y", Status::offline());
        assert_eq!(p.get("@a:x"), Status::offline());
        assert!(p.changed_between(None, i64::MAX).is_empty());
        assert!(p.take_dirty().is_empty());
    }
}
