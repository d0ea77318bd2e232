//! # Hearth: a Matrix homeserver in one process on one SQLite file
//!
//! ## Code map
//! - `main.rs`   CLI → `Config` → [`Homeserver::start`]. Nothing else.
//! - `config`    `Config` (TOML + flags), defaults, validation.
//! - `error`     The one error type and its mapping to Matrix `errcode` + HTTP status.
//! - `server`    The smol accept loop (plain or TLS), async-h1, disconnect → cancellation,
//!   CORS, the per-request log line, shutdown.
//! - `http`      The tide route table (with the cancellable marker), the typed request
//!   helpers (`ruma_req`, `auth`), and the handlers, one file per spec area.
//! - `room`      Pure Matrix logic: the PDU type, signing key, building/authorising/persisting
//!   local events, the client event format.
//! - `store`     The only module that speaks SQL: read pool, the single group-committing
//!   writer, schema migrations, queries.
//! - `notify`    Data-less wake-ups for long-polling `/sync`.
//! - `cancel`    Shield, response cache, linearizer, and the drop-at-every-await test helper.
//! - `workers`   Long-running tasks woken by deadlines and data-less wake-ups (typing expiry).
//! - `presence`  In-memory presence (online/idle/offline, status messages), persisted in batches.
//! - `ephemeral` In-memory typing state, rate limits, token cache, metrics.
//! - `proxy`     `trusted_proxies` and `X-Forwarded-For`: the client's address.
//! - `media`     The media repository: files beside the database, thumbnails, remote media.
//!
//! ## Invariants
//! - **Only `store/` speaks SQL** (`tests/layering.rs` checks it): other modules hold a
//!   `store::Connection` only to pass it to `store::queries`.
//! - **Nothing awaits inside a transaction**: writes are sync closures run by the writer thread.
//! - **One commit per operation**: everything an operation causes is written by one closure.
//! - **A 200 means on disk**: the writer answers after a `synchronous=FULL` commit.
//! - **Only the server and workers spawn**, through the tracked `cancel::Spawner`.

pub mod cancel;
pub mod config;
pub mod ephemeral;
pub mod error;
pub mod fed;
pub mod http;
pub mod media;
pub mod notify;
pub mod ops;
pub mod presence;
pub mod proxy;
pub mod room;
pub mod server;
pub mod store;
pub mod util;
pub mod workers;

use std::{net::SocketAddr, sync::Arc, thread::JoinHandle};

pub use config::Config;
use ruma::{OwnedServerName, OwnedUserId};

/// Time, injected so expiry and rate limits can be tested without sleeping.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        util::now_ms()
    }
}

/// Everything a request handler can reach: a cheap `Clone` handle (tide needs `Send + Sync`
/// state; one thread runs it, so the few std mutexes inside are never contended and never
/// held across an `.await`).
#[derive(Clone)]
pub struct App(Arc<AppInner>);

pub struct AppInner {
    pub config: Config,
    pub server_name: OwnedServerName,
    pub store: store::Store,
    pub local: Arc<room::build::Local>,
    /// Outbound federation client and remote keys.
    pub fed: fed::Federation,
    /// The media repository (files in `media/` beside the database).
    pub media: media::Media,
    pub notifier: notify::Notifier,
    pub clock: Arc<dyn Clock>,
    pub typing: ephemeral::Typing,
    /// Presence, in memory (see `presence`).
    pub presence: presence::Presence,
    /// How far the push evaluator has got (`/sync` waits for it, see `workers::push`).
    pub push_progress: workers::push::Progress,
    pub limits: ephemeral::RateLimiter,
    pub tokens: ephemeral::TokenCache,
    pub metrics: ephemeral::Metrics,
    pub spawner: cancel::Spawner,
    /// The federation sender's in-memory companion (backoff cache, counters).
    pub sender: workers::federation::SenderState,
    pub shutdown: ephemeral::Latch,
    /// Member events each device was sent for lazy loading (see `http::sync`).
    pub lazy_members: Arc<http::sync::LazyMembers>,
    /// Shared `/sync` computations (see `http::sync`).
    pub sync_cache:
        cancel::ResponseCache<http::sync::SyncKey, error::Result<http::sync::SyncOutput>>,
    /// Shared backfills from other servers, keyed by room and backward extremities (see
    /// `ops::federation::backfill_shared`).
    pub backfill: cancel::ResponseCache<(String, Vec<String>), error::Result<usize>>,
}

