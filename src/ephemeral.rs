//! In-memory state that is not worth a disk write: typing notifications, rate-limit buckets,
//! the access-token cache, metrics counters and the shutdown latch. Each uses a std `Mutex`
//! that is never held across an `.await` (all methods are sync), so it cannot be left locked
//! by a dropped future.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use event_listener::{Event, Listener};

use crate::{
    config::{RateLimit, RateLimits},
    error::Error,
    notify::{Notifier, Topic},
    Clock,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short, sync critical sections cannot leave the map
    // inconsistent in a way that matters; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------- typing

/// Who is typing where, with expiry times. Changes wake `/sync` through the notifier, and each
/// room remembers the ephemeral serial of its last change so an incremental sync sends the
/// typing list only for rooms where it changed.
/// Per room: user → typing-until (ms), and the ephemeral serial of the room's last change.
type TypingRooms = HashMap<String, (HashMap<String, u64>, i64)>;

pub struct Typing {
    rooms: Mutex<TypingRooms>,
    notifier: Notifier,
    /// Wakes the expiry worker when an entry is added (it may run out before its next
    /// deadline). Data-less: the worker rescans.
    added: Event,
}

impl Typing {
    pub fn new(notifier: Notifier) -> Self {
        Self {
            rooms: Mutex::default(),
            notifier,
            added: Event::new(),
        }
    }

    pub fn set(&self, room_id: &str, user_id: &str, until_ms: Option<u64>) {
        let mut rooms = lock(&self.rooms);
        let room = rooms.entry(room_id.to_owned()).or_default();
        let changed = match until_ms {
            Some(t) => room.0.insert(user_id.to_owned(), t).is_none(),
            None => room.0.remove(user_id).is_some(),
        };
        if changed {
            room.1 = self.notifier.bump_ephemeral(&Topic::room(room_id));
        }
        if until_ms.is_some() {
            self.added.notify(usize::MAX);
        }
    }

    /// A listener that fires at the next `set` that adds or extends an entry.
    pub fn listen_added(&self) -> event_listener::EventListener {
        self.added.listen()
    }

    /// The earliest time a typing entry runs out, if any.
    pub fn next_expiry(&self) -> Option<u64> {
        lock(&self.rooms)
            .values()
            .flat_map(|(users, _)| users.values().copied())
            .min()
    }

    /// Drops every entry that ran out by `now_ms`, waking syncs for the rooms that changed.
    /// Returns the `(room, user)` pairs dropped.
    pub fn expire(&self, now_ms: u64) -> Vec<(String, String)> {
        let mut rooms = lock(&self.rooms);
        let mut gone = Vec::new();
        for (room_id, (users, serial)) in rooms.iter_mut() {
            let before = users.len();
            users.retain(|user, until| {
                let keep = *until > now_ms;
                if !keep {
                    gone.push((room_id.clone(), user.clone()));
                }
                keep
            });
            if users.len() != before {
                *serial = self.notifier.bump_ephemeral(&Topic::room(room_id.as_str()));
            }
        }
        // Rooms stay in the map with their serial (one small entry per room ever typed in),
        // so an incremental sync still learns that the list became empty.
        gone
    }

    /// Users typing in a room now (ignoring entries past their expiry), and the serial of
    /// the room's last change.
    pub fn users(&self, room_id: &str, now_ms: u64) -> (Vec<String>, i64) {
        let rooms = lock(&self.rooms);
        let Some(room) = rooms.get(room_id) else {
            return (Vec::new(), 0);
        };
        // Removal and the wake-up that goes with it are the expiry worker's job (`expire`).
        let mut users: Vec<String> = room
            .0
            .iter()
            .filter(|(_, until)| **until > now_ms)
            .map(|(u, _)| u.clone())
            .collect();
        users.sort();
        (users, room.1)
    }
}

// ---------------------------------------------------------------- rate limits

type Bucket = (f64, u64);

/// Token buckets per (kind, key). Disabled entirely by `--no-rate-limit`.
pub struct RateLimiter {
    config: RateLimits,
    clock: Arc<dyn Clock>,
    /// (kind, key) → (tokens left, last refill in ms).
    buckets: Mutex<HashMap<(&'static str, String), Bucket>>,
}

impl RateLimiter {
    pub fn new(config: RateLimits, clock: Arc<dyn Clock>) -> Self {
        Self {
            config,
            clock,
            buckets: Mutex::default(),
        }
    }

    /// Takes one token for `key` from the `kind` bucket or fails with `M_LIMIT_EXCEEDED`.
    pub fn check(&self, kind: &'static str, key: &str) -> Result<(), Error> {
        if !self.config.enabled {
            return Ok(());
        }
        let limit: RateLimit = match kind {
            "login" => self.config.login,
            "register" => self.config.register,
            _ => self.config.send,
        };
        let now = self.clock.now_ms();
        let mut buckets = lock(&self.buckets);
        if buckets.len() > 100_000 {
            buckets.clear();
        }
        let (tokens, last) = buckets
            .entry((kind, key.to_owned()))
            .or_insert((limit.burst, now));
        let refill = (now.saturating_sub(*last)) as f64 / 1000.0 * limit.per_second;
        *tokens = (*tokens + refill).min(limit.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - *tokens) / limit.per_second.max(1e-6) * 1000.0).ceil() as u64;
            Err(Error::limit_exceeded(wait))
        }
    }
}

