//! Pruning old notifications, so `push_actions` stays bounded by what users have not read.
//!
//! Synapse's rules (`event_push_actions.py`): a read receipt deletes the non-highlight actions
//! it covers, non-highlight actions older than a day are deleted once rotated into its
//! per-room summary, and highlights are kept for 30 days (`stream_ordering_month_ago`), which
//! is what `/notifications` can show. Hearth has no summary table: its unread counts are the
//! rows after the user's receipts, so an unread row must stay. The rule here is therefore: a
//! notification **covered by the user's read receipt** goes once it is older than a day, or
//! 30 days for a highlight. Read rows are not counted, so pruning never changes a count and
//! wakes nobody.
//!
//! The job runs every `[push] prune_every_secs` (and once shortly after start). It walks the
//! old rows oldest first on the read pool, [`BATCH`] at a time, and deletes the doomed ones of
//! each batch in one short write, pausing between batches: the writer is never held for more
//! than a batch of deletes.

use std::{collections::HashMap, time::Duration};

use futures_lite::FutureExt;

use crate::{
    error::Result,
    ops::push::is_read,
    store::{push as sp, pushfix as pf},
    App,
};

/// Read notifications are kept this long (Synapse deletes rotated ones after a day).
pub const READ_KEEP_MS: i64 = 24 * 3600 * 1000;
/// Read highlights are kept this long (Synapse's month for highlights).
pub const HIGHLIGHT_KEEP_MS: i64 = 30 * 24 * 3600 * 1000;
/// Rows looked at per read, at most deleted per write.
const BATCH: usize = 500;
/// Pause between two batches: lets other writes through.
const PAUSE: Duration = Duration::from_millis(20);
/// The first run, after start.
const FIRST_RUN: Duration = Duration::from_secs(1);

pub async fn pruner(app: App) {
    let every = app.config.push.prune_every_secs;
    if every == 0 {
        return;
    }
    let mut sleep = FIRST_RUN;
    loop {
        let stop = async {
            app.shutdown.wait().await;
            true
        };
        let timer = async {
            smol::Timer::after(sleep).await;
            false
        };
        if timer.or(stop).await {
            return;
        }
        match prune_once(&app).await {
            Ok(0) => {}
            Ok(n) => log::info!("push: pruned {n} old notifications"),
            Err(e) => log::error!("push: pruning: {e}"),
        }
        sleep = Duration::from_secs(every);
    }
}

/// One pass over the notifications older than [`READ_KEEP_MS`]; returns how many went.
pub async fn prune_once(app: &App) -> Result<usize> {
    let now = app.clock.now_ms() as i64;
    let (day_ago, month_ago) = (now - READ_KEEP_MS, now - HIGHLIGHT_KEEP_MS);
    let mut cursor = (i64::MIN, String::new(), i64::MIN);
    let mut pruned = 0;
    while !app.shutdown.is_set() {
        let after = cursor.clone();
        let (seen, last, doomed) = app
            .store
            .read(move |c| {
                let rows =
                    pf::list_old_push_actions(c, (after.0, &after.1, after.2), day_ago, BATCH)?;
                let mut receipts: HashMap<(String, String), Vec<(String, i64)>> = HashMap::new();
                let mut doomed = Vec::new();
                for r in &rows {
                    if r.highlight && r.ts >= month_ago {
                        continue;
                    }
                    let key = (r.user_id.clone(), r.room_id.clone());
                    if !receipts.contains_key(&key) {
                        let positions = sp::list_receipt_positions(c, &r.user_id, &r.room_id)?;
                        receipts.insert(key.clone(), positions);
                    }
                    if is_read(&receipts[&key], &r.thread_id, r.pos) {
                        doomed.push((r.user_id.clone(), r.pos));
                    }
                }
                let last = rows.last().map(|r| (r.ts, r.user_id.clone(), r.pos));
                Ok((rows.len(), last, doomed))
            })
            .await?;
        if !doomed.is_empty() {
            pruned += doomed.len();
            app.store
                .write(move |tx| pf::delete_push_actions(tx, &doomed))
                .await?;
        }
        match last {
            Some(l) if seen == BATCH => cursor = l,
            _ => break,
        }
        smol::Timer::after(PAUSE).await;
    }
    Ok(pruned)
}
