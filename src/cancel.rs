//! Drop-based request cancellation primitives.
//!
//! This is the Rust reading of Synapse's
//! `docs/development/synapse_architecture/cancellation.md`. In Rust a request
//! is cancelled by *dropping* its future (tide does so when the client goes
//! away), which can happen at any `.await`. Three rules follow:
//!
//! 1. Code between two `.await`s runs to completion, but nothing after an
//!    `.await` is guaranteed to run. Cleanup therefore lives in `Drop` impls.
//! 2. Work shared by several waiters ([`ResponseCache`]) must not be cancelled
//!    because one waiter went away, so it runs in its own task.
//! 3. Work that must finish once started ([`shield`], Synapse's
//!    `stop_cancellation`) is spawned and only *awaited* by the request.
//!
//! Everything runs on one `Arc<Executor<'static>>` driven by a single thread,
//! but tide requires `Send` futures, so shared state is `Send + Sync`. We use
//! `std::sync::Mutex` because no guard is ever held across an `.await`: every
//! critical section is a few lines of synchronous bookkeeping.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use async_executor::Executor;
use event_listener::Event;
use futures_lite::future;
use smol::{Task, Timer};

/// Locks a mutex, recovering from poisoning. Our critical sections keep their
/// data consistent at every step, and several of them run inside `Drop`
/// impls, where panicking during an unwind would abort the whole server.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Source of fresh task ids, so every background task has its own log
/// context (`task=bg-17`) rather than borrowing the request's.
static NEXT_TASK_ID: AtomicU64 = AtomicU64::new(1);

/// Counts live tasks so that shutdown can wait for them.
#[derive(Default)]
struct Tracker {
    live: AtomicUsize,
    idle: Event,
}

/// Lives inside every spawned future: dropped when the task finishes *or* is
/// cancelled (task handle dropped, executor dropped), so the count is exact.
struct LiveTask {
    tracker: Arc<Tracker>,
    label: String,
    finished: bool,
}

impl LiveTask {
    fn finished(mut self) {
        self.finished = true;
    }
}

impl Drop for LiveTask {
    fn drop(&mut self) {
        let how = match (self.finished, std::thread::panicking()) {
            (true, _) => "finished",
            (false, true) => "panicked",
            (false, false) => "cancelled",
        };
        log::debug!("task={} {how}", self.label);
        if self.tracker.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tracker.idle.notify(usize::MAX);
        }
    }
}

/// A cheap, cloneable handle for spawning onto the server's executor while
/// keeping count of live tasks.
#[derive(Clone)]
pub struct Spawner {
    ex: Arc<Executor<'static>>,
    tracker: Arc<Tracker>,
}

impl Spawner {
    /// Wraps the (single) executor the server runs on.
    pub fn new(ex: Arc<Executor<'static>>) -> Self {
        Spawner {
            ex,
            tracker: Arc::default(),
        }
    }

    /// The underlying executor, e.g. to drive it in tests.
    pub fn executor(&self) -> &Arc<Executor<'static>> {
        &self.ex
    }

    /// Spawns `fut` as a tracked task. Dropping the returned [`Task`] cancels
    /// it (that is the point of keeping a handle); `.detach()` it otherwise.
    pub fn spawn<T: Send + 'static>(
        &self,
        name: &str,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Task<T> {
        self.ex.spawn(self.track(name, fut))
    }

    /// Spawns background work nobody awaits. It is logged under its own
    /// `task=<name>-<id>` context, never the request's, because it outlives
    /// the request that started it.
    pub fn spawn_detached(&self, name: &str, fut: impl Future<Output = ()> + Send + 'static) {
        self.spawn(name, fut).detach();
    }

    /// Number of spawned tasks that have neither finished nor been cancelled.
    pub fn live_tasks(&self) -> usize {
        self.tracker.live.load(Ordering::Acquire)
    }

    /// Resolves once no tracked task is alive. Someone must be driving the
    /// executor meanwhile (e.g. `ex.run(spawner.wait_idle())`).
    pub async fn wait_idle(&self) {
        loop {
            let listener = self.tracker.idle.listen();
            if self.live_tasks() == 0 {
                return;
            }
            listener.await;
        }
    }

    fn track<T>(
        &self,
        name: &str,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> impl Future<Output = T> + Send + 'static {
        let id = NEXT_TASK_ID.fetch_add(1, Ordering::Relaxed);
        self.tracker.live.fetch_add(1, Ordering::AcqRel);
        // Created now, not on first poll, so a task cancelled before it ever
        // ran still decrements the count.
        let live = LiveTask {
            tracker: self.tracker.clone(),
            label: format!("{name}-{id}"),
            finished: false,
        };
        async move {
            log::debug!("task={} start", live.label);
            let out = fut.await;
            live.finished();
            out
        }
    }
}