// ---------------------------------------------------------------- access tokens

/// token hash → (user, device). Filled on first use, emptied for a device on logout.
///
/// Revocation must win every interleaving with a concurrent `auth()`: that one reads the
/// database (an `.await`) and then fills the cache, so a logout committing in between would
/// otherwise put the revoked token back into the cache for good. Every `remove` therefore bumps
/// a generation under the same mutex; `auth()` takes the generation *before* its database read
/// and inserts with [`TokenCache::insert_if_unchanged`], which does nothing if any revocation
/// happened meanwhile (the next request simply reads the database again). Callers revoke by
/// committing the deletion first and calling `remove` after, so either the read started after
/// the commit (and found nothing) or the generation moved.
#[derive(Default)]
pub struct TokenCache {
    inner: Mutex<TokenMap>,
}

#[derive(Default)]
struct TokenMap {
    map: HashMap<String, (String, String)>,
    generation: u64,
}

impl TokenCache {
    pub fn get(&self, hash: &str) -> Option<(String, String)> {
        lock(&self.inner).map.get(hash).cloned()
    }

    /// The revocation generation; take it before reading a token from the database.
    pub fn generation(&self) -> u64 {
        lock(&self.inner).generation
    }

    /// Caches `who` for `hash` unless a revocation happened since `generation` was read.
    /// Returns whether it was cached.
    pub fn insert_if_unchanged(
        &self,
        generation: u64,
        hash: String,
        who: (String, String),
    ) -> bool {
        let mut inner = lock(&self.inner);
        if inner.generation != generation {
            return false;
        }
        if inner.map.len() > 50_000 {
            inner.map.clear();
        }
        inner.map.insert(hash, who);
        true
    }

    /// Evicts revoked tokens; call after the revoking write has committed.
    pub fn remove(&self, hashes: &[String]) {
        let mut inner = lock(&self.inner);
        inner.generation += 1;
        for h in hashes {
            inner.map.remove(h);
        }
    }
}

#[cfg(test)]
mod token_cache_tests {
    use super::TokenCache;

    fn who() -> (String, String) {
        ("@a:x".into(), "DEV".into())
    }

    #[test]
    fn a_revocation_between_the_read_and_the_insert_wins() {
        let cache = TokenCache::default();
        // auth(): generation taken, then the database read is in flight...
        let gen = cache.generation();
        // ...while a logout commits and evicts the token...
        cache.remove(&["h".into()]);
        // ...then auth() tries to cache what it read before the commit.
        assert!(!cache.insert_if_unchanged(gen, "h".into(), who()));
        assert_eq!(cache.get("h"), None);
    }

    #[test]
    fn without_a_revocation_the_token_is_cached() {
        let cache = TokenCache::default();
        let gen = cache.generation();
        assert!(cache.insert_if_unchanged(gen, "h".into(), who()));
        assert_eq!(cache.get("h"), Some(who()));
        cache.remove(&["h".into()]);
        assert_eq!(cache.get("h"), None);
    }
}

// ---------------------------------------------------------------- metrics

#[derive(Default)]
pub struct Metrics {
    pub requests_total: AtomicU64,
    pub in_flight: AtomicU64,
    pub cancelled_total: AtomicU64,
    pub connections: AtomicU64,
    /// Parked `/sync` long-polls woken by a change on a topic they watch.
    pub sync_wakeups_total: AtomicU64,
    /// `/send_join` answers with partial state (`omit_members=true`, MSC3706).
    pub partial_send_joins_total: AtomicU64,
    /// Our joins answered with partial state (the resync then completes them).
    pub partial_joins_total: AtomicU64,
    /// Rooms joined with partial state and not yet resynced (as the resync worker last saw).
    pub partial_state_rooms: AtomicU64,
    /// Events the running resyncs are fetching and storing.
    pub resync_events_left: AtomicU64,
    /// How long the last completed resync took, from its start, in milliseconds.
    pub resync_last_duration_ms: AtomicU64,
}

