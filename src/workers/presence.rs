//! The presence worker: runs presence's timers (idle, offline, `currently_active`, federation
//! pings), announces changes to `/sync` (see `crate::presence`), sends local users' changes to
//! the servers sharing a room with them (at most one update per user per
//! [`crate::presence::FEDERATION_MIN_INTERVAL_MS`], the latest state), and persists the entries that changed:
//! every [`PERSIST_EVERY`] and at shutdown, in one write. Presence itself never waits for it:
//! a lost or late run costs latency (or, for a kill -9, the last minute of status changes),
//! never a wrong answer.

use std::{collections::BTreeMap, time::Duration};

use futures_lite::FutureExt;
use ruma::{
    api::federation::transactions::edu::{Edu, PresenceContent, PresenceUpdate},
    OwnedUserId, UInt,
};

use crate::{
    error::Result,
    presence::{announce_pending, Status},
    store::presence::{list_user_destinations, upsert_presence},
    App,
};

/// How often changed entries are written.
const PERSIST_EVERY: Duration = Duration::from_secs(60);
/// Longest sleep: timers run on the server's clock, which tests move by hand, so the worker
/// looks at it at least this often (Synapse checks its timers every 5 s).
const MAX_SLEEP: Duration = Duration::from_secs(5);

pub async fn worker(app: App) {
    if !app.presence.enabled() {
        return;
    }
    let mut next_persist = std::time::Instant::now() + PERSIST_EVERY;
    loop {
        // Listen first, then look: work queued after the scan fires the listener.
        let work = app.presence.listen();
        let now = app.clock.now_ms();
        app.presence.tick(now);
        if let Err(e) = announce_pending(&app).await {
            log::error!("presence: announcing: {e}");
        }
        let fed_next = match federate(&app, now).await {
            Ok(n) => n,
            Err(e) => {
                log::error!("presence: federation: {e}");
                None
            }
        };
        if std::time::Instant::now() >= next_persist {
            persist(&app).await;
            next_persist = std::time::Instant::now() + PERSIST_EVERY;
        }
        if app.shutdown.is_set() {
            break;
        }
        let until = app
            .presence
            .next_deadline()
            .min(fed_next.unwrap_or(u64::MAX));
        let sleep = Duration::from_millis(until.saturating_sub(now).max(1)).min(MAX_SLEEP);
        let woken = async {
            work.await;
        };
        let timer = async {
            smol::Timer::after(sleep).await;
        };
        let stop = async {
            app.shutdown.wait().await;
        };
        woken.or(timer).or(stop).await;
        if app.shutdown.is_set() {
            break;
        }
    }
    persist(&app).await;
}

/// Writes the entries changed since the last write, in one write; on failure they stay dirty.
async fn persist(app: &App) {
    let rows = app.presence.take_dirty();
    if rows.is_empty() {
        return;
    }
    let users: Vec<String> = rows.iter().map(|r| r.user_id.clone()).collect();
    if let Err(e) = app.store.write(move |tx| upsert_presence(tx, &rows)).await {
        log::error!("presence: persisting: {e}");
        app.presence.mark_dirty(users);
    }
}

/// Queues one `m.presence` EDU per destination with the due local users sharing a room with
/// it, in one write. Returns when the next rate-limited user may go.
async fn federate(app: &App, now: u64) -> Result<Option<u64>> {
    let (due, later) = app.presence.take_federation_due(now);
    if due.is_empty() {
        return Ok(later);
    }
    let us = app.server_name.to_string();
    let edus = app
        .store
        .read(move |c| {
            let mut by_dest: BTreeMap<String, Vec<PresenceUpdate>> = BTreeMap::new();
            for (user, status) in &due {
                let Some(update) = update_for(user, status, now) else {
                    continue;
                };
                for dest in list_user_destinations(c, user, &us)? {
                    by_dest.entry(dest).or_default().push(update.clone());
                }
            }
            Ok(by_dest)
        })
        .await?;
    if edus.is_empty() {
        return Ok(later);
    }
    let edus: Vec<(String, String)> = edus
        .into_iter()
        .map(|(dest, push)| {
            let edu = serde_json::to_string(&Edu::Presence(PresenceContent::new(push)))?;
            Ok((dest, edu))
        })
        .collect::<Result<_>>()?;
    app.store
        .write(move |tx| {
            for (dest, edu) in &edus {
                crate::store::queries::insert_outbox_edu(tx, std::slice::from_ref(dest), edu)?;
            }
            Ok(())
        })
        .await?;
    Ok(later)
}

/// The federation form of a local user's status (ruma's type).
fn update_for(user: &str, s: &Status, now: u64) -> Option<PresenceUpdate> {
    let user_id = OwnedUserId::try_from(user).ok()?;
    let ago = UInt::new_saturating(now.saturating_sub(s.last_active_ts));
    let mut u = PresenceUpdate::new(user_id, s.state.clone(), ago);
    u.status_msg = s.status_msg.clone();
    u.currently_active = s.currently_active;
    Some(u)
}
