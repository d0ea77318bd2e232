//! The partial-state resync (Synapse's faster-joins notes, MSC3902): for each room joined
//! with partial state, fetch the full state before the join and complete the room.
//!
//! A supervisor rescans `partial_state_rooms` at start-up, on `Topic::PartialStateResync`
//! (a partial join was committed) and every 30 s, and runs one task per room. A room's task
//! asks `/state_ids` at the join event of the server joined through, then of the other
//! servers the join answer named, until one answers; fetches the events it lacks (`/state`
//! when many are missing, `/event` one by one when few), checks and stores them (one write,
//! so what was fetched survives a restart and is not fetched again), then completes the room
//! (a second write: the missing state entries, the room no longer partial). Progress is the
//! database: a restart finds the room still listed, and the events already held are skipped.
//! Nothing is awaited inside a write; a task dropped at shutdown loses only its fetches in
//! flight. After the completion, the events recorded while the room was partial are
//! re-authorised on the full state (`room::reauth`), a bounded batch per write; rooms with
//! recorded events left (a restart in between) are picked up by the same scan.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_lite::{future, FutureExt};
use ruma::{
    api::federation::event::{get_event, get_room_state, get_room_state_ids},
    OwnedEventId, OwnedRoomId, OwnedServerName, RoomVersionId,
};

use crate::{
    error::{Error, Result},
    notify::Topic,
    ops::federation::verify_pdu,
    room::receive::{self, Incoming},
    store::partial::{self as p, PartialRoom},
    App,
};

/// A rescan with nothing woken (a lost wake-up costs at most this).
const IDLE_SLEEP: Duration = Duration::from_secs(30);
/// First wait after every server failed for a room; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Fewer missing events than this are fetched one by one with `/event`.
const FETCH_ONE_BY_ONE: usize = 10;

pub async fn resync(app: App) {
    let watch = app.notifier.watch([Topic::PartialStateResync]);
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    while !app.shutdown.is_set() {
        // Listen first, then scan: a join committed during the scan wakes the next round.
        let mut woken = std::pin::pin!(watch.changed_since(app.notifier.marks()));
        let _ = future::poll_once(woken.as_mut()).await;
        match app.store.read(p::list_partial_state_rooms).await {
            Ok(rooms) => {
                app.metrics
                    .partial_state_rooms
                    .store(rooms.len() as u64, Ordering::Relaxed);
                for room in rooms {
                    let fresh = running
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(room.room_id.clone());
                    if fresh {
                        let guard = Running(running.clone(), room.room_id.clone());
                        let app2 = app.clone();
                        app.spawner.spawn_detached("resync-room", async move {
                            let _guard = guard;
                            resync_room(&app2, room).await;
                        });
                    }
                }
            }
            Err(e) => log::error!("resync: listing partial-state rooms: {e}"),
        }
        // Rooms completed whose re-authorisation a restart interrupted.
        match app
            .store
            .read(crate::store::reauth::list_reauth_rooms)
            .await
        {
            Ok(rooms) => {
                for room_id in rooms {
                    let fresh = running
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(room_id.clone());
                    if fresh {
                        let guard = Running(running.clone(), room_id.clone());
                        let app2 = app.clone();
                        app.spawner.spawn_detached("reauth-room", async move {
                            let _guard = guard;
                            if let Err(e) = reauth_room(&app2, &room_id).await {
                                log::error!("re-authorising {room_id}: {}", e.message);
                            }
                        });
                    }
                }
            }
            Err(e) => log::error!("resync: listing rooms to re-authorise: {e}"),
        }
        woken.or(pause(&app, IDLE_SLEEP)).await;
    }
}

/// Sleeps for `d`, or until shutdown.
async fn pause(app: &App, d: Duration) {
    let sleep = async {
        smol::Timer::after(d).await;
    };
    sleep.or(app.shutdown.wait()).await;
}

/// Removes a room from the running set when its task ends, however it ends.
struct Running(Arc<Mutex<HashSet<String>>>, String);

impl Drop for Running {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

/// Counts a resync's events in `hearth_resync_events_left` for as long as it lives (until
/// they are stored, or the attempt fails or is dropped).
struct EventsLeft<'a>(&'a AtomicU64, u64);

impl<'a> EventsLeft<'a> {
    fn new(app: &'a App, n: usize) -> Self {
        app.metrics
            .resync_events_left
            .fetch_add(n as u64, Ordering::Relaxed);
        Self(&app.metrics.resync_events_left, n as u64)
    }
}