/// Future returned by [`shield`]: resolves to the work's result; dropping it
/// detaches the work instead of cancelling it.
#[must_use = "dropping a Shielded does not cancel the work; use spawn_detached if you don't need the result"]
pub struct Shielded<T>(Option<Task<T>>);

impl<T> Future for Shielded<T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let task = self.0.as_mut().expect("only Drop takes the task");
        Pin::new(task).poll(cx)
    }
}

impl<T> Drop for Shielded<T> {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.detach();
        }
    }
}

/// Synapse's `stop_cancellation`: runs `fut` in its own task so that it
/// completes even if the caller is dropped (client disconnect). Use it for
/// multi-step writes that would leave inconsistent state if interrupted.
pub fn shield<T: Send + 'static>(
    spawner: &Spawner,
    name: &str,
    fut: impl Future<Output = T> + Send + 'static,
) -> Shielded<T> {
    Shielded(Some(spawner.spawn(name, fut)))
}

/// Time source for [`ResponseCache`] (`Instant::now` in production), so
/// tests can move time by hand instead of sleeping.
pub type Clock = dyn Fn() -> Instant + Send + Sync;

/// Outcome slot of one shared computation; each waiter holds an `Arc` and
/// listens on `event`, so waiters come and go without affecting the work.
struct Slot<V> {
    state: Mutex<Option<Result<V, ()>>>,
    event: Event,
}

impl<V: Clone> Slot<V> {
    fn set(&self, outcome: Result<V, ()>) {
        *lock(&self.state) = Some(outcome);
        self.event.notify(usize::MAX);
    }

    async fn wait(&self, cache: &str) -> V {
        loop {
            let listener = self.event.listen();
            let outcome = lock(&self.state).clone();
            match outcome {
                Some(Ok(v)) => return v,
                Some(Err(())) => {
                    panic!("response cache {cache}: shared computation panicked or was cancelled")
                }
                None => listener.await,
            }
        }
    }
}

enum Entry<V> {
    Pending(Arc<Slot<V>>),
    Done(V),
}

struct CacheState<K, V> {
    entries: HashMap<K, Entry<V>>,
    /// Completion order; `keep_for` is constant, so this is sorted by expiry
    /// and eviction only ever looks at the front (amortised O(1)).
    expiries: VecDeque<(Instant, K)>,
}

struct CacheInner<K, V> {
    spawner: Spawner,
    name: String,
    keep_for: Duration,
    clock: Arc<Clock>,
    state: Mutex<CacheState<K, V>>,
}

enum Lookup<V> {
    Hit(V),
    Wait(Arc<Slot<V>>),
    Miss(Arc<Slot<V>>),
}

/// Synapse's `ResponseCache`: identical concurrent requests share one
/// computation, and its result is kept for `keep_for` so that a client that
/// retries after a disconnect gets the answer at once instead of redoing work.
///
/// The computation runs in its own task, so dropping any or all waiters never
/// cancels it. Every value is cached, including `Err` values if `V` is a
/// `Result`. Expired entries are evicted lazily on every access, so the map
/// holds at most what completed within the last `keep_for`, plus in-flight work.
pub struct ResponseCache<K, V> {
    inner: Arc<CacheInner<K, V>>,
}

impl<K, V> Clone for ResponseCache<K, V> {
    fn clone(&self) -> Self {
        ResponseCache {
            inner: self.inner.clone(),
        }
    }
}

