//! Push: the rule evaluator and the sender to push gateways.
//!
//! The **evaluator** resumes from its durable position (`meta.push_pos`), evaluates the next
//! batch of events on the read pool (`ops::push::evaluate`: one evaluation per local member,
//! kept off the writer) and stores the outcome with the new position in one write
//! (`ops::push::commit`). Woken by `Topic::PushEvaluator` (every persisted event) and at start.
//!
//! The **sender** drains the push queue: for each due pusher the oldest queued notification is
//! POSTed to the gateway's `/_matrix/push/v1/notify`; the queue row is deleted after the
//! gateway's 200, a pushkey the gateway lists in `rejected` removes the pusher, anything else
//! (unreachable, timeout, 5xx, 429) backs the pusher off (1 s doubling up to 1 h, kept in
//! `pushers` across restarts). Another 4xx means the gateway will never take this notification:
//! it is dropped, as retrying would block the pusher's queue forever.

use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_lite::{future, AsyncReadExt, FutureExt};
use serde_json::{json, Map, Value};

use crate::{
    error::{Error, Result},
    notify::Topic,
    ops::push::{self as ops, RulesCache},
    room::format::client_event,
    store::push::{self as sp, NotificationRow, PusherRow},
    App,
};

/// How far the evaluator has got, in memory, for `/sync`: every event at or below
/// [`Progress::upto`] has been evaluated and its counts committed. A long-poll woken by a
/// message waits (briefly) for it, so the message and the counts it moved go out in one
/// response: one wake-up per message instead of two (the event, then the counts' own stream
/// position). A slow evaluator costs that wait and then the second wake-up, never a count.
#[derive(Default)]
pub struct Progress {
    upto: AtomicI64,
    moved: event_listener::Event,
}

impl Progress {
    pub fn upto(&self) -> i64 {
        self.upto.load(Ordering::SeqCst)
    }

    fn advance(&self, pos: i64) {
        if self.upto.fetch_max(pos, Ordering::SeqCst) < pos {
            self.moved.notify(usize::MAX);
        }
    }

    /// Waits until every event up to `pos` is evaluated, for at most `limit`. Returns whether
    /// it had to wait (the caller then looks at the stream again). Cancel-safe.
    pub async fn wait_for(&self, pos: i64, limit: Duration) -> bool {
        if self.upto() >= pos {
            return false;
        }
        let deadline = std::time::Instant::now() + limit;
        loop {
            // Listen first, then look: an advance in between is seen by the look.
            let moved = self.moved.listen();
            if self.upto() >= pos {
                return true;
            }
            let expired = async {
                smol::Timer::at(deadline).await;
                true
            };
            let woken = async {
                moved.await;
                false
            };
            if woken.or(expired).await {
                return true;
            }
        }
    }
}

/// Longest a `/sync` waits for the evaluator: its usual latency (a read, and a write for a
/// notifying message) is a few milliseconds.
const COUNTS_WAIT: Duration = Duration::from_millis(200);

/// Called by an incremental `/sync` before it computes up to `pos`: waits (at most
/// [`COUNTS_WAIT`]) until the evaluator has counted the events up to `pos`. Returns whether it
/// waited (the caller then reads the stream position again, which includes the counts').
///
/// Only events need counting: the target is the last write that held an event (announced on
/// the evaluator's topic), not `pos` itself, which may belong to a receipt or to the counts'
/// own write and would otherwise make every sync wait out the limit.
pub async fn wait_for_counts(app: &App, pos: i64) -> bool {
    let Some(last_event) = app.notifier.topic_pos(&Topic::PushEvaluator) else {
        return false; // the evaluator is not running
    };
    app.push_progress
        .wait_for(pos.min(last_event), COUNTS_WAIT)
        .await
}