impl Drop for EventsLeft<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// One room's loop: every server in turn until one resync succeeds, then backoff and again.
async fn resync_room(app: &App, room: PartialRoom) {
    let mut backoff = FIRST_BACKOFF;
    let started = std::time::Instant::now();
    loop {
        if app.shutdown.is_set() {
            return;
        }
        let rid = room.room_id.clone();
        let others = app
            .store
            .read(move |c| p::list_partial_state_servers(c, &rid))
            .await
            .unwrap_or_default();
        let mut servers = vec![room.joined_via.clone()];
        servers.extend(
            others
                .into_iter()
                .filter(|s| *s != room.joined_via && *s != app.server_name.as_str()),
        );
        for server in servers {
            let Ok(name) = OwnedServerName::try_from(server.as_str()) else {
                continue;
            };
            let attempt = resync_from(app, &room, &name);
            let stop = async {
                app.shutdown.wait().await;
                Err(Error::internal("shutting down"))
            };
            match attempt.or(stop).await {
                Ok(()) => {
                    app.metrics
                        .resync_last_duration_ms
                        .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    log::info!(
                        "resync of {} from {server} done in {:?}",
                        room.room_id,
                        started.elapsed()
                    );
                    return;
                }
                Err(e) => log::info!("resync of {} from {server}: {}", room.room_id, e.message),
            }
            if app.shutdown.is_set() {
                return;
            }
        }
        pause(app, backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One attempt against one server: `/state_ids` at the join, the missing events fetched,
/// checked and stored, then the room completed.
async fn resync_from(app: &App, room: &PartialRoom, server: &OwnedServerName) -> Result<()> {
    let room_id = OwnedRoomId::try_from(room.room_id.as_str()).map_err(Error::internal)?;
    let join = OwnedEventId::try_from(room.join_event_id.as_str()).map_err(Error::internal)?;
    let rid = room.room_id.clone();
    let version: RoomVersionId = app
        .store
        .read(move |c| {
            crate::room::build::room_version(
                c,
                &OwnedRoomId::try_from(rid).map_err(Error::internal)?,
            )
        })
        .await?;
    let ids = app
        .fed
        .client
        .send(
            server,
            get_room_state_ids::v1::Request::new(join.clone(), room_id.clone()),
        )
        .await?;
    let state_ids: Vec<String> = ids.pdu_ids.iter().map(|e| e.to_string()).collect();
    let all: Vec<String> = state_ids
        .iter()
        .cloned()
        .chain(ids.auth_chain_ids.iter().map(|e| e.to_string()))
        .collect();
    let wanted = all.clone();
    let held: HashSet<String> = app
        .store
        .read(move |c| p::list_held(c, &wanted))
        .await?
        .into_iter()
        .collect();
    let missing: HashSet<&str> = all
        .iter()
        .map(String::as_str)
        .filter(|e| !held.contains(*e))
        .collect();
    log::info!(
        "resync of {room_id} from {server}: {} state events, {} to fetch",
        state_ids.len(),
        missing.len()
    );
    let _left = EventsLeft::new(app, missing.len());
    let mut fetched: Vec<Incoming> = Vec::new();
    if missing.len() >= FETCH_ONE_BY_ONE {
        let res = app
            .fed
            .client
            .send(
                server,
                get_room_state::v1::Request::new(join.clone(), room_id.clone()),
            )
            .await?;
        for raw in res.pdus.iter().chain(res.auth_chain.iter()) {
            let Ok((_, id, _)) = receive::parse(raw, &version) else {
                continue;
            };
            if missing.contains(id.as_str()) {
                fetched.push(verify_pdu(app, raw, &version).await?);
            }
        }
    } else {
        for id in &missing {
            let id = OwnedEventId::try_from(*id).map_err(|e| Error::bad_json(e.to_string()))?;
            let res = app
                .fed
                .client
                .send(server, get_event::v1::Request::new(id.clone()))
                .await?;
            let inc = verify_pdu(app, &res.pdu, &version).await?;
            if inc.pdu.event_id != id {
                return Err(Error::bad_json(format!(
                    "{server} answered {id} with another event"
                )));
            }
            fetched.push(inc);
        }
    }
    if fetched.iter().any(|i| i.pdu.room_id != room_id) {
        return Err(Error::bad_json(format!(
            "{server} sent events of another room"
        )));
    }
    app.store
        .write(move |tx| crate::room::partial::commit_fetched(tx, fetched))
        .await?;
    let (rid, jid) = (room.room_id.clone(), room.join_event_id.clone());
    app.store
        .write(move |tx| crate::room::partial::complete(tx, &rid, &jid, &state_ids))
        .await?;
    reauth_room(app, &room.room_id).await
}

/// Re-authorises the events recorded while the room was partial, one bounded write per batch
/// (each batch deletes its rows: a restart resumes with the next one).
async fn reauth_room(app: &App, room_id: &str) -> Result<()> {
    let mut total = crate::room::reauth::Flipped::default();
    loop {
        let rid = room_id.to_owned();
        let (flipped, more) = app
            .store
            .write(move |tx| crate::room::reauth::reauth_batch(tx, &rid))
            .await?;
        total.rejected += flipped.rejected;
        total.accepted += flipped.accepted;
        if !more || app.shutdown.is_set() {
            break;
        }
    }
    log::info!(
        "{room_id} re-authorised on full state: {} rejected, {} accepted",
        total.rejected,
        total.accepted
    );
    Ok(())
}
