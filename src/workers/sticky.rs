//! The sticky-event expiry worker: keeps `sticky_events` down to the live sticky events by
//! sleeping until the earliest expiry and deleting what has expired. Readers compare expiries
//! with the clock themselves, so this is housekeeping, never correctness: a late worker only
//! leaves rows that nobody serves. Federation does not depend on it either: an expired event
//! already queued for a destination is still sent (it is an ordinary PDU), and a server that
//! joins is queued only the events live at its join.

use std::time::Duration;

use futures_lite::{future, FutureExt};

use crate::{notify::Topic, store::sticky, App};

/// Longest sleep with nothing to expire (a missed wake-up costs at most this).
const IDLE_SLEEP: Duration = Duration::from_secs(300);

pub async fn expiry(app: App) {
    let watch = app.notifier.watch([Topic::StickyExpiry]);
    loop {
        if app.shutdown.is_set() {
            return;
        }
        // Listen first, then look: an earlier expiry indexed after the scan wakes us.
        let seen = app.notifier.marks();
        let mut woken = std::pin::pin!(watch.changed_since(seen));
        let _ = future::poll_once(woken.as_mut()).await;
        let now = app.clock.now_ms() as i64;
        // A read to find the next expiry; a write only when something has expired.
        let mut next = app.store.read(sticky::next_sticky_expiry).await;
        if matches!(next, Ok(Some(t)) if t <= now) {
            next = app
                .store
                .write(move |tx| {
                    sticky::delete_expired_sticky(tx, now)?;
                    sticky::next_sticky_expiry(tx)
                })
                .await;
        }
        let sleep = match next {
            Ok(Some(t)) => {
                Duration::from_millis(t.saturating_sub(now).max(1) as u64).min(IDLE_SLEEP)
            }
            Ok(None) => IDLE_SLEEP,
            Err(e) => {
                log::error!("sticky expiry: {e}");
                IDLE_SLEEP
            }
        };
        let timer = async {
            smol::Timer::after(sleep).await;
        };
        let stop = async {
            app.shutdown.wait().await;
        };
        woken.or(timer).or(stop).await;
    }
}
