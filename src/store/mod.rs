//! The only module that speaks SQL (plus `room::persist`, which runs inside a write closure
//! and goes through the helpers here).
//!
//! - Reads: `Store::read(|conn| ...)` runs a sync closure on a pooled read-only connection on
//!   the blocking thread pool, never on the executor thread.
//! - Writes: `Store::write(|tx| ...)` hands a sync closure to the single writer thread
//!   (`writer.rs`), which groups whatever is waiting into one SQLite transaction, one SAVEPOINT
//!   per closure, and answers each caller only after the COMMIT (`synchronous=FULL`): a 200
//!   means on disk. A closure that fails rolls back alone.
//!
//! Cancellation: a write closure is a plain function, so it cannot await; once handed to the
//! writer it runs to its commit even if the caller's future is dropped. Dropped before it is
//! handed over, nothing happened.

pub mod acl;
pub mod e2ee;
pub mod history;
pub mod media;
pub mod migrate;
pub mod outbox;
pub mod partial;
pub mod partial_devices;
pub mod presence;
pub mod push;
pub mod pushfix;
pub mod queries;
pub mod reauth;
pub mod search;
pub mod sticky;
pub mod writer;

use std::{path::Path, sync::Arc};

use r2d2_sqlite::SqliteConnectionManager;

pub use writer::{Tx, Writer};

use crate::{error::Result, notify::Notifier, Clock};

pub type Pool = r2d2::Pool<SqliteConnectionManager>;

/// The read handle a `Store::read` closure gets (and a write closure, through `Tx`'s deref).
/// Code outside `store/` names it, and passes it to `store::queries`; it never runs SQL on it.
pub use rusqlite::Connection;

impl From<rusqlite::Error> for crate::error::Error {
    fn from(e: rusqlite::Error) -> Self {
        Self::internal(format_args!("database: {e}"))
    }
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    writer: Writer,
}

/// Settings every connection gets. WAL lets readers run beside the writer; FULL makes a
/// commit survive a power cut; the busy timeout covers the WAL checkpoint.
pub(crate) fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "PRAGMA foreign_keys = ON;
         PRAGMA synchronous = FULL;
         PRAGMA busy_timeout = 5000;
         PRAGMA cache_size = -8000;",
    )
}

impl Store {
    /// Opens (creating if needed) and migrates the database, then starts the writer thread.
    pub fn open(
        path: &Path,
        readers: u32,
        clock: Arc<dyn Clock>,
        notifier: Notifier,
    ) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        configure(&conn)?;
        migrate::migrate(&mut conn)?;
        let manager = SqliteConnectionManager::file(path).with_init(|c| {
            configure(c)?;
            c.execute_batch("PRAGMA query_only = ON;")
        });
        let pool = r2d2::Pool::builder()
            .max_size(readers.max(1))
            .min_idle(Some(1))
            .build(manager)?;
        let writer = Writer::start(conn, clock, notifier)?;
        Ok(Self { pool, writer })
    }

    /// Runs `f` on a read-only connection off the executor thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let pool = self.pool.clone();
        smol::unblock(move || {
            let conn = pool.get()?;
            f(&conn)
        })
        .await
    }

    /// Runs `f` in its own SAVEPOINT inside the writer's next group commit; resolves after the
    /// commit is durable.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<T> + Send + 'static,
    {
        self.writer.write(f).await
    }

    /// Group-commit counters of the writer.
    pub fn writer_stats(&self) -> &writer::WriterStats {
        &self.writer.stats
    }

    /// Stops the writer after the queued writes and checkpoints the WAL into the main file.
    pub fn close(&self) -> Result<()> {
        self.writer.close()
    }
}