impl<K, V> ResponseCache<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A cache using the real monotonic clock.
    pub fn new(spawner: &Spawner, name: &str, keep_for: Duration) -> Self {
        Self::with_clock(spawner, name, keep_for, Arc::new(Instant::now))
    }

    /// A cache with an injected clock (tests).
    pub fn with_clock(
        spawner: &Spawner,
        name: &str,
        keep_for: Duration,
        clock: Arc<Clock>,
    ) -> Self {
        let state = Mutex::new(CacheState {
            entries: HashMap::new(),
            expiries: VecDeque::new(),
        });
        let inner = CacheInner {
            spawner: spawner.clone(),
            name: name.to_owned(),
            keep_for,
            clock,
            state,
        };
        ResponseCache {
            inner: Arc::new(inner),
        }
    }

    /// Returns the cached or in-flight result for `key`, or starts `make()`
    /// in a new task. `make` is only called if no computation exists.
    pub async fn get_or_compute<F, Fut>(&self, key: K, make: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let slot = match self.lookup(&key) {
            Lookup::Hit(value) => return value,
            Lookup::Wait(slot) => slot,
            Lookup::Miss(slot) => {
                self.start(key, slot.clone(), make);
                slot
            }
        };
        slot.wait(&self.inner.name).await
    }

    /// Number of entries (in flight or cached), after evicting expired ones.
    pub fn len(&self) -> usize {
        let mut state = lock(&self.inner.state);
        evict_expired(&mut state, (self.inner.clock)());
        state.entries.len()
    }

    /// Whether [`len`](Self::len) is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, key: &K) -> Lookup<V> {
        let mut state = lock(&self.inner.state);
        evict_expired(&mut state, (self.inner.clock)());
        match state.entries.get(key) {
            Some(Entry::Done(value)) => Lookup::Hit(value.clone()),
            Some(Entry::Pending(slot)) => Lookup::Wait(slot.clone()),
            None => {
                let slot = Arc::new(Slot {
                    state: Mutex::new(None),
                    event: Event::new(),
                });
                state
                    .entries
                    .insert(key.clone(), Entry::Pending(slot.clone()));
                Lookup::Miss(slot)
            }
        }
    }

    fn start<F, Fut>(&self, key: K, slot: Arc<Slot<V>>, make: F)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        // Armed before `make()` runs, so a panic anywhere from here on
        // removes the pending entry and releases the waiters.
        let completer = Completer {
            cache: self.inner.clone(),
            key,
            slot,
            armed: true,
        };
        let fut = make();
        self.inner
            .spawner
            .spawn_detached(&self.inner.name, async move {
                let value = fut.await;
                completer.complete(value);
            });
    }
}

fn evict_expired<K: Eq + Hash, V>(state: &mut CacheState<K, V>, now: Instant) {
    // Each `Done` entry has exactly one record, pushed when it completed, and
    // `Done` entries are removed nowhere else, so a due record is always the
    // key's current entry.
    while state
        .expiries
        .front()
        .is_some_and(|(expires, _)| *expires <= now)
    {
        if let Some((_, key)) = state.expiries.pop_front() {
            state.entries.remove(&key);
        }
    }
}

/// Owned by the computation task; publishes the result, or on drop without
/// a result (panic, executor shutdown) fails the slot and forgets the key.
struct Completer<K: Eq + Hash, V: Clone> {
    cache: Arc<CacheInner<K, V>>,
    key: K,
    slot: Arc<Slot<V>>,
    armed: bool,
}

impl<K: Eq + Hash + Clone, V: Clone> Completer<K, V> {
    fn complete(mut self, value: V) {
        self.armed = false;
        let expires = (self.cache.clock)() + self.cache.keep_for;
        let mut state = lock(&self.cache.state);
        if self.is_current(&state) {
            let entry = Entry::Done(value.clone());
            state.entries.insert(self.key.clone(), entry);
            state.expiries.push_back((expires, self.key.clone()));
        }
        drop(state);
        self.slot.set(Ok(value));
    }
}

impl<K: Eq + Hash, V: Clone> Completer<K, V> {
    fn is_current(&self, state: &CacheState<K, V>) -> bool {
        matches!(state.entries.get(&self.key), Some(Entry::Pending(s)) if Arc::ptr_eq(s, &self.slot))
    }
}

impl<K: Eq + Hash, V: Clone> Drop for Completer<K, V> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = lock(&self.cache.state);
        if self.is_current(&state) {
            state.entries.remove(&self.key);
        }
        drop(state);
        self.slot.set(Err(()));
    }
}

/// A queued waiter. `granted` is only written under the key-map mutex.
struct Ticket {
    granted: AtomicBool,
    event: Event,
}

