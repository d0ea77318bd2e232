//! Wake-ups without data, addressed to the rooms and users a change concerns.
//!
//! Every change that `/sync` must notice is announced on a [`Topic`]: an event, receipt or
//! typing change on its room; account data, a new membership (invite, join, kick) and later
//! to-device messages and device lists on the user. A long-poll watches its user and the rooms
//! it is joined to, so a message into a busy room wakes that room's members and nobody else.
//!
//! The two rules that make this safe:
//! - **Channels carry no data.** A woken poll rescans the database; a wake-up only says "look
//!   again". A spurious wake-up costs one recomputation.
//! - **A lost wake-up costs latency, never data.** Each topic's slot remembers the last stream
//!   position and ephemeral serial announced on it. A watcher registers its listeners *before*
//!   it compares those marks with what it has seen, and a slot created after a change starts
//!   at the global marks (which the writer raises *before* it announces topics), so a change
//!   is either seen in the marks or delivered to a listener: never neither.
//!
//! Slots live while someone watches them (the map holds `Weak`s, pruned as it grows), so idle
//! rooms and users cost nothing. The partial-state "wait for the resync" and sticky-event
//! delivery will use the same topics.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    task::{Context, Poll},
};

use event_listener::{Event, EventListener, Listener};

/// What a change concerns.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// Everyone joined to the room (events, receipts, typing).
    Room(String),
    /// One user (account data, their own membership changes, invites).
    User(String),
    /// The federation outbox has new rows (the sender worker watches this).
    FederationOutbox,
    /// A sticky event with an earlier expiry than any before it (the expiry worker).
    StickyExpiry,
    /// A room was joined with partial state, or a resync finished (the resync worker; and
    /// `/members` waiting for a room to be fully stated, through its room topic).
    PartialStateResync,
    /// A new event in a room's timeline (the push-rule evaluator, `workers::push`).
    PushEvaluator,
    /// New rows in the push queue, or a new pusher (the push sender).
    PushQueue,
    /// A member event joined a room's timeline (the presence worker: a join brings presence
    /// to the new member's server and the new member's presence to the room's servers).
    Membership,
}

impl Topic {
    pub fn room(r: impl Into<String>) -> Self {
        Topic::Room(r.into())
    }
    pub fn user(u: impl Into<String>) -> Self {
        Topic::User(u.into())
    }
}

/// The marks a watcher compares against: stream position and ephemeral serial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Marks {
    pub pos: i64,
    pub eph: i64,
}

struct Slot {
    pos: AtomicI64,
    eph: AtomicI64,
    event: Event,
}

impl Slot {
    fn marks(&self) -> Marks {
        Marks {
            pos: self.pos.load(Ordering::SeqCst),
            eph: self.eph.load(Ordering::SeqCst),
        }
    }
}

#[derive(Clone, Default)]
pub struct Notifier {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    pos: AtomicI64,
    eph: AtomicI64,
    slots: Mutex<Slots>,
    /// Shutdown only: every watcher also listens here.
    all: Event,
}

#[derive(Default)]
struct Slots {
    map: HashMap<Topic, Weak<Slot>>,
    /// Prune dead entries when the map reaches this size (amortised O(1) per insert).
    prune_at: usize,
}