impl std::ops::Deref for App {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl App {
    /// Opens the database and builds the shared state. Does not listen yet.
    pub fn open(
        config: Config,
        clock: Arc<dyn Clock>,
        spawner: cancel::Spawner,
    ) -> Result<Self, String> {
        config.validate()?;
        let server_name =
            OwnedServerName::try_from(config.server_name.as_str()).map_err(|e| e.to_string())?;
        let notifier = notify::Notifier::default();
        let store = store::Store::open(
            &config.database,
            config.db_readers,
            clock.clone(),
            notifier.clone(),
        )
        .map_err(|e| format!("opening {}: {e}", config.database.display()))?;
        let key = load_or_create_identity(&store, &server_name)?;
        let media = media::Media::open(&store, config.media_dir(), &spawner)
            .map_err(|e| format!("media: {e}"))?;
        let presence = presence::Presence::new(
            config.presence.enabled,
            server_name.as_str(),
            clock.clone(),
            notifier.clone(),
        );
        if config.presence.enabled {
            let rows = smol::block_on(store.read(store::presence::list_presence))
                .map_err(|e| format!("presence: {e}"))?;
            presence.load(rows);
        }
        let limits = ephemeral::RateLimiter::new(config.rate_limits.clone(), clock.clone());
        let local = Arc::new(room::build::Local {
            server_name: server_name.clone(),
            key,
        });
        if !config.federation.verify_certificates {
            log::warn!(
                "federation TLS certificates are NOT verified (insecure; for tests with self-signed peers only)"
            );
        }
        Ok(Self(Arc::new(AppInner {
            fed: fed::Federation::new(local.clone(), &config.federation, &spawner),
            local,
            media,
            server_name,
            store,
            notifier: notifier.clone(),
            typing: ephemeral::Typing::new(notifier),
            presence,
            push_progress: Default::default(),
            limits,
            tokens: ephemeral::TokenCache::default(),
            metrics: ephemeral::Metrics::default(),
            clock: clock.clone(),
            lazy_members: Arc::default(),
            // Kept on the server's clock: what a response holds depends on the time (sticky
            // events expire), so an injected clock must age the cache too.
            sync_cache: cancel::ResponseCache::with_clock(
                &spawner,
                "sync",
                std::time::Duration::from_secs(2),
                {
                    let (base, start, clock) =
                        (std::time::Instant::now(), clock.now_ms(), clock.clone());
                    Arc::new(move || {
                        base + std::time::Duration::from_millis(
                            clock.now_ms().saturating_sub(start),
                        )
                    })
                },
            ),
            backfill: cancel::ResponseCache::new(
                &spawner,
                "backfill",
                std::time::Duration::from_secs(30),
            ),
            spawner,
            sender: workers::federation::SenderState::default(),
            shutdown: ephemeral::Latch::default(),
            config,
        })))
    }
}

/// Checks the database's server name (a database belongs to one server name forever: user and
/// room IDs embed it) and loads the signing key. Reads go through the read pool; only a fresh
/// database is written to, through the writer like every other write.
fn load_or_create_identity(
    store: &store::Store,
    name: &OwnedServerName,
) -> Result<room::SigningKey, String> {
    use store::queries::{init_identity, load_identity, Identity};
    let mut id = smol::block_on(store.read(load_identity)).map_err(|e| e.to_string())?;
    if id.server_name.is_none() || id.signing_key.is_none() {
        let (key, version) = room::SigningKey::generate_encoded();
        let n = name.to_string();
        id = smol::block_on(store.write(move |tx| init_identity(tx, &n, &key, &version)))
            .map_err(|e| e.to_string())?;
    }
    let Identity {
        server_name: Some(existing),
        signing_key: Some((key, version)),
    } = id
    else {
        return Err("the database has no server identity after initialising it".into());
    };
    if existing != name.as_str() {
        return Err(format!(
            "this database belongs to server name {existing:?}, not {:?}",
            name.as_str()
        ));
    }
    room::SigningKey::from_encoded(&key, version).map_err(|e| e.to_string())
}

/// A running homeserver: the embedding API.
///
/// ```no_run
/// # fn main() -> Result<(), String> {
/// let mut config = hearth::Config::default();
/// config.database = "/tmp/app/hearth.db".into();
/// config.listen = vec![([127, 0, 0, 1], 0).into()];
/// let hs = hearth::Homeserver::start(config)?;
/// let user = hs.create_user("alice", Some("secret"), false)?;
/// println!("{user} can log in at http://{}", hs.addrs()[0]);
/// hs.stop()
/// # }
/// ```
pub struct Homeserver {
    app: App,
    addrs: Vec<SocketAddr>,
    thread: Option<JoinHandle<()>>,
}

impl Homeserver {
    /// Opens the database, binds every listen address and starts serving on a dedicated
    /// thread that drives the one executor.
    pub fn start(config: Config) -> Result<Self, String> {
        Self::start_with_clock(config, Arc::new(SystemClock))
    }

