//! The durable federation sender.
//!
//! State lives in the database: the event's own write queues one `outbox` row per
//! destination and announces `Topic::FederationOutbox`; `destinations` keeps each
//! destination's backoff. So a restart neither forgets what is queued nor resets a backoff.
//!
//! - The **supervisor** ([`sender`]) rescans at start-up and on every wake (the outbox topic,
//!   a destination task that finished, an inbound contact from a backed-off destination, the
//!   earliest `retry_at` deadline, a 30 s idle bound, shutdown): every destination with pending
//!   rows, whose `retry_at` has passed and that has no transaction in flight, gets one task.
//! - A **destination task** ([`deliver`]) loops: read up to 50 PDU and 100 EDU rows in `id`
//!   order, send them as one transaction, and after the 200 delete exactly those rows and reset
//!   the backoff in one write. On failure it doubles the backoff (5 s up to 1 hour), records
//!   it and exits; the supervisor comes back at `retry_at`.
//!
//! Cancellation: a destination task dropped mid-send (shutdown) has deleted nothing; its rows
//! are sent again by the next run. The delete is handed to the writer only after the 200, and
//! once handed over it commits even if the task is dropped.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard, PoisonError,
    },
    time::Duration,
};

use event_listener::Event;
use futures_lite::{future, FutureExt};
use ruma::{
    api::federation::transactions::send_transaction_message::v1 as send_txn, serde::Raw,
    MilliSecondsSinceUnixEpoch, OwnedTransactionId, ServerName, UInt,
};
use smol::Task;

use crate::{notify::Topic, store::outbox, App};

/// Most PDUs and EDUs in one transaction (the spec's limits).
pub const MAX_PDUS: usize = 50;
pub const MAX_EDUS: usize = 100;
/// First backoff after a failure; doubled per failure up to [`MAX_BACKOFF_MS`].
pub const MIN_BACKOFF_MS: u64 = 5_000;
/// The backoff cap: a destination that was down is retried at least hourly, never days later.
pub const MAX_BACKOFF_MS: u64 = 3_600_000;
/// How many times a sticky event the destination took without processing it is sent again.
pub const MAX_RESENDS: i64 = 3;
/// The wait before the first such resend; each next one waits four times longer (2 s, 8 s,
/// 32 s): enough for a server to finish the join it was in the middle of.
pub const RESEND_DELAY_MS: u64 = 2_000;
/// Longest sleep of the supervisor: bounds the cost of a lost wake-up.
const IDLE_SLEEP: Duration = Duration::from_secs(30);

/// In-memory companion of the sender (the truth is in the database).
pub struct SenderState {
    /// Destinations known to be in backoff; `None` until the supervisor loaded them, so an
    /// inbound request from a destination that is not in backoff costs no write.
    backed_off: Mutex<Option<HashSet<String>>>,
    /// Wakes the supervisor (a backoff reset by an inbound contact).
    wake: Event,
    /// Per-process prefix of transaction IDs, so IDs never repeat across restarts.
    txn_prefix: String,
    txn_counter: AtomicU64,
    pub transactions_total: AtomicU64,
    pub failures_total: AtomicU64,
    /// Transactions a destination refused for good (dropped, not retried).
    pub dropped_total: AtomicU64,
}

impl Default for SenderState {
    fn default() -> Self {
        Self {
            backed_off: Mutex::new(None),
            wake: Event::new(),
            txn_prefix: format!("{:016x}", rand::random::<u64>()),
            txn_counter: AtomicU64::new(0),
            transactions_total: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
        }
    }
}

impl SenderState {
    fn backed_off(&self) -> MutexGuard<'_, Option<HashSet<String>>> {
        self.backed_off
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn mark(&self, dest: &str, in_backoff: bool) {
        if let Some(set) = self.backed_off().as_mut() {
            if in_backoff {
                set.insert(dest.to_owned());
            } else {
                set.remove(dest);
            }
        }
    }

    /// A fresh transaction ID: the process prefix, the first row carried, a counter (a retry
    /// may carry different rows, so it never reuses an ID the destination may have seen).
    fn txn_id(&self, first_row: i64) -> OwnedTransactionId {
        let n = self.txn_counter.fetch_add(1, Ordering::Relaxed);
        format!("{}.{first_row}.{n}", self.txn_prefix).into()
    }
}