#[derive(Default)]
struct KeyState {
    holders: usize,
    queue: VecDeque<Arc<Ticket>>,
}

impl KeyState {
    /// Hands free slots to the oldest waiters (FIFO).
    fn grant_next(&mut self, max_count: usize) {
        while self.holders < max_count {
            let Some(ticket) = self.queue.pop_front() else {
                break;
            };
            self.holders += 1;
            ticket.granted.store(true, Ordering::Release);
            ticket.event.notify(1);
        }
    }
}

struct LinInner<K> {
    name: String,
    max_count: usize,
    keys: Mutex<HashMap<K, KeyState>>,
}

impl<K: Eq + Hash + Clone> LinInner<K> {
    /// Takes the lock at once (`None`) or joins the queue (`Some(ticket)`).
    fn enter(&self, key: &K) -> Option<Arc<Ticket>> {
        let mut keys = lock(&self.keys);
        let state = keys.entry(key.clone()).or_default();
        if state.holders < self.max_count && state.queue.is_empty() {
            state.holders += 1;
            return None;
        }
        let ticket = Arc::new(Ticket {
            granted: AtomicBool::new(false),
            event: Event::new(),
        });
        state.queue.push_back(ticket.clone());
        log::debug!(
            "linearizer {}: waiting, {} queued",
            self.name,
            state.queue.len()
        );
        Some(ticket)
    }

    /// Releases a held slot (`ticket` is `None` or granted), or withdraws a
    /// queued ticket; then drops the key if nobody holds or wants it.
    fn leave(&self, key: &K, ticket: Option<&Arc<Ticket>>) {
        let mut keys = lock(&self.keys);
        let Some(state) = keys.get_mut(key) else {
            return;
        };
        match ticket {
            Some(t) if !t.granted.load(Ordering::Acquire) => {
                state.queue.retain(|q| !Arc::ptr_eq(q, t))
            }
            _ => {
                state.holders -= 1;
                state.grant_next(self.max_count);
            }
        }
        if state.holders == 0 && state.queue.is_empty() {
            keys.remove(key);
        }
    }
}

/// Synapse's `Linearizer`: per-key FIFO mutual exclusion (or at most
/// `max_count` concurrent holders per key), e.g. to serialise work per room.
///
/// Cancel-safe: a waiter dropped while queued leaves the queue; one dropped
/// after being handed the lock but before seeing it passes the lock on; a
/// dropped guard releases immediately. Idle keys are removed from the map.
pub struct Linearizer<K> {
    inner: Arc<LinInner<K>>,
}

impl<K> Clone for Linearizer<K> {
    fn clone(&self) -> Self {
        Linearizer {
            inner: self.inner.clone(),
        }
    }
}

/// Drop guard for a queued [`Linearizer::lock`] call.
struct Queued<'a, K: Eq + Hash + Clone> {
    inner: &'a LinInner<K>,
    key: &'a K,
    ticket: Arc<Ticket>,
    armed: bool,
}

impl<K: Eq + Hash + Clone> Queued<'_, K> {
    async fn granted(&self) {
        loop {
            let listener = self.ticket.event.listen();
            if self.ticket.granted.load(Ordering::Acquire) {
                return;
            }
            listener.await;
        }
    }
}

impl<K: Eq + Hash + Clone> Drop for Queued<'_, K> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.leave(self.key, Some(&self.ticket));
        }
    }
}

impl<K: Eq + Hash + Clone> Linearizer<K> {
    /// One holder per key.
    pub fn new(name: &str) -> Self {
        Self::with_max_count(name, 1)
    }

    /// Up to `max_count` (at least 1) concurrent holders per key.
    pub fn with_max_count(name: &str, max_count: usize) -> Self {
        let inner = LinInner {
            name: name.to_owned(),
            max_count: max_count.max(1),
            keys: Mutex::default(),
        };
        Linearizer {
            inner: Arc::new(inner),
        }
    }

    /// Waits for a slot on `key`, in arrival order. Safe to drop at any time.
    pub async fn lock(&self, key: K) -> LinearizerGuard<K> {
        if let Some(ticket) = self.inner.enter(&key) {
            let mut queued = Queued {
                inner: &self.inner,
                key: &key,
                ticket,
                armed: true,
            };
            queued.granted().await;
            queued.armed = false; // ownership of the slot moves to the guard
        }
        LinearizerGuard {
            inner: self.inner.clone(),
            key,
        }
    }