    pub fn start_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Self, String> {
        let executor = Arc::new(async_executor::Executor::new());
        let spawner = cancel::Spawner::new(executor.clone());
        let app = App::open(config, clock, spawner)?;
        let tls = server::load_tls(&app.config)?;
        let mut listeners = Vec::new();
        for addr in &app.config.listen {
            let l = server::bind(*addr).map_err(|e| format!("listen on {addr}: {e}"))?;
            listeners.push(l);
        }
        let addrs = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect::<Vec<_>>();
        let app2 = app.clone();
        let thread = std::thread::Builder::new()
            .name("hearth-main".into())
            .spawn(move || {
                let run = server::run(app2, listeners, tls);
                smol::block_on(executor.run(run));
            })
            .map_err(|e| e.to_string())?;
        for a in &addrs {
            log::info!(
                "listening on {}://{a}",
                if app.config.tls_cert.is_some() {
                    "https"
                } else {
                    "http"
                }
            );
        }
        Ok(Self {
            app,
            addrs,
            thread: Some(thread),
        })
    }

    /// The bound addresses (useful with port 0).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn server_name(&self) -> &str {
        self.app.server_name.as_str()
    }

    /// Creates a local user (the `hearth user create` command and embedders use this).
    pub fn create_user(
        &self,
        localpart: &str,
        password: Option<&str>,
        admin: bool,
    ) -> Result<OwnedUserId, String> {
        smol::block_on(ops::account::create_user(
            &self.app, localpart, password, admin,
        ))
        .map_err(|e| e.to_string())
    }

    /// The shared state, for tests and embedders that need more than the small API above.
    pub fn app(&self) -> &App {
        &self.app
    }

    /// Stops accepting, cancels long-polls, lets in-flight writes commit, checkpoints the WAL.
    pub fn stop(mut self) -> Result<(), String> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), String> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.app.shutdown.trigger();
        self.app.notifier.wake_all();
        thread
            .join()
            .map_err(|_| "server thread panicked".to_string())?;
        self.app.store.close().map_err(|e| e.to_string())
    }
}

impl Drop for Homeserver {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            log::error!("stopping: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{atomic::Ordering, Arc};

    use super::{cancel::Spawner, App, Config, SystemClock};

    fn open(dir: &std::path::Path, name: &str) -> Result<App, String> {
        let config = Config {
            database: dir.join("hearth.db"),
            server_name: name.into(),
            ..Config::default()
        };
        let spawner = Spawner::new(Arc::new(async_executor::Executor::new()));
        App::open(config, Arc::new(SystemClock), spawner)
    }

    #[test]
    fn identity_is_written_through_the_writer_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let app = open(dir.path(), "a.test").unwrap();
        // A fresh database: the server name and key were stored by one write of the writer.
        let writes = app.store.writer_stats().writes.load(Ordering::SeqCst);
        assert_eq!(writes, 1);
        let public = app.local.key.pair.public_key().to_vec();
        app.store.close().unwrap();
        drop(app);

        let again = open(dir.path(), "a.test").unwrap();
        assert_eq!(again.local.key.pair.public_key().to_vec(), public);
        let writes = again.store.writer_stats().writes.load(Ordering::SeqCst);
        assert_eq!(writes, 0, "an existing identity is only read");
        again.store.close().unwrap();
        drop(again);

        let err = open(dir.path(), "b.test").err().unwrap();
        assert!(err.contains("a.test"), "{err}");
    }
}