/// `server` just sent us a correctly signed request: if it is in backoff, clear the backoff
/// (one write) and wake the supervisor so its queue goes out now. Costs nothing otherwise.
pub async fn contacted(app: &App, server: &ServerName) {
    let known = app
        .sender
        .backed_off()
        .as_ref()
        .map(|set| set.contains(server.as_str()));
    if known == Some(false) {
        return;
    }
    let dest = server.as_str().to_owned();
    let d = dest.clone();
    let res = app
        .store
        .write(move |tx| {
            let changed = outbox::reset_backoff(tx, &d)?;
            if changed {
                tx.wake(Topic::FederationOutbox);
            }
            Ok(changed)
        })
        .await;
    match res {
        Ok(changed) => {
            app.sender.mark(&dest, false);
            if changed {
                log::info!("federation: {dest} contacted us; its backoff is cleared");
                app.sender.wake.notify(usize::MAX);
            }
        }
        Err(e) => log::warn!("federation: clearing the backoff of {dest}: {e}"),
    }
}

/// The supervisor: one task per due destination, rescans on every wake. Returns at shutdown,
/// dropping (cancelling) the destination tasks.
pub async fn sender(app: App) {
    match app.store.read(outbox::list_backed_off).await {
        Ok(list) => *app.sender.backed_off() = Some(list.into_iter().collect()),
        Err(e) => log::error!("federation sender: loading backoffs: {e}"),
    }
    let watch = app.notifier.watch([Topic::FederationOutbox]);
    let (done_tx, done_rx) = async_channel::unbounded::<String>();
    let mut running: HashMap<String, Task<()>> = HashMap::new();
    loop {
        if app.shutdown.is_set() {
            return;
        }
        // Listen first, then look: a change during or after the scan fires one of these.
        // The outbox wake-up is polled once now so its listeners exist before the scan (an
        // EDU-only write announces the topic without moving a stream position, so only a
        // listener can catch it). Already fired: the scan below sees that change; go again.
        let seen = app.notifier.marks();
        let kicked = app.sender.wake.listen();
        let mut woken = std::pin::pin!(watch.changed_since(seen));
        let early = future::poll_once(woken.as_mut()).await.is_some();
        while let Ok(d) = done_rx.try_recv() {
            running.remove(&d);
        }
        let now = app.clock.now_ms();
        let next_retry = match app
            .store
            .read(move |c| outbox::due_destinations(c, now))
            .await
        {
            Ok((due, next)) => {
                for dest in due {
                    if running.contains_key(&dest) {
                        continue;
                    }
                    let task = app.spawner.spawn(
                        "federation-destination",
                        deliver(app.clone(), dest.clone(), done_tx.clone()),
                    );
                    running.insert(dest, task);
                }
                next
            }
            Err(e) => {
                log::error!("federation sender: scanning the outbox: {e}");
                None
            }
        };
        if early {
            continue;
        }
        let sleep = match next_retry {
            Some(t) => Duration::from_millis(t.saturating_sub(now).max(1)).min(IDLE_SLEEP),
            None => IDLE_SLEEP,
        };
        let woken = async {
            woken.await;
            None
        };
        let kicked = async {
            kicked.await;
            None
        };
        let finished = async { done_rx.recv().await.ok() };
        let timer = async {
            smol::Timer::after(sleep).await;
            None
        };
        let stop = async {
            app.shutdown.wait().await;
            None
        };
        if let Some(d) = woken.or(kicked).or(finished).or(timer).or(stop).await {
            running.remove(&d);
        }
    }
}

/// Sends `dest`'s queue, one transaction at a time, until it is empty or a send fails.
async fn deliver(app: App, dest: String, done: async_channel::Sender<String>) {
    deliver_queue(&app, &dest).await;
    let _ = done.try_send(dest);
}

