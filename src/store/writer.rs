//! The single writer: one OS thread owning the one write connection.
//!
//! Group commit (see BRIEF.md): an fsync costs 0.2–3 ms, so the writer takes every write that is
//! waiting, runs each in its own SAVEPOINT inside one `BEGIN IMMEDIATE` transaction, commits
//! once and only then answers each caller. Durability is `synchronous=FULL`; throughput comes
//! from the batching.
//!
//! The writer also owns the stream-position counter: positions are handed out inside the
//! transaction and become visible together at COMMIT, in order, so a reader never sees
//! position N+1 without N. After each commit it tells the `Notifier` (a wake-up without data).

use std::{
    sync::{Arc, Mutex},
    thread::JoinHandle,
};

use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::{
    error::{Error, Result},
    notify::Notifier,
    Clock,
};

/// What a write closure sees: the transaction plus the things only the writer hands out.
pub struct Tx<'a> {
    pub tx: &'a Transaction<'a>,
    next_pos: &'a mut i64,
    /// Milliseconds since the epoch, read once per batch from the injected clock.
    pub now_ms: u64,
}

impl Tx<'_> {
    /// Takes the next stream position.
    pub fn next_pos(&mut self) -> i64 {
        *self.next_pos += 1;
        *self.next_pos
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
}

/// Most writes taken into one transaction; bounds the latency of the first one in a batch.
const MAX_BATCH: usize = 512;

impl Writer {
    pub fn start(conn: Connection, clock: Arc<dyn Clock>, notifier: Notifier) -> Result<Self> {
        let start_pos = super::queries::max_stream_pos(&conn)?;
        notifier.set_initial(start_pos);
        let (jobs, rx) = async_channel::unbounded::<Job>();
        let thread = std::thread::Builder::new()
            .name("hearth-writer".into())
            .spawn(move || run(conn, rx, start_pos, clock, notifier))
            .map_err(Error::internal)?;
        Ok(Self {
            jobs,
            thread: Arc::new(Mutex::new(Some(thread))),
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
        let (replies, committed) = run_batch(&mut conn, batch, &mut pos, clock.now_ms());
        if committed.is_err() {
            pos = before;
        }
        if pos > before && committed.is_ok() {
            notifier.advance(pos);
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
    now_ms: u64,
) -> (Vec<Reply>, Result<()>) {
    let mut replies = Vec::with_capacity(batch.len());
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            // Never run a job outside a transaction: dropping the jobs fails each caller.
            drop(batch);
            return (replies, Err(Error::from(e)));
        }
    };
    for job in batch {
        if let Err(e) = tx.execute_batch("SAVEPOINT op") {
            return (replies, Err(e.into()));
        }
        let mut ctx = Tx {
            tx: &tx,
            next_pos: pos,
            now_ms,
        };
        let (ok, reply) = job(&mut ctx);
        let end = if ok {
            "RELEASE op"
        } else {
            "ROLLBACK TO op; RELEASE op"
        };
        replies.push(reply);
        if let Err(e) = tx.execute_batch(end) {
            return (replies, Err(e.into()));
        }
    }
    let committed = tx.commit().map_err(Error::from);
    (replies, committed)
}
