//! The single writer: one OS thread owning the one write connection.
//!
//! Group commit (see BRIEF.md): an fsync costs 0.2–3 ms, so the writer takes every write that is
//! waiting, runs each in its own SAVEPOINT inside one `BEGIN IMMEDIATE` transaction, commits
//! once and only then answers each caller. Durability is `synchronous=FULL`; throughput comes
//! from the batching.
//!
//! The writer also owns the stream-position counter: positions are handed out inside the
//! transaction and become visible together at COMMIT, in order, so a reader never sees
//! position N+1 without N. Taking a position names the topics (rooms, users) the change
//! concerns; after each commit the writer announces them on the `Notifier` (wake-ups without
//! data), so only the long-polls a change concerns wake.
//!
//! A write closure that panics fails alone, like one that returns an error: its SAVEPOINT is
//! rolled back, its caller gets a 500, and the writer goes on with the rest of the batch.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::{
    error::{Error, Result},
    notify::{Notifier, Topic},
    Clock,
};

/// What a write closure sees: the transaction plus the things only the writer hands out.
pub struct Tx<'a> {
    pub tx: &'a Transaction<'a>,
    next_pos: &'a mut i64,
    topics: &'a mut Vec<Topic>,
    /// Milliseconds since the epoch, read once per batch from the injected clock.
    pub now_ms: u64,
}

impl Tx<'_> {
    /// Takes the next stream position for a change that concerns `topics`: after the commit,
    /// the long-polls watching them wake. Every position names whom it concerns, so no
    /// change that `/sync` would show can be committed without its wake-up.
    pub fn next_pos(&mut self, topics: impl IntoIterator<Item = Topic>) -> i64 {
        self.topics.extend(topics);
        *self.next_pos += 1;
        *self.next_pos
    }

    /// Announces `topic` after the commit without taking a stream position (for changes that
    /// `/sync` does not walk, such as federation outbox rows).
    pub fn wake(&mut self, topic: Topic) {
        self.topics.push(topic);
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.tx
    }
}

/// A queued write: runs the closure, says whether it succeeded, and returns the reply to send
/// once the commit outcome is known.
type Job = Box<dyn FnOnce(&mut Tx<'_>) -> (bool, Reply) + Send>;
type Reply = Box<dyn FnOnce(Result<()>) + Send>;

#[derive(Clone)]
pub struct Writer {
    jobs: async_channel::Sender<Job>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    pub stats: Arc<WriterStats>,
}

/// Counters that show group commit at work (`writes / commits` = average batch size).
#[derive(Default)]
pub struct WriterStats {
    pub commits: AtomicU64,
    pub writes: AtomicU64,
    pub failed_writes: AtomicU64,
}

/// Most writes taken into one transaction; bounds the latency of the first one in a batch.
const MAX_BATCH: usize = 512;

impl Writer {
    pub fn start(conn: Connection, clock: Arc<dyn Clock>, notifier: Notifier) -> Result<Self> {
        let start_pos = super::queries::max_stream_pos(&conn)?;
        notifier.set_initial(start_pos);
        let (jobs, rx) = async_channel::unbounded::<Job>();
        let stats = Arc::new(WriterStats::default());
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("hearth-writer".into())
            .spawn(move || run(conn, rx, start_pos, clock, notifier, st))
            .map_err(Error::internal)?;
        Ok(Self {
            jobs,
            thread: Arc::new(Mutex::new(Some(thread))),
            stats,
        })
    }

    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<T> + Send + 'static,
    {
        let (done, wait) = async_channel::bounded::<Result<T>>(1);
        let job: Job = Box::new(move |tx| {
            let outcome = f(tx);
            let ok = outcome.is_ok();
            let reply: Reply = Box::new(move |commit: Result<()>| {
                let _ = done.try_send(commit.and(outcome));
            });
            (ok, reply)
        });
        self.jobs
            .send(job)
            .await
            .map_err(|_| Error::unavailable("The server is shutting down"))?;
        // Dropping here (the caller went away) does not stop the job: it is already queued.
        wait.recv()
            .await
            .map_err(|_| Error::internal("writer stopped before answering"))?
    }

    /// Lets queued writes finish, stops the thread and checkpoints the WAL.
    pub fn close(&self) -> Result<()> {
        self.jobs.close();
        let handle = self
            .thread
            .lock()
            .map_err(|_| Error::internal("writer lock poisoned"))?
            .take();
        if let Some(h) = handle {
            h.join()
                .map_err(|_| Error::internal("writer thread panicked"))?;
        }
        Ok(())
    }
}

fn run(
    mut conn: Connection,
    rx: async_channel::Receiver<Job>,
    mut pos: i64,
    clock: Arc<dyn Clock>,
    notifier: Notifier,
    stats: Arc<WriterStats>,
) {
    while let Ok(first) = rx.recv_blocking() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let before = pos;
        let n = batch.len() as u64;
        let mut topics = Vec::new();
        let (replies, committed, failed) =
            run_batch(&mut conn, batch, &mut pos, &mut topics, clock.now_ms());
        stats.writes.fetch_add(n, Ordering::Relaxed);
        stats.failed_writes.fetch_add(failed, Ordering::Relaxed);
        if committed.is_err() {
            pos = before;
        } else {
            stats.commits.fetch_add(1, Ordering::Relaxed);
        }
        if committed.is_ok() && (pos > before || !topics.is_empty()) {
            topics.sort_unstable();
            topics.dedup();
            notifier.advance(pos, &topics);
        }
        for reply in replies {
            reply(committed.clone());
        }
    }
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
        log::warn!("WAL checkpoint at shutdown failed: {e}");
    }
    log::debug!("writer stopped");
}