async fn deliver_queue(app: &App, dest: &str) {
    let server = match ServerName::parse(dest) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("federation: bad destination {dest:?}: {e}");
            failed(app, dest).await;
            return;
        }
    };
    // How many PDU and EDU rows the next transaction may carry: the spec's limits, smaller
    // while narrowing down a refusal (see `narrow`).
    let mut limits = (MAX_PDUS, MAX_EDUS);
    loop {
        if app.shutdown.is_set() {
            return;
        }
        let d = dest.to_owned();
        let batch = match app
            .store
            .read(move |c| outbox::next_batch(c, &d, limits.0, limits.1))
            .await
        {
            Ok(b) => b,
            Err(e) => {
                log::error!("federation: reading the outbox for {dest}: {e}");
                failed(app, dest).await;
                return;
            }
        };
        let Some(&first) = batch.ids.iter().min() else {
            return;
        };
        let ids = batch.ids;
        let carried = (batch.pdus.len(), batch.edus.len());
        let sticky: Vec<bool> = batch
            .pdus
            .iter()
            .map(|p| crate::room::sticky::json_duration_ms(p.get()).is_some())
            .collect();
        let mut again: Vec<(String, i64)> = Vec::new();
        if !batch.pdus.is_empty() || !batch.edus.is_empty() {
            let ts = UInt::new(app.clock.now_ms()).unwrap_or_default();
            let mut req = send_txn::Request::new(
                app.sender.txn_id(first),
                app.server_name.clone(),
                MilliSecondsSinceUnixEpoch(ts),
            );
            let refused_desc = describe(&batch.pdu_ids, &batch.pdus);
            req.pdus = batch.pdus;
            req.edus = batch.edus.into_iter().map(Raw::from_json).collect();
            let (n_pdus, n_edus) = (req.pdus.len(), req.edus.len());
            let txn = req.transaction_id.clone();
            match app.fed.client.send_or_refused(&server, req).await {
                Ok(Ok(res)) => {
                    for (id, r) in &res.pdus {
                        if let Err(e) = r {
                            log::info!("federation: {dest} rejected {id}: {e}");
                        }
                    }
                    let processed: HashSet<&str> = res.pdus.keys().map(|id| id.as_str()).collect();
                    again = resends(&batch.pdu_ids, &batch.pdu_attempts, &sticky, &processed);
                    log::debug!("federation: {dest} took txn {txn} ({n_pdus} PDUs, {n_edus} EDUs)");
                    app.sender
                        .transactions_total
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) if ids.len() > 1 => {
                    // One bad row (or the whole being too large) must not cost its
                    // neighbours, sticky events among them: nothing is dropped, and the
                    // same rows go again in smaller transactions until the refused one is
                    // alone.
                    log::info!(
                        "federation: {dest} refused txn {txn} ({n_pdus} PDUs, {n_edus} EDUs): {e}; narrowing it down"
                    );
                    limits = narrow(carried);
                    continue;
                }
                Ok(Err(e)) => {
                    // Refused for good, alone: sending it again would block every later
                    // event. Logged with what it was (a sticky event is named as such), and
                    // counted in `hearth_federation_dropped_total`.
                    log::warn!(
                        "federation: {dest} refused txn {txn} ({n_pdus} PDUs, {n_edus} EDUs: {}); dropped: {e}",
                        refused_desc
                    );
                    app.sender.dropped_total.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    log::info!("federation: txn {txn} to {dest} failed: {e}");
                    failed(app, dest).await;
                    return;
                }
            }
        }
        let d = dest.to_owned();
        let wait = again
            .iter()
            .map(|(_, n)| resend_delay_ms(*n))
            .max()
            .map(|ms| app.clock.now_ms() + ms);
        let requeued = again.len();
        if let Err(e) = app
            .store
            .write(move |tx| {
                outbox::delete_sent(tx, &d, &ids)?;
                match wait {
                    Some(at) => outbox::requeue(tx, &d, &again, at),
                    None => Ok(()),
                }
            })
            .await
        {
            log::error!("federation: deleting sent rows for {dest}: {e}");
            failed(app, dest).await;
            return;
        }
        if let Some(at) = wait {
            // The destination waits (the supervisor comes back at `retry_at`); a request
            // from it ends the wait early (`contacted`).
            app.sender.mark(dest, true);
            log::info!(
                "federation: {dest} did not process {requeued} sticky event(s); sent again in {} ms",
                at.saturating_sub(app.clock.now_ms())
            );
            return;
        }
        app.sender.mark(dest, false);
        limits = (MAX_PDUS, MAX_EDUS);
    }
}

/// The PDUs of a transaction answered 200 to send again: the sticky events (`sticky`) the
/// answer has no entry for (`processed`: the spec's `pdus` lists the PDUs the destination
/// processed; Synapse leaves out those of a room it does not know yet, which is the case while
/// it is still joining the room we pushed our sticky events to when its join arrived), each
/// at most [`MAX_RESENDS`] times. Other PDUs are not sent again: the room's later events lead
/// the destination to them (`/get_missing_events`), while sticky events pushed to a newly
/// joined server are older than its join and nothing leads to them (MSC4354).
/// Returns `(event_id, attempts)` with `attempts` counting this send.
fn resends(
    ids: &[String],
    attempts: &[i64],
    sticky: &[bool],
    processed: &HashSet<&str>,
) -> Vec<(String, i64)> {
    ids.iter()
        .zip(attempts)
        .zip(sticky)
        .filter(|((id, n), s)| **s && **n < MAX_RESENDS && !processed.contains(id.as_str()))
        .map(|((id, n), _)| (id.clone(), n + 1))
        .collect()
}

/// The wait before the `attempts`-th resend (1-based): [`RESEND_DELAY_MS`], then four times
/// longer each time.
fn resend_delay_ms(attempts: i64) -> u64 {
    RESEND_DELAY_MS.saturating_mul(4u64.saturating_pow(attempts.clamp(1, 8) as u32 - 1))
}

