//! The presence worker: runs presence's timers (idle, offline, `currently_active`, federation
//! pings), announces changes to `/sync` (see `crate::presence`), sends local users' changes to
//! the servers sharing a room with them (at most one update per user per
//! [`crate::presence::FEDERATION_MIN_INTERVAL_MS`], the latest state), and persists the entries that changed:
//! every [`PERSIST_EVERY`] and at shutdown, in one write. It also watches joins (as Synapse's
//! `_on_user_joined_room`): a local user joining a room has their presence sent to the room's
//! other servers, and a server newly in a room (its first user joined) is sent the presence
//! of the room's local members, so both sides see each other at once rather than at the next
//! change or ping. Presence itself never waits for it:
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
    notify::Topic,
    presence::{announce_pending, Status},
    store::{
        presence::{list_user_destinations, upsert_presence},
        pushfix as pf,
    },
    App,
};

/// Joins looked at per read.
const JOINS_BATCH: usize = 200;
/// A remote user's join is answered this long after it reached us: the joining server stores
/// the room only once our `send_join` answer is back, and drops presence about users it does
/// not yet share a room with.
const REMOTE_JOIN_GRACE_MS: u64 = 1_000;

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
    // Joins from now on (earlier ones were handled by the previous run, or are covered by the
    // periodic pings).
    let joins = app.notifier.watch([Topic::Membership]);
    let mut joins_done = app.notifier.pos();
    loop {
        // Listen first, then look: work queued after the scan fires the listener.
        let work = app.presence.listen();
        let seen = app.notifier.marks();
        let now = app.clock.now_ms();
        app.presence.tick(now);
        let joins_next = match joined(&app, joins_done, seen.pos, now).await {
            Ok((done, next)) => {
                joins_done = done;
                next
            }
            Err(e) => {
                log::error!("presence: joins: {e}");
                None
            }
        };
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
            .min(fed_next.unwrap_or(u64::MAX))
            .min(joins_next.unwrap_or(u64::MAX));
        let sleep = Duration::from_millis(until.saturating_sub(now).max(1)).min(MAX_SLEEP);
        let woken = async {
            work.or(joins.changed_since(seen)).await;
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
    queue_edus(app, edus).await?;
    Ok(later)
}

/// Sends presence for the joins in `(after, upto]` (see the module doc) in one write; returns
/// how far it got, and when to look again for a remote join too recent to answer yet.
async fn joined(app: &App, after: i64, upto: i64, now: u64) -> Result<(i64, Option<u64>)> {
    if after >= upto {
        return Ok((after, None));
    }
    let us = app.server_name.to_string();
    let presence = &app.presence;
    let (done, retry, wanted) = app
        .store
        .read(move |c| {
            let joins = pf::list_joins_between(c, after, upto, JOINS_BATCH)?;
            let mut done = match joins.last() {
                Some(j) if joins.len() == JOINS_BATCH => j.pos,
                _ => upto,
            };
            let mut retry = None;
            // (destinations, users whose presence they get)
            let mut wanted: Vec<(Vec<String>, Vec<String>)> = Vec::new();
            for j in joins {
                let Some((_, server)) = j.user_id.split_once(':') else {
                    continue;
                };
                let ready = j.received_ts.max(0) as u64 + REMOTE_JOIN_GRACE_MS;
                if server != us && ready > now {
                    // Too recent: this one and everything after it wait.
                    done = j.pos - 1;
                    retry = Some(ready);
                    break;
                }
                if server == us {
                    let dests = crate::store::queries::list_room_servers(c, &j.room_id, &us)?;
                    wanted.push((dests, vec![j.user_id]));
                } else if !crate::store::queries::server_has_joined_member(
                    c, &j.room_id, server, &j.user_id,
                )? {
                    let (local, _) =
                        crate::store::push::list_joined_local(c, &j.room_id, &us, i64::MAX)?;
                    let users = local.into_iter().map(|m| m.user_id).collect();
                    wanted.push((vec![server.to_owned()], users));
                }
            }
            Ok((done, retry, wanted))
        })
        .await?;
    // Offline users are not sent (the default for anyone unknown).
    let mut by_dest: BTreeMap<String, Vec<PresenceUpdate>> = BTreeMap::new();
    for (dests, users) in wanted {
        let updates: Vec<PresenceUpdate> = users
            .iter()
            .map(|u| (u, presence.get(u)))
            .filter(|(_, s)| s.state != ruma::presence::PresenceState::Offline)
            .filter_map(|(u, s)| update_for(u, &s, now))
            .collect();
        if updates.is_empty() {
            continue;
        }
        for d in dests {
            by_dest
                .entry(d)
                .or_default()
                .extend(updates.iter().cloned());
        }
    }
    queue_edus(app, by_dest).await?;
    Ok((done, retry))
}

/// Queues one `m.presence` EDU per destination, in one write.
async fn queue_edus(app: &App, by_dest: BTreeMap<String, Vec<PresenceUpdate>>) -> Result<()> {
    if by_dest.is_empty() {
        return Ok(());
    }
    let edus: Vec<(String, String)> = by_dest
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
        .await
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