    /// Number of keys that are held or waited on.
    pub fn key_count(&self) -> usize {
        lock(&self.inner.keys).len()
    }
}

/// Holds one slot of a [`Linearizer`] key; dropping it wakes the next waiter.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LinearizerGuard<K: Eq + Hash + Clone> {
    inner: Arc<LinInner<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Drop for LinearizerGuard<K> {
    fn drop(&mut self) {
        self.inner.leave(&self.key, None);
    }
}

/// Upper bound on drop points explored by [`drop_at_every_await`].
pub const MAX_DROP_POINTS: usize = 10_000;
/// How long [`drop_at_every_await`] waits for a wake-up before declaring a hang.
pub const WAKE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_SETTLE_TICKS: usize = 100_000;

/// Waker that records that it was called and wakes a listener.
#[derive(Default)]
struct WakeSignal {
    woken: AtomicBool,
    event: Event,
}

impl Wake for WakeSignal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.event.notify(usize::MAX);
    }
}

impl WakeSignal {
    /// Runs the executor (and, via `smol::block_on`, timers and I/O) until
    /// the waker fires; panics after [`WAKE_TIMEOUT`].
    fn wait_driving(&self, ex: &Executor<'_>, run: usize, pending: usize) {
        let woken = async {
            loop {
                let listener = self.event.listen();
                if self.woken.swap(false, Ordering::AcqRel) {
                    return true;
                }
                listener.await;
            }
        };
        let timeout = async {
            Timer::after(WAKE_TIMEOUT).await;
            false
        };
        let ok = smol::block_on(ex.run(future::or(woken, timeout)));
        assert!(ok, "drop_at_every_await: run {run}: future not woken within {WAKE_TIMEOUT:?} after Pending #{pending} (lost wake-up or deadlock)");
    }
}