/// Longest sleep with nothing to do (a missed wake-up costs at most this).
const IDLE_SLEEP: Duration = Duration::from_secs(30);
/// Pause after a failed step (a database error), so it is not retried in a tight loop.
const ERROR_SLEEP: Duration = Duration::from_secs(1);
/// Gateway backoff: first delay and cap.
const BACKOFF_MIN_MS: i64 = 1_000;
const BACKOFF_MAX_MS: i64 = 3_600_000;
/// One gateway request's time limit.
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest gateway answer read.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;

/// The shape both workers share: listen on `topic`, run `step`, then sleep for what it
/// returns (`ZERO`: run again at once) or until woken or shut down. Listening starts before
/// the step looks, so a change committed during the step wakes the sleep that follows.
async fn run_woken<F, Fut>(app: &App, topic: Topic, mut step: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Duration>,
{
    let watch = app.notifier.watch([topic]);
    while !app.shutdown.is_set() {
        let seen = app.notifier.marks();
        let mut woken = std::pin::pin!(watch.changed_since(seen));
        let _ = future::poll_once(woken.as_mut()).await;
        let sleep = step().or(async {
            app.shutdown.wait().await;
            Duration::ZERO
        });
        let sleep = sleep.await;
        if sleep.is_zero() {
            continue;
        }
        let timer = async {
            smol::Timer::after(sleep).await;
        };
        let stop = async {
            app.shutdown.wait().await;
        };
        woken.or(timer).or(stop).await;
    }
}

/// The evaluator: a batch at a time, at once again after a full one.
pub async fn evaluator(app: App) {
    let cache = Arc::new(RulesCache::default());
    let done = Arc::new(AtomicI64::new(0));
    run_woken(&app, Topic::PushEvaluator, || async {
        match run_batch(&app, &cache, &done).await {
            Ok(n) if n >= ops::BATCH => Duration::ZERO,
            Ok(_) => IDLE_SLEEP,
            Err(e) => {
                log::error!("push evaluator: {e}");
                ERROR_SLEEP
            }
        }
    })
    .await
}

/// Evaluates and stores one batch after `done` (the in-memory position: events up to it are
/// evaluated, perhaps past the stored position when they found nothing); returns the number
/// of events it covered. A batch that found nothing writes nothing: busy rooms without local
/// recipients cost no writes.
pub async fn run_batch(app: &App, cache: &Arc<RulesCache>, done: &Arc<AtomicI64>) -> Result<usize> {
    let (server, cache) = (app.server_name.to_string(), cache.clone());
    let mem = done.load(Ordering::SeqCst);
    // Every event at or below this is committed, so a batch that is not full covers them all.
    let seen = app.notifier.pos();
    let enabled = app.config.push.evaluate;
    let batch = app
        .store
        .read(move |c| {
            let stored = sp::get_push_pos(c)?;
            let from = stored.max(mem);
            match enabled {
                true => ops::evaluate(c, &server, &cache, stored, from),
                false => ops::skip(c, stored, from),
            }
        })
        .await?;
    let (n, to) = (batch.events, batch.to);
    // Switched off, the stored position follows the events, so nothing from that time is
    // evaluated (and pushed) later.
    if !batch.found.is_empty() || (!enabled && to > batch.stored) {
        log::debug!(
            "push: ({}, {}]: {n} events, {} notifications",
            batch.from,
            to,
            batch.found.len()
        );
        app.store.write(move |tx| ops::commit(tx, &batch)).await?;
    }
    done.fetch_max(to, Ordering::SeqCst);
    app.push_progress
        .advance(if n < ops::BATCH { to.max(seen) } else { to });
    Ok(n)
}

/// The sender: every due pusher's oldest notification, then again until none is due; then
/// sleeps until the earliest retry.
pub async fn sender(app: App) {
    run_woken(&app, Topic::PushQueue, || async {
        let now = app.clock.now_ms() as i64;
        match app.store.read(move |c| sp::list_due_pushers(c, now)).await {
            Ok(due) if !due.is_empty() => {
                let mut failed = false;
                for p in due {
                    if let Err(e) = send_one(&app, p).await {
                        log::warn!("push sender: {e}");
                        failed = true;
                    }
                }
                return if failed { ERROR_SLEEP } else { Duration::ZERO };
            }
            Ok(_) => {}
            Err(e) => log::error!("push sender: {e}"),
        }
        match app.store.read(sp::next_push_retry).await {
            Ok(Some(t)) => {
                Duration::from_millis(t.saturating_sub(now).max(1) as u64).min(IDLE_SLEEP)
            }
            _ => IDLE_SLEEP,
        }
    })
    .await
}

/// What the gateway said about one notification.
enum Outcome {
    Delivered,
    Rejected,
    Refused,
    Failed(i64),
}

/// Sends the oldest queued notification of one pusher and records the outcome in one write.
async fn send_one(app: &App, p: PusherRow) -> Result<()> {
    let (pid, user) = (p.id, p.user_id.clone());
    let now = app.clock.now_ms();
    let head = app
        .store
        .read(move |c| {
            let Some((qid, row)) = sp::get_queue_head(c, pid)? else {
                return Ok(None);
            };
            let body = match row {
                Some(n) => Some(notify_body(c, &user, &n, now)?),
                None => None,
            };
            Ok(Some((qid, body)))
        })
        .await?;
    let Some((qid, body)) = head else {
        return Ok(());
    };
    let pusher: Value = serde_json::from_str(&p.pusher)?;
    let outcome = match body {
        // The event or its row is gone: nothing to send.
        None => Outcome::Refused,
        Some((notification, tweaks)) => {
            let body = with_device(notification, &pusher, p.created_ts / 1000, tweaks);
            match post(app, &p.url, body.to_string().into_bytes()).await {
                Ok((200, answer)) => {
                    let rejected = serde_json::from_slice::<Value>(&answer)
                        .ok()
                        .and_then(|v| v["rejected"].as_array().cloned())
                        .unwrap_or_default();
                    if rejected.iter().any(|k| k == &pusher["pushkey"]) {
                        Outcome::Rejected
                    } else {
                        Outcome::Delivered
                    }
                }
                Ok((s, _)) if (400..500).contains(&s) && s != 429 => Outcome::Refused,
                Ok((s, _)) => {
                    log::info!("push gateway {} answered {s}", p.url);
                    Outcome::Failed(backoff(p.backoff_ms))
                }
                Err(e) => {
                    log::info!("push gateway {}: {}", p.url, e.message);
                    Outcome::Failed(backoff(p.backoff_ms))
                }
            }
        }
    };
    let now = now as i64;
    app.store
        .write(move |tx| match outcome {
            Outcome::Delivered | Outcome::Refused => sp::delete_queued_push(tx, qid, pid),
            Outcome::Rejected => sp::delete_pusher_by_id(tx, pid),
            Outcome::Failed(ms) => sp::set_pusher_backoff(tx, pid, now + ms, ms),
        })
        .await
}

fn backoff(previous: i64) -> i64 {
    (previous * 2).clamp(BACKOFF_MIN_MS, BACKOFF_MAX_MS)
}

/// The tweaks of a list of actions (`set_tweak` entries; `highlight` without a value is true).
fn tweaks(actions: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    for a in actions.as_array().into_iter().flatten() {
        if let Some(name) = a["set_tweak"].as_str() {
            let v = match (&a["value"], name) {
                (Value::Null, "highlight") => Value::Bool(true),
                (v, _) => v.clone(),
            };
            out.insert(name.to_owned(), v);
        }
    }
    out
}

/// The `notification` object for one event (without `devices`) and its tweaks. The unread
/// count is read here, at send time, from the same rows as `/sync`'s counts.
fn notify_body(
    c: &crate::store::Connection,
    user: &str,
    n: &NotificationRow,
    now: u64,
) -> Result<(Value, Map<String, Value>)> {
    let actions: Value = serde_json::from_str(&n.actions)?;
    let tweaks = tweaks(&actions);
    let ev = client_event(c, &n.event, None, now, true)?;
    // Synapse's priority: high for what sounds or highlights, and for encrypted events (whose
    // rules the server cannot see).
    let high = tweaks.contains_key("sound")
        || tweaks.get("highlight") == Some(&Value::Bool(true))
        || ev["type"] == "m.room.encrypted";
    let mut body = json!({
        "event_id": n.event.event_id,
        "room_id": n.room_id,
        "counts": { "unread": ops::badge(c, user)? },
        "prio": if high { "high" } else { "low" },
    });
    let full = json!({
        "type": ev["type"],
        "sender": ev["sender"],
        "content": ev["content"],
        "user_is_target": ev["state_key"].as_str() == Some(user),
    });
    if let (Some(b), Value::Object(f)) = (body.as_object_mut(), full) {
        b.insert("full".into(), Value::Object(f));
    }
    Ok((body, tweaks))
}

/// The request body for one pusher: `format: event_id_only` keeps only the IDs, counts and
/// priority; otherwise the event's type, sender and content ride along. `data` goes to the
/// gateway without `url`, as Synapse sends it.
fn with_device(
    mut notification: Value,
    pusher: &Value,
    pushkey_ts: i64,
    tweaks: Map<String, Value>,
) -> Value {
    let mut data = pusher["data"].as_object().cloned().unwrap_or_default();
    data.remove("url");
    let event_id_only = data.get("format").and_then(Value::as_str) == Some("event_id_only");
    if let Some(o) = notification.as_object_mut() {
        if let Some(Value::Object(full)) = o.remove("full") {
            if !event_id_only {
                o.extend(full);
            }
        }
        o.insert(
            "devices".into(),
            json!([{
                "app_id": pusher["app_id"],
                "pushkey": pusher["pushkey"],
                "pushkey_ts": pushkey_ts,
                "data": data,
                "tweaks": tweaks,
            }]),
        );
    }
    json!({ "notification": notification })
}

/// POSTs JSON to a gateway URL (http or https), bounded by [`GATEWAY_TIMEOUT`]; returns the
/// status and body. A connection per request: a pusher sends at most one at a time.
async fn post(app: &App, url: &str, body: Vec<u8>) -> Result<(u16, Vec<u8>)> {
    let url = http_types::Url::parse(url).map_err(|e| Error::internal(format_args!("{e}")))?;
    let host = url.host_str().unwrap_or_default().to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let mut req = http_types::Request::new(http_types::Method::Post, url.clone());
    req.insert_header("Content-Type", "application/json");
    req.set_body(body);
    let verify = app.config.federation.verify_certificates;
    let exchange = async move {
        let unreachable = |e: std::io::Error| Error::internal(format_args!("{host}:{port}: {e}"));
        let tcp = smol::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(unreachable)?;
        let mut res = if url.scheme() == "https" {
            let name = futures_rustls::rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| Error::internal(format_args!("TLS name {host}: {e}")))?;
            let tls = crate::fed::client::tls_connector(verify)
                .connect(name, tcp)
                .await
                .map_err(unreachable)?;
            async_h1::connect(tls, req).await
        } else {
            async_h1::connect(tcp, req).await
        }
        .map_err(|e| Error::internal(format_args!("{e}")))?;
        let mut bytes = Vec::new();
        res.take_body()
            .take(MAX_ANSWER_BYTES)
            .read_to_end(&mut bytes)
            .await
            .map_err(unreachable)?;
        Ok((u16::from(res.status()), bytes))
    };
    let timeout = async {
        smol::Timer::after(GATEWAY_TIMEOUT).await;
        Err(Error::internal("timed out"))
    };
    future::or(exchange, timeout).await
}