/// The limits of the next transaction after a refused one that carried `carried` (PDUs,
/// EDUs) rows: half of each, and at least one row, so a refusal is narrowed to its one row in
/// a few transactions (50 PDUs: 6 halvings) and only that row is ever dropped.
fn narrow(carried: (usize, usize)) -> (usize, usize) {
    match (carried.0 / 2, carried.1 / 2) {
        (0, 0) if carried.0 > 0 => (1, 0),
        (0, 0) => (0, 1),
        halves => halves,
    }
}

/// The event IDs of PDUs, sticky ones marked, for the log line of a drop.
fn describe(ids: &[String], pdus: &[Box<serde_json::value::RawValue>]) -> String {
    ids.iter()
        .zip(pdus)
        .map(|(id, p)| {
            let sticky = crate::room::sticky::json_duration_ms(p.get()).is_some();
            format!("{id}{}", if sticky { " (sticky)" } else { "" })
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Records a failure: the backoff grows, and the supervisor retries at `retry_at`.
async fn failed(app: &App, dest: &str) {
    app.sender.failures_total.fetch_add(1, Ordering::Relaxed);
    let d = dest.to_owned();
    match app
        .store
        .write(move |tx| outbox::record_failure(tx, &d, MIN_BACKOFF_MS, MAX_BACKOFF_MS))
        .await
    {
        Ok(backoff) => {
            app.sender.mark(dest, true);
            log::info!("federation: {dest} backs off for {} s", backoff / 1000);
        }
        Err(e) => log::error!("federation: recording the backoff of {dest}: {e}"),
    }
}

/// The federation part of `/_hearth/metrics` (Prometheus text format).
pub fn render_metrics(app: &App, depths: &[(String, u64)]) -> String {
    let total: u64 = depths.iter().map(|(_, n)| n).sum();
    let mut out = format!(
        "# HELP hearth_federation_queue_depth_total Outbox rows waiting to be sent, all destinations.\n# TYPE hearth_federation_queue_depth_total gauge\nhearth_federation_queue_depth_total {total}\n\
         # HELP hearth_federation_queue_depth Outbox rows waiting to be sent, per destination.\n# TYPE hearth_federation_queue_depth gauge\n"
    );
    for (d, n) in depths {
        let label = d.replace('\\', "\\\\").replace('"', "\\\"");
        out.push_str(&format!(
            "hearth_federation_queue_depth{{destination=\"{label}\"}} {n}\n"
        ));
    }
    out.push_str(&format!(
        "# HELP hearth_federation_transactions_total Transactions a destination answered with 200.\n# TYPE hearth_federation_transactions_total counter\nhearth_federation_transactions_total {}\n\
         # HELP hearth_federation_failures_total Transactions that failed (the destination backs off).\n# TYPE hearth_federation_failures_total counter\nhearth_federation_failures_total {}\n\
         # HELP hearth_federation_dropped_total Transactions a destination refused for good (4xx), dropped.\n# TYPE hearth_federation_dropped_total counter\nhearth_federation_dropped_total {}\n",
        app.sender.transactions_total.load(Ordering::Relaxed),
        app.sender.failures_total.load(Ordering::Relaxed),
        app.sender.dropped_total.load(Ordering::Relaxed),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::{narrow, resend_delay_ms, resends, MAX_RESENDS};
    use std::collections::HashSet;

    #[test]
    fn only_unprocessed_sticky_events_go_again_and_only_a_few_times() {
        let ids: Vec<String> = ["$a", "$b", "$c", "$d"].map(String::from).to_vec();
        let sticky = [true, false, true, true];
        let processed: HashSet<&str> = ["$c"].into_iter().collect();
        // $a: sticky, unprocessed; $b: not sticky; $c: processed; $d: sent too often already.
        let again = resends(&ids, &[0, 0, 0, MAX_RESENDS], &sticky, &processed);
        assert_eq!(again, vec![("$a".to_owned(), 1)]);
        let again = resends(&ids, &[2, 0, 0, 0], &sticky, &HashSet::new());
        let want = [("$a", 3), ("$c", 1), ("$d", 1)].map(|(e, n)| (e.to_owned(), n));
        assert_eq!(again, want);
        assert_eq!(
            (1..=3).map(resend_delay_ms).collect::<Vec<_>>(),
            [2_000, 8_000, 32_000]
        );
    }

    #[test]
    fn a_refusal_narrows_to_one_row_in_a_few_steps() {
        let mut limits = (50, 100);
        let mut steps = 0;
        while limits.0 + limits.1 > 1 {
            limits = narrow(limits);
            steps += 1;
        }
        assert_eq!(limits.0 + limits.1, 1);
        assert!(steps <= 7, "{steps}");
        assert_eq!(narrow((0, 3)), (0, 1));
        assert_eq!(narrow((1, 1)), (1, 0));
    }
}