fn lock(m: &Mutex<Slots>) -> MutexGuard<'_, Slots> {
    // The critical sections only touch the map; a panic inside one cannot break it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Notifier {
    pub fn set_initial(&self, pos: i64) {
        self.inner.pos.store(pos, Ordering::SeqCst);
    }

    /// Called by the writer after a commit that used positions up to `pos`, with the topics
    /// the committed writes concern.
    pub fn advance<'a>(&self, pos: i64, topics: impl IntoIterator<Item = &'a Topic>) {
        // Raise the global mark first: a slot created from now on starts at or above `pos`.
        self.inner.pos.fetch_max(pos, Ordering::SeqCst);
        let slots = lock(&self.inner.slots);
        for t in topics {
            if let Some(slot) = slots.map.get(t).and_then(Weak::upgrade) {
                slot.pos.fetch_max(pos, Ordering::SeqCst);
                slot.event.notify(usize::MAX);
            }
        }
    }

    /// Called when in-memory (ephemeral) data such as typing changes in a room. Returns the
    /// new serial, which the change records so a sync can tell whether it saw it.
    pub fn bump_ephemeral(&self, topic: &Topic) -> i64 {
        self.bump_ephemeral_many(std::slice::from_ref(topic))
    }

    /// One ephemeral change that concerns several topics (a presence change: every room of
    /// its user), under one serial.
    pub fn bump_ephemeral_many(&self, topics: &[Topic]) -> i64 {
        let slots = lock(&self.inner.slots);
        // Under the lock, so the serial and the slots' marks move together for watchers.
        let v = self.inner.eph.fetch_add(1, Ordering::SeqCst) + 1;
        for topic in topics {
            if let Some(slot) = slots.map.get(topic).and_then(Weak::upgrade) {
                slot.eph.fetch_max(v, Ordering::SeqCst);
                slot.event.notify(usize::MAX);
            }
        }
        v
    }

    /// Wakes every watcher without a change (used at shutdown).
    pub fn wake_all(&self) {
        self.inner.all.notify(usize::MAX);
    }

    pub fn pos(&self) -> i64 {
        self.inner.pos.load(Ordering::SeqCst)
    }

    pub fn ephemeral(&self) -> i64 {
        self.inner.eph.load(Ordering::SeqCst)
    }

    pub fn marks(&self) -> Marks {
        Marks {
            pos: self.pos(),
            eph: self.ephemeral(),
        }
    }

    /// Starts watching `topics`. Keep the `Watch` for as long as the set of topics holds (a
    /// long-poll keeps it across its wake-ups); dropping it releases the slots.
    pub fn watch(&self, topics: impl IntoIterator<Item = Topic>) -> Watch {
        let mut slots = lock(&self.inner.slots);
        let start = self.marks();
        let mut held = Vec::new();
        for t in topics {
            let slot = match slots.map.get(&t).and_then(Weak::upgrade) {
                Some(s) => s,
                None => {
                    let s = Arc::new(Slot {
                        pos: AtomicI64::new(start.pos),
                        eph: AtomicI64::new(start.eph),
                        event: Event::new(),
                    });
                    slots.map.insert(t, Arc::downgrade(&s));
                    s
                }
            };
            held.push(slot);
        }
        if slots.map.len() >= slots.prune_at {
            slots.map.retain(|_, w| w.strong_count() > 0);
            slots.prune_at = (slots.map.len() * 2).max(1024);
        }
        drop(slots);
        Watch {
            slots: held,
            notifier: self.clone(),
        }
    }

    /// The last stream position announced on `topic`, if someone watches it (a slot exists
    /// only while watched).
    pub fn topic_pos(&self, topic: &Topic) -> Option<i64> {
        let slots = lock(&self.inner.slots);
        let slot = slots.map.get(topic).and_then(Weak::upgrade)?;
        Some(slot.pos.load(Ordering::SeqCst))
    }

    /// Number of topics with a live watcher (for metrics and tests).
    pub fn watched_topics(&self) -> usize {
        lock(&self.inner.slots)
            .map
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// A set of watched topics.
pub struct Watch {
    slots: Vec<Arc<Slot>>,
    notifier: Notifier,
}

impl Watch {
    /// The highest marks announced on any watched topic.
    fn latest(&self) -> Marks {
        self.slots.iter().fold(Marks::default(), |m, s| {
            let x = s.marks();
            Marks {
                pos: m.pos.max(x.pos),
                eph: m.eph.max(x.eph),
            }
        })
    }

    /// True if a watched topic announced a change after `seen`.
    pub fn changed(&self, seen: Marks) -> bool {
        let m = self.latest();
        m.pos > seen.pos || m.eph > seen.eph
    }

    /// Resolves once a watched topic announces a change after `seen` (at once if one already
    /// did), or at `wake_all` (shutdown). Cancel-safe: dropping it only drops this waiter's
    /// listeners.
    pub async fn changed_since(&self, seen: Marks) {
        // Listen first, then look: a change between the two is in the marks. A slot is only
        // notified after its mark moved, so a wake-up always means "changed" (or shutdown).
        let mut listeners: Vec<EventListener> =
            self.slots.iter().map(|s| s.event.listen()).collect();
        listeners.push(self.notifier.inner.all.listen());
        if self.changed(seen) {
            return;
        }
        AnyOf(listeners).await;
    }

    /// Blocking variant for threads outside the executor (tests, embedding). Returns whether
    /// a change was seen before the timeout.
    pub fn wait_blocking(&self, seen: Marks, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let listeners: Vec<EventListener> =
                self.slots.iter().map(|s| s.event.listen()).collect();
            if self.changed(seen) {
                return true;
            }
            let Some(first) = listeners.into_iter().next() else {
                return false;
            };
            // Blocking callers watch one topic in practice; with several, re-check on a
            // short tick so a change on another topic is still seen.
            let tick = if self.slots.len() > 1 {
                std::time::Duration::from_millis(10)
            } else {
                deadline.saturating_duration_since(std::time::Instant::now())
            };
            first.wait_timeout(tick);
            if std::time::Instant::now() >= deadline {
                return self.changed(seen);
            }
        }
    }
}