impl Metrics {
    /// Prometheus text exposition format.
    pub fn render(
        &self,
        notifier: &Notifier,
        live_tasks: usize,
        writer: &crate::store::writer::WriterStats,
    ) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let db = format!(
            "# HELP hearth_db_commits_total SQLite transactions committed by the writer.\n# TYPE hearth_db_commits_total counter\nhearth_db_commits_total {}\n\
             # HELP hearth_db_writes_total Write operations run by the writer (several per commit under load).\n# TYPE hearth_db_writes_total counter\nhearth_db_writes_total {}\n\
             # HELP hearth_db_failed_writes_total Write operations rolled back alone.\n# TYPE hearth_db_failed_writes_total counter\nhearth_db_failed_writes_total {}\n",
            g(&writer.commits), g(&writer.writes), g(&writer.failed_writes)
        );
        db + &format!(
            "# HELP hearth_http_requests_total HTTP requests received.\n# TYPE hearth_http_requests_total counter\nhearth_http_requests_total {}\n\
             # HELP hearth_http_requests_in_flight HTTP requests being handled now.\n# TYPE hearth_http_requests_in_flight gauge\nhearth_http_requests_in_flight {}\n\
             # HELP hearth_http_requests_cancelled_total Requests dropped because the client disconnected.\n# TYPE hearth_http_requests_cancelled_total counter\nhearth_http_requests_cancelled_total {}\n\
             # HELP hearth_http_connections Open client connections.\n# TYPE hearth_http_connections gauge\nhearth_http_connections {}\n\
             # HELP hearth_tasks_live Tasks alive on the executor.\n# TYPE hearth_tasks_live gauge\nhearth_tasks_live {}\n\
             # HELP hearth_stream_position Latest committed stream position.\n# TYPE hearth_stream_position gauge\nhearth_stream_position {}\n\
             # HELP hearth_sync_wakeups_total Parked /sync long-polls woken by a change they watch.\n# TYPE hearth_sync_wakeups_total counter\nhearth_sync_wakeups_total {}\n\
             # HELP hearth_notify_watched_topics Rooms and users with a parked long-poll watching them.\n# TYPE hearth_notify_watched_topics gauge\nhearth_notify_watched_topics {}\n\
             # HELP hearth_federation_partial_send_joins_total /send_join answers with partial state (omit_members).\n# TYPE hearth_federation_partial_send_joins_total counter\nhearth_federation_partial_send_joins_total {}\n\
             # HELP hearth_federation_partial_joins_total Our joins answered with partial state.\n# TYPE hearth_federation_partial_joins_total counter\nhearth_federation_partial_joins_total {}\n\
             # HELP hearth_partial_state_rooms Rooms joined with partial state, resync not finished.\n# TYPE hearth_partial_state_rooms gauge\nhearth_partial_state_rooms {}\n\
             # HELP hearth_resync_events_left Events the running resyncs still fetch and store.\n# TYPE hearth_resync_events_left gauge\nhearth_resync_events_left {}\n\
             # HELP hearth_resync_last_duration_ms Duration of the last completed resync.\n# TYPE hearth_resync_last_duration_ms gauge\nhearth_resync_last_duration_ms {}\n",
            g(&self.requests_total), g(&self.in_flight), g(&self.cancelled_total), g(&self.connections), live_tasks, notifier.pos(),
            g(&self.sync_wakeups_total), notifier.watched_topics(), g(&self.partial_send_joins_total), g(&self.partial_joins_total),
            g(&self.partial_state_rooms), g(&self.resync_events_left), g(&self.resync_last_duration_ms)
        )
    }
}

/// Decrements a gauge when dropped, however the future holding it ends.
pub struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    pub fn new(g: &'a AtomicU64) -> Self {
        g.fetch_add(1, Ordering::SeqCst);
        Self(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------- shutdown

/// Set once, observed by the accept loops and long-polls.
#[derive(Default)]
pub struct Latch {
    set: AtomicBool,
    event: Event,
}

impl Latch {
    pub fn trigger(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }
    pub async fn wait(&self) {
        loop {
            let l = self.event.listen();
            if self.is_set() {
                return;
            }
            l.await;
        }
    }
    pub fn wait_blocking(&self) {
        loop {
            let l = self.event.listen();
            if self.is_set() {
                return;
            }
            l.wait();
        }
    }
}
