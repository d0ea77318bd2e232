//! Wake-ups without data. The writer advances the stream position after each commit; typing
//! changes bump their own serial. Long-polling `/sync` waits here and then rescans the
//! database, so a missed wake-up costs latency, never data.

use std::sync::{
    atomic::{AtomicI64, Ordering},
    Arc,
};

use event_listener::{Event, Listener};

#[derive(Clone, Default)]
pub struct Notifier {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    pos: AtomicI64,
    ephemeral: AtomicI64,
    changed: Event,
}

impl Notifier {
    pub fn set_initial(&self, pos: i64) {
        self.inner.pos.store(pos, Ordering::SeqCst);
    }

    /// Called by the writer after a commit that used positions up to `pos`.
    pub fn advance(&self, pos: i64) {
        self.inner.pos.fetch_max(pos, Ordering::SeqCst);
        self.inner.changed.notify(usize::MAX);
    }

    /// Called when in-memory (ephemeral) data such as typing changes.
    pub fn bump_ephemeral(&self) -> i64 {
        let v = self.inner.ephemeral.fetch_add(1, Ordering::SeqCst) + 1;
        self.inner.changed.notify(usize::MAX);
        v
    }

    /// Wakes every waiter without a change (used at shutdown).
    pub fn wake_all(&self) {
        self.inner.changed.notify(usize::MAX);
    }

    pub fn pos(&self) -> i64 {
        self.inner.pos.load(Ordering::SeqCst)
    }

    pub fn ephemeral(&self) -> i64 {
        self.inner.ephemeral.load(Ordering::SeqCst)
    }

    /// Resolves once `(pos, ephemeral)` differs from `seen` (at once if it already does).
    /// Cancel-safe: dropping it only drops this waiter's listener.
    pub async fn changed_since(&self, seen: (i64, i64)) {
        loop {
            let listener = self.inner.changed.listen();
            if (self.pos(), self.ephemeral()) != seen {
                return;
            }
            listener.await;
        }
    }

    /// Blocking variant for threads outside the executor (tests, embedding).
    pub fn wait_blocking(&self, seen: (i64, i64), timeout: std::time::Duration) -> bool {
        let listener = self.inner.changed.listen();
        if (self.pos(), self.ephemeral()) != seen {
            return true;
        }
        listener.wait_timeout(timeout).is_some()
    }
}
