//! Long-running tasks, spawned by `server::run` through the tracked spawner. Each one sleeps
//! until its next deadline or a wake-up, then rescans its state, so a lost wake-up only delays
//! it. `federation` is the durable federation sender, `sticky` the sticky-event expiry,
//! `presence` presence's timers, federation and persistence, `resync` the partial-state resync,
//! `push` the push-rule evaluator and sender, `push_prune` the pruning of old notifications.

pub mod federation;
pub mod presence;
pub mod push;
pub mod push_prune;
pub mod resync;
pub mod sticky;

use std::time::Duration;

use futures_lite::FutureExt;

use crate::App;

/// Longest sleep when nothing is pending: bounds the cost of a missed wake-up.
const IDLE_SLEEP: Duration = Duration::from_secs(30);

/// Expires typing notifications when their timeout runs out, so long-polling clients see the
/// user stop typing even if the client never says so; a local user's expiry is also told to
/// the room's other servers (`typing: false`, as Synapse does), which would otherwise show the
/// user typing until their own timeout (30 to 60 s) ran out. Dropped at shutdown between two
/// of these sends, a stop is lost and the other servers' own timeout ends the typing.
pub async fn typing_expiry(app: App) {
    let ours = format!(":{}", app.server_name);
    loop {
        // Listen first, then look: an entry added after the scan below (perhaps with an
        // earlier deadline) fires the listener, so it is never slept past.
        let added = app.typing.listen_added();
        let now = app.clock.now_ms();
        for (room, user) in app.typing.expire(now) {
            if !user.ends_with(&ours) {
                continue;
            }
            let (Ok(room), Ok(user)) = (
                ruma::OwnedRoomId::try_from(room),
                ruma::OwnedUserId::try_from(user),
            ) else {
                continue;
            };
            if let Err(e) = crate::ops::edu::queue_typing(&app, &room, &user, false).await {
                log::warn!("typing: telling other servers {user} stopped in {room}: {e}");
            }
        }
        let sleep = match app.typing.next_expiry() {
            Some(t) => Duration::from_millis(t.saturating_sub(now).max(1)),
            None => IDLE_SLEEP,
        };
        let woken = async {
            added.await;
        };
        let stop = async {
            app.shutdown.wait().await;
        };
        let timer = async {
            smol::Timer::after(sleep).await;
        };
        if app.shutdown.is_set() {
            return;
        }
        woken.or(timer).or(stop).await;
        if app.shutdown.is_set() {
            return;
        }
    }
}