/// Polls `fut` until it completes (`Some`) or returns its `n`-th `Pending`,
/// at which point it is dropped (`None`).
fn run_until_nth_pending<T>(
    ex: &Executor<'_>,
    fut: impl Future<Output = T>,
    n: usize,
) -> Option<(usize, T)> {
    let signal = Arc::new(WakeSignal::default());
    let waker = Waker::from(signal.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    let mut pendings = 0;
    loop {
        if let Poll::Ready(value) = fut.as_mut().poll(&mut cx) {
            return Some((pendings, value));
        }
        pendings += 1;
        if pendings == n {
            return None; // `fut` is dropped here, right after its n-th Pending
        }
        signal.wait_driving(ex, n, pendings);
    }
}

/// Runs ready executor tasks until none is left.
fn settle(ex: &Executor<'_>) {
    for _ in 0..MAX_SETTLE_TICKS {
        if !ex.try_tick() {
            return;
        }
    }
    panic!("drop_at_every_await: executor still busy after {MAX_SETTLE_TICKS} ticks (a task is spinning)");
}

/// Cancellation test harness: drops a fresh future at every `.await` it
/// suspends at, checking invariants after each drop.
///
/// For `n = 1, 2, ...`: build a fresh future with `make()` and poll it on the
/// calling thread with a private waker. After each `Pending` other than the
/// `n`-th, wait for that waker to fire while driving `ex` via
/// `smol::block_on(ex.run(..))`, so spawned tasks (shared computations,
/// shielded work), timers, and I/O or `smol::unblock` thread-pool work all
/// progress; if no wake-up arrives within [`WAKE_TIMEOUT`] it panics instead
/// of hanging. Right after the `n`-th `Pending` the future is dropped,
/// `ex.try_tick()` runs until no task is ready (no timers or I/O are
/// awaited: `check` can itself do `smol::block_on(ex.run(spawner.wait_idle()))`
/// if it needs background work finished), and then `check(n)` runs.
///
/// The first run that completes before its `n`-th `Pending` ends the
/// exploration; its number of `Pending`s and its output are returned. So a
/// future that suspends three times gets `check(1)`, `check(2)`, `check(3)`
/// and returns `(3, output)`. Panics after [`MAX_DROP_POINTS`] drop points.
/// `ex` must not be driven by another thread meanwhile, or `settle` may race.
pub fn drop_at_every_await<F, Fut, T>(
    ex: &Executor<'_>,
    mut make: F,
    mut check: impl FnMut(usize),
) -> (usize, T)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    for n in 1..=MAX_DROP_POINTS {
        if let Some(done) = run_until_nth_pending(ex, make(), n) {
            return done;
        }
        settle(ex);
        check(n);
    }
    panic!("drop_at_every_await: future still pending after {MAX_DROP_POINTS} drop points");
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_channel::{Receiver, Sender};
    use futures_lite::future::yield_now;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::Ordering::SeqCst;

    fn setup() -> (Arc<Executor<'static>>, Spawner) {
        let ex = Arc::new(Executor::new());
        (ex.clone(), Spawner::new(ex))
    }

    /// Polls once with a no-op waker.
    fn poll<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
        future::block_on(future::poll_once(f))
    }

    /// Drives the executor until no tracked task is alive (or fails at 5s).
    fn run_idle(sp: &Spawner) {
        let idle = async {
            sp.wait_idle().await;
            true
        };
        let timeout = async {
            Timer::after(WAKE_TIMEOUT).await;
            false
        };
        let idle = smol::block_on(sp.executor().run(future::or(idle, timeout)));
        assert!(idle, "{} tasks still alive", sp.live_tasks());
    }

    fn settle_only(ex: &Executor<'_>) {
        while ex.try_tick() {}
    }

    #[test]
    fn spawner_counts_finished_and_cancelled_tasks() {
        let (ex, sp) = setup();
        let (tx, rx) = async_channel::bounded::<()>(1);
        let r = rx.clone();
        sp.spawn_detached("bg", async move { r.recv().await.ok().unwrap_or(()) });
        let fg = sp.spawn("fg", async move { rx.recv().await.ok() });
        assert_eq!(sp.live_tasks(), 2);
        drop(fg); // cancelled before it ever ran
        settle_only(&ex);
        assert_eq!(sp.live_tasks(), 1);
        tx.try_send(()).unwrap();
        run_idle(&sp);
        assert_eq!(sp.live_tasks(), 0);
    }

    #[test]
    fn shield_completes_after_its_waiter_is_dropped() {
        let (_ex, sp) = setup();
        let (tx, rx) = async_channel::bounded::<()>(1);
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let mut waiter = shield(&sp, "persist", async move {
            rx.recv().await.ok();
            d.store(true, SeqCst);
        });
        assert!(poll(&mut waiter).is_none());
        drop(waiter);
        tx.try_send(()).unwrap();
        run_idle(&sp);
        assert!(
            done.load(SeqCst),
            "shielded work was cancelled with its waiter"
        );
    }

    /// A cache whose computation counts its runs and waits for a gate.
    struct Fx {
        sp: Spawner,
        cache: ResponseCache<&'static str, u32>,
        runs: Arc<AtomicUsize>,
        gate: (Sender<()>, Receiver<()>),
    }

    impl Fx {
        fn new(clock: Arc<Clock>) -> Fx {
            let (_ex, sp) = setup();
            let cache = ResponseCache::with_clock(&sp, "sync", Duration::from_secs(10), clock);
            let (runs, gate) = (Arc::default(), async_channel::unbounded());
            Fx {
                sp,
                cache,
                runs,
                gate,
            }
        }

        fn waiter(&self) -> Pin<Box<impl Future<Output = u32>>> {
            let (cache, runs, gate) = (self.cache.clone(), self.runs.clone(), self.gate.1.clone());
            Box::pin(async move {
                let make = move || {
                    runs.fetch_add(1, SeqCst);
                    async move { gate.recv().await.map_or(0, |()| 7) }
                };
                cache.get_or_compute("k", make).await
            })
        }

        fn waiters(&self, n: usize) -> Vec<Pin<Box<impl Future<Output = u32>>>> {
            let mut ws: Vec<_> = (0..n).map(|_| self.waiter()).collect();
            ws.iter_mut().for_each(|w| assert!(poll(w).is_none()));
            ws
        }

        fn finish(&self) {
            self.gate.0.try_send(()).unwrap();
            run_idle(&self.sp);
        }
    }

    #[test]
    fn cache_concurrent_waiters_share_one_computation() {
        let fx = Fx::new(Arc::new(Instant::now));
        let mut ws = fx.waiters(5);
        fx.finish();
        for w in &mut ws {
            assert_eq!(poll(w), Some(7));
        }
        assert_eq!(fx.runs.load(SeqCst), 1);
    }

    #[test]
    fn cache_dropping_some_waiters_leaves_the_rest_the_answer() {
        let fx = Fx::new(Arc::new(Instant::now));
        let mut ws = fx.waiters(5);
        let mut last = ws.pop().unwrap();
        drop(ws);
        fx.finish();
        assert_eq!(poll(&mut last), Some(7));
        assert_eq!(fx.runs.load(SeqCst), 1);
    }

    #[test]
    fn cache_dropping_all_waiters_still_completes_and_caches() {
        let fx = Fx::new(Arc::new(Instant::now));
        drop(fx.waiters(5));
        fx.finish();
        assert_eq!(fx.cache.len(), 1);
        // A retrying client gets the answer without any executor progress.
        assert_eq!(poll(&mut fx.waiter()), Some(7));
        assert_eq!(fx.runs.load(SeqCst), 1);
    }

    #[test]
    fn cache_evicts_after_keep_for() {
        let (base, offset) = (Instant::now(), Arc::new(Mutex::new(Duration::ZERO)));
        let o = offset.clone();
        let fx = Fx::new(Arc::new(move || base + *o.lock().unwrap()));
        let mut w = fx.waiters(1).remove(0);
        fx.finish();
        assert_eq!(poll(&mut w), Some(7));
        *offset.lock().unwrap() = Duration::from_secs(9);
        assert_eq!(poll(&mut fx.waiter()), Some(7));
        assert_eq!((fx.cache.len(), fx.runs.load(SeqCst)), (1, 1));
        *offset.lock().unwrap() = Duration::from_secs(11);
        assert_eq!(fx.cache.len(), 0);
        assert!(
            poll(&mut fx.waiter()).is_none(),
            "expired entry must be recomputed"
        );
        assert_eq!(fx.runs.load(SeqCst), 2);
    }

    #[test]
    fn cache_panicking_computation_releases_waiters_and_key() {
        let (_ex, sp) = setup();
        let cache = ResponseCache::<u8, u8>::new(&sp, "boom", Duration::from_secs(10));
        let mut w = Box::pin(cache.get_or_compute(1, || async { panic!("computation failed") }));
        assert!(poll(&mut w).is_none());
        run_idle(&sp);
        assert!(catch_unwind(AssertUnwindSafe(|| poll(&mut w))).is_err());
        assert_eq!(cache.len(), 0, "failed computation must not stay cached");
    }

    #[test]
    fn linearizer_is_fifo() {
        let lin = Linearizer::new("fifo");
        let mut held = poll(&mut Box::pin(lin.lock(1))).unwrap();
        let mut ws: Vec<_> = (0..4).map(|_| Box::pin(lin.lock(1))).collect();
        ws.iter_mut().for_each(|w| assert!(poll(w).is_none()));
        for i in 0..ws.len() {
            drop(held);
            for later in &mut ws[i + 1..] {
                assert!(poll(later).is_none(), "a later waiter jumped the queue");
            }
            held = poll(&mut ws[i]).expect("oldest waiter gets the lock");
        }
        drop(held);
        assert_eq!(lin.key_count(), 0);
    }

    #[test]
    fn linearizer_dropped_queued_waiter_does_not_block() {
        let lin = Linearizer::new("drop");
        let held = poll(&mut Box::pin(lin.lock("k"))).unwrap();
        let (mut w1, mut w2) = (Box::pin(lin.lock("k")), Box::pin(lin.lock("k")));
        assert!(poll(&mut w1).is_none() && poll(&mut w2).is_none());
        drop(w1);
        drop(held);
        let g2 = poll(&mut w2).expect("w2 must not wait for the dropped w1");
        drop(g2);
        assert_eq!(lin.key_count(), 0);
    }

    #[test]
    fn linearizer_granted_but_unobserved_waiter_passes_lock_on() {
        let lin = Linearizer::new("handoff");
        let held = poll(&mut Box::pin(lin.lock("k"))).unwrap();
        let (mut w1, mut w2) = (Box::pin(lin.lock("k")), Box::pin(lin.lock("k")));
        assert!(poll(&mut w1).is_none() && poll(&mut w2).is_none());
        drop(held); // hands the lock to w1...
        drop(w1); // ...which is dropped before it polls again
        assert!(poll(&mut w2).is_some(), "lock was lost with w1");
        assert_eq!(lin.key_count(), 0);
    }

    #[test]
    fn linearizer_guard_drop_releases_and_keys_are_removed() {
        let lin = Linearizer::with_max_count("max2", 2);
        let a = poll(&mut Box::pin(lin.lock("k"))).unwrap();
        let b = poll(&mut Box::pin(lin.lock("k"))).unwrap();
        let other = poll(&mut Box::pin(lin.lock("other"))).expect("keys are independent");
        let mut c = Box::pin(lin.lock("k"));
        assert!(poll(&mut c).is_none(), "third holder exceeds max_count");
        assert_eq!(lin.key_count(), 2);
        drop((a, other));
        let c = poll(&mut c).expect("guard drop releases at once");
        assert_eq!(lin.key_count(), 1);
        drop((b, c));
        assert_eq!(lin.key_count(), 0);
    }

    #[test]
    fn drop_at_every_await_visits_each_suspension_point() {
        let (ex, _sp) = setup();
        let (mut made, mut points) = (0, Vec::new());
        let make = || {
            made += 1;
            async {
                yield_now().await;
                yield_now().await;
                yield_now().await;
                42
            }
        };
        let result = drop_at_every_await(&ex, make, |n| points.push(n));
        assert_eq!(result, (3, 42));
        assert_eq!(points, [1, 2, 3]);
        assert_eq!(made, 4);
    }

    #[test]
    fn drop_at_every_await_leaves_no_lock_held_with_linearizer_and_shield() {
        let (ex, sp) = setup();
        let lin = Linearizer::new("room");
        let (entered, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let make = || {
            let (lin, sp, entered, done) = (lin.clone(), sp.clone(), entered.clone(), done.clone());
            async move {
                let first = lin.lock("!room").await;
                let holder = sp.spawn("holder", async move {
                    yield_now().await;
                    drop(first);
                });
                let guard = lin.lock("!room").await; // queued behind `holder`
                                                     // A blocking "DB read" that is still running at its first poll, so the
                                                     // number of suspension points does not depend on the thread pool's timing.
                let read = smol::unblock(|| {
                    std::thread::sleep(Duration::from_millis(2));
                    5
                })
                .await;
                entered.fetch_add(1, SeqCst);
                let out = shield(&sp, "persist", async move {
                    Timer::after(Duration::from_millis(1)).await;
                    done.fetch_add(1, SeqCst);
                    drop(guard);
                    read * 2
                });
                let out = out.await;
                holder.await;
                out
            }
        };
        let check = |n: usize| {
            run_idle(&sp);
            assert_eq!(lin.key_count(), 0, "lock still held after drop point {n}");
            assert_eq!(
                entered.load(SeqCst),
                done.load(SeqCst),
                "shielded work cancelled at {n}"
            );
            assert!(poll(&mut Box::pin(lin.lock("!room"))).is_some());
        };
        let (pendings, out) = drop_at_every_await(&ex, make, check);
        assert_eq!(out, 10);
        // The queued lock and the shield's timer always suspend; the
        // blocking read may already be done by its first poll.
        assert!(
            pendings >= 2,
            "expected lock and shield to suspend: {pendings}"
        );
        assert!(
            done.load(SeqCst) >= 2,
            "dropped-at-shield run and final run"
        );
    }

    #[test]
    #[should_panic(expected = "not woken within")]
    fn drop_at_every_await_fails_instead_of_hanging_on_lost_wakeup() {
        let (ex, _sp) = setup();
        drop_at_every_await(&ex, future::pending::<()>, |_| {});
    }

    #[test]
    fn futures_are_send() {
        fn assert_send<T: Send + 'static>(_: T) {}
        let (_ex, sp) = setup();
        let lin = Linearizer::<String>::new("send");
        let cache = ResponseCache::<String, u32>::new(&sp, "send", Duration::ZERO);
        assert_send(async move {
            let _guard = lin.lock("a".into()).await;
            cache.get_or_compute("a".into(), || async { 1 }).await
        });
        assert_send(shield(&sp, "send", async {}));
    }
}