fn run_batch(
    conn: &mut Connection,
    batch: Vec<Job>,
    pos: &mut i64,
    topics: &mut Vec<Topic>,
    now_ms: u64,
) -> (Vec<Reply>, Result<()>, u64) {
    let mut replies = Vec::with_capacity(batch.len());
    let mut failed = 0;
    let batch_start = *pos;
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            // Never run a job outside a transaction: dropping the jobs fails each caller.
            drop(batch);
            return (replies, Err(Error::from(e)), failed);
        }
    };
    for job in batch {
        if let Err(e) = tx.execute_batch("SAVEPOINT op") {
            return (replies, Err(e.into()), failed);
        }
        let (pos_before, topics_before) = (*pos, topics.len());
        let mut ctx = Tx {
            tx: &tx,
            next_pos: pos,
            topics,
            now_ms,
        };
        // A panicking closure is a failed write (its caller's reply channel is dropped, which
        // it sees as a 500), never a dead writer.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut ctx)));
        let ok = match outcome {
            Ok((ok, reply)) => {
                replies.push(reply);
                ok
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                log::error!("a write panicked and was rolled back: {what}");
                false
            }
        };
        let end = if ok {
            "RELEASE op"
        } else {
            // Positions and topics of a rolled-back write are given back.
            failed += 1;
            *pos = pos_before;
            topics.truncate(topics_before);
            "ROLLBACK TO op; RELEASE op"
        };
        if let Err(e) = tx.execute_batch(end) {
            return (replies, Err(e.into()), failed);
        }
    }
    // The batch's last position goes into `meta` in its own transaction, so a restart resumes
    // above every position ever handed out, whatever table (if any) its write stored it in.
    if *pos > batch_start {
        if let Err(e) = super::queries::set_stream_high_water(&tx, *pos) {
            return (replies, Err(e), failed);
        }
    }
    let committed = tx.commit().map_err(Error::from);
    (replies, committed, failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SystemClock;
    use rusqlite::OptionalExtension;

    fn writer(dir: &std::path::Path) -> Writer {
        let mut conn = Connection::open(dir.join("w.db")).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        super::super::configure(&conn).unwrap();
        super::super::migrate::migrate(&mut conn).unwrap();
        Writer::start(conn, Arc::new(SystemClock), Notifier::default()).unwrap()
    }

    #[test]
    fn commits_are_durable_and_grouped_and_a_failing_write_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        // 200 writes submitted at once: far fewer commits (fsyncs) than writes.
        let results: Vec<Result<i64>> = smol::block_on(async {
            let futs: Vec<_> = (0..200)
                .map(|i| {
                    let w = w.clone();
                    smol::spawn(async move {
                        w.write(move |tx| {
                            tx.execute(
                                "INSERT INTO meta (key, value) VALUES (?1, 'v')",
                                [format!("k{i}")],
                            )?;
                            if i % 10 == 3 {
                                return Err(Error::forbidden("this one fails after writing"));
                            }
                            Ok(tx.next_pos([]))
                        })
                        .await
                    })
                })
                .collect();
            let mut out = Vec::new();
            for f in futs {
                out.push(f.await);
            }
            out
        });
        let failed = results.iter().filter(|r| r.is_err()).count();
        assert_eq!(failed, 20);
        let commits = w.stats.commits.load(Ordering::SeqCst);
        assert!(
            commits < 200,
            "group commit: {commits} commits for 200 writes"
        );
        assert_eq!(w.stats.writes.load(Ordering::SeqCst), 200);
        assert_eq!(w.stats.failed_writes.load(Ordering::SeqCst), 20);
        w.close().unwrap();
        // Reopen: exactly the successful writes are there, each failing one left nothing.
        let conn = Connection::open(dir.path().join("w.db")).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM meta WHERE key LIKE 'k%'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 180);
        let k3: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'k3'", [], |r| r.get(0))
            .optional()
            .unwrap();
        assert!(k3.is_none());
    }

    #[test]
    fn a_position_stored_nowhere_is_not_handed_out_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        // Positions taken by writes that store them in no table.
        let taken = smol::block_on(async {
            w.write(|tx| Ok(tx.next_pos([]))).await.unwrap();
            w.write(|tx| Ok(tx.next_pos([]))).await.unwrap()
        });
        assert_eq!(taken, 2);
        w.close().unwrap();
        let w = writer(dir.path());
        let next = smol::block_on(w.write(|tx| Ok(tx.next_pos([])))).unwrap();
        assert_eq!(
            next, 3,
            "a restarted writer hands out positions above all it gave"
        );
        w.close().unwrap();
    }

    #[test]
    fn a_panicking_write_fails_alone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        let panicked: Result<i64> = smol::block_on(w.write(|tx| {
            tx.execute("INSERT INTO meta (key, value) VALUES ('p', 'v')", [])?;
            tx.next_pos([Topic::room("!r:x")]);
            panic!("a bug in a write closure");
        }));
        assert!(panicked.is_err());
        // The writer still serves, and the panicking write left nothing behind (its
        // position is given back).
        let pos = smol::block_on(w.write(|tx| {
            tx.execute("INSERT INTO meta (key, value) VALUES ('q', 'v')", [])?;
            Ok(tx.next_pos([]))
        }))
        .unwrap();
        assert_eq!(pos, 1);
        w.close().unwrap();
        let conn = Connection::open(dir.path().join("w.db")).unwrap();
        let keys: Vec<String> = conn
            .prepare("SELECT key FROM meta WHERE key IN ('p', 'q')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(keys, vec!["q".to_string()]);
    }

    #[test]
    fn committed_writes_wake_only_their_topics() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("w.db")).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        super::super::configure(&conn).unwrap();
        super::super::migrate::migrate(&mut conn).unwrap();
        let n = Notifier::default();
        let w = Writer::start(conn, Arc::new(SystemClock), n.clone()).unwrap();
        let busy = n.watch([Topic::room("!busy:x")]);
        let quiet = n.watch([Topic::room("!quiet:x"), Topic::user("@b:x")]);
        let seen = n.marks();
        // A failing write's topics are not announced.
        let _ = smol::block_on(w.write(|tx| -> Result<()> {
            tx.next_pos([Topic::room("!quiet:x")]);
            Err(Error::forbidden("no"))
        }));
        smol::block_on(w.write(|tx| Ok(tx.next_pos([Topic::room("!busy:x")])))).unwrap();
        assert!(busy.changed(seen));
        assert!(!quiet.changed(seen));
        assert_eq!(n.pos(), 1);
        w.close().unwrap();
    }

    #[test]
    fn connections_run_with_synchronous_full() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("s.db")).unwrap();
        super::super::configure(&conn).unwrap();
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL: an acknowledged commit survives a power cut");
    }
}