/// Resolves when any of its listeners fires.
struct AnyOf(Vec<EventListener>);

impl Future for AnyOf {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        for l in self.0.iter_mut() {
            if Pin::new(l).poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future;

    fn ready<F: Future>(f: F) -> bool {
        let mut f = Box::pin(f);
        future::block_on(future::poll_once(&mut f)).is_some()
    }

    #[test]
    fn a_change_wakes_only_the_topics_it_concerns() {
        let n = Notifier::default();
        let bystander = n.watch([Topic::user("@b:x"), Topic::room("!quiet:x")]);
        let member = n.watch([Topic::user("@m:x"), Topic::room("!busy:x")]);
        let seen = n.marks();
        n.advance(1, [&Topic::room("!busy:x")]);
        assert!(member.changed(seen));
        assert!(!bystander.changed(seen));
        assert!(ready(member.changed_since(seen)));
        assert!(!ready(bystander.changed_since(seen)));
        // The global position still moves (the next sync covers up to it).
        assert_eq!(n.pos(), 1);
    }

    #[test]
    fn a_listener_registered_before_the_change_is_woken() {
        let n = Notifier::default();
        let w = n.watch([Topic::room("!r:x")]);
        let seen = n.marks();
        let mut fut = Box::pin(w.changed_since(seen));
        assert!(future::block_on(future::poll_once(&mut fut)).is_none());
        n.advance(5, [&Topic::room("!r:x")]);
        assert!(future::block_on(future::poll_once(&mut fut)).is_some());
    }

    #[test]
    fn a_slot_created_after_a_change_is_not_behind_it() {
        // The poll read its marks, the writer committed a change for a room nobody watched
        // yet, then the poll started watching: the change must not be lost.
        let n = Notifier::default();
        let seen = n.marks();
        n.advance(3, [&Topic::room("!r:x")]);
        let w = n.watch([Topic::room("!r:x")]);
        assert!(w.changed(seen));
    }

    #[test]
    fn ephemeral_changes_are_per_topic_too() {
        let n = Notifier::default();
        let a = n.watch([Topic::room("!a:x")]);
        let b = n.watch([Topic::room("!b:x")]);
        let seen = n.marks();
        let serial = n.bump_ephemeral(&Topic::room("!a:x"));
        assert_eq!(serial, 1);
        assert!(a.changed(seen));
        assert!(!b.changed(seen));
    }

    #[test]
    fn one_ephemeral_change_on_several_topics_takes_one_serial() {
        let n = Notifier::default();
        let a = n.watch([Topic::room("!a:x")]);
        let b = n.watch([Topic::user("@b:x")]);
        let c = n.watch([Topic::room("!c:x")]);
        let seen = n.marks();
        let serial = n.bump_ephemeral_many(&[Topic::room("!a:x"), Topic::user("@b:x")]);
        assert_eq!(serial, 1);
        assert_eq!(n.ephemeral(), 1);
        assert!(a.changed(seen) && b.changed(seen));
        assert!(!c.changed(seen));
    }

    #[test]
    fn dropped_watches_release_their_slots() {
        let n = Notifier::default();
        {
            let _w: Vec<Watch> = (0..2000)
                .map(|i| n.watch([Topic::user(format!("@u{i}:x"))]))
                .collect();
            assert_eq!(n.watched_topics(), 2000);
        }
        assert_eq!(n.watched_topics(), 0);
        // The next insertions prune the dead entries: the map does not grow without bound.
        for i in 0..3000 {
            drop(n.watch([Topic::user(format!("@v{i}:x"))]));
        }
        assert!(lock(&n.inner.slots).map.len() <= 2048);
    }

    #[test]
    fn wake_all_releases_every_watcher() {
        let n = Notifier::default();
        let w = n.watch([Topic::room("!r:x")]);
        let seen = n.marks();
        let mut fut = Box::pin(w.changed_since(seen));
        assert!(future::block_on(future::poll_once(&mut fut)).is_none());
        n.wake_all();
        assert!(future::block_on(future::poll_once(&mut fut)).is_some());
    }
}
