//! `hearth`: command line → `Config` → `Homeserver::start`. Nothing else.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use clap::{Parser, Subcommand, ValueEnum};
use hearth::{config::Registration, Config, Homeserver};

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "A Matrix homeserver in one process on one SQLite file"
)]
struct Cli {
    /// TOML configuration file; flags given here override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Server name (the part after ':' in user IDs).
    #[arg(long, global = true)]
    server_name: Option<String>,
    /// Address to listen on (repeatable).
    #[arg(long, global = true)]
    listen: Vec<SocketAddr>,
    /// SQLite database file.
    #[arg(long, global = true)]
    database: Option<PathBuf>,
    /// PEM certificate chain: serve TLS on every listener (needs --tls-key).
    #[arg(long, global = true)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, global = true)]
    tls_key: Option<PathBuf>,
    /// Who may register through the API.
    #[arg(long, global = true)]
    registration: Option<RegistrationArg>,
    /// Allow `--registration open` on a non-loopback listener: anyone on the internet who can
    /// reach this server can create accounts.
    #[arg(long, global = true)]
    allow_open_registration_from_anyone_on_the_internet: bool,
    /// The URL clients reach this server at (e.g. https://matrix.example.org behind a proxy).
    #[arg(long, global = true)]
    public_baseurl: Option<String>,
    /// A reverse proxy (IP or CIDR) whose X-Forwarded-For gives the client's address
    /// (repeatable; replaces the file's `trusted_proxies`).
    #[arg(long = "trusted-proxy", global = true)]
    trusted_proxies: Vec<hearth::proxy::IpNet>,
    /// Turn off rate limits (benchmarks, test suites).
    #[arg(long, global = true)]
    no_rate_limit: bool,
    /// Accept any TLS certificate from remote servers (tests with self-signed peers only).
    #[arg(long, global = true)]
    insecure_federation_tls: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum RegistrationArg {
    Open,
    Token,
    Closed,
}

#[derive(Subcommand)]
enum Command {
    /// Manage users.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Create a user.
    Create {
        /// Localpart (`alice` for `@alice:server`).
        name: String,
        #[arg(long)]
        password: Option<String>,
        #[arg(long)]
        admin: bool,
    },
}

fn config(cli: &Cli) -> Result<Config, String> {
    let mut c = match &cli.config {
        Some(p) => Config::from_toml_file(p)?,
        None => Config::default(),
    };
    if let Some(n) = &cli.server_name {
        c.server_name = n.clone();
    }
    if !cli.listen.is_empty() {
        c.listen = cli.listen.clone();
    }
    if let Some(d) = &cli.database {
        c.database = d.clone();
    }
    if cli.tls_cert.is_some() || cli.tls_key.is_some() {
        c.tls_cert = cli.tls_cert.clone();
        c.tls_key = cli.tls_key.clone();
    }
    if let Some(r) = cli.registration {
        c.registration = match r {
            RegistrationArg::Open => Registration::Open,
            RegistrationArg::Token => Registration::Token,
            RegistrationArg::Closed => Registration::Closed,
        };
    }
    if cli.allow_open_registration_from_anyone_on_the_internet {
        c.allow_open_registration_from_anyone_on_the_internet = true;
    }
    if let Some(u) = &cli.public_baseurl {
        c.public_baseurl = Some(u.clone());
    }
    if !cli.trusted_proxies.is_empty() {
        c.trusted_proxies = cli.trusted_proxies.clone();
    }
    if cli.no_rate_limit {
        c.rate_limits.enabled = false;
    }
    if cli.insecure_federation_tls {
        c.federation.verify_certificates = false;
    }
    c.validate()?;
    Ok(c)
}

fn run(cli: Cli) -> Result<(), String> {
    let config = config(&cli)?;
    match cli.command {
        Some(Command::User {
            action:
                UserAction::Create {
                    name,
                    password,
                    admin,
                },
        }) => {
            let spawner = hearth::cancel::Spawner::new(Arc::new(async_executor::Executor::new()));
            let app = hearth::App::open(config, Arc::new(hearth::SystemClock), spawner)?;
            let user = smol::block_on(hearth::ops::account::create_user(
                &app,
                &name,
                password.as_deref(),
                admin,
            ))
            .map_err(|e| e.to_string())?;
            app.store.close().map_err(|e| e.to_string())?;
            println!("created {user}");
            Ok(())
        }
        None => {
            let started = std::time::Instant::now();
            let hs = Homeserver::start(config)?;
            log::info!(
                "Hearth {} ready as {} in {:?}",
                env!("CARGO_PKG_VERSION"),
                hs.server_name(),
                started.elapsed()
            );
            let mut signals = signal_hook::iterator::Signals::new([
                signal_hook::consts::SIGTERM,
                signal_hook::consts::SIGINT,
            ])
            .map_err(|e| e.to_string())?;
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: shutting down");
            }
            hs.stop()
        }
    }
}

/// glibc tuning for a small resident footprint. argon2 allocates 19 MiB per password hash on
/// blocking-pool threads; with glibc's dynamic mmap threshold those blocks end up in per-thread
/// arenas and are never given back, so one burst of logins would pin ~150 MiB. A fixed mmap
/// threshold returns every large block to the OS on free, and two arenas bound fragmentation.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_MMAP_THRESHOLD: i32 = -3;
    const M_ARENA_MAX: i32 = -8;
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread exists.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 256 * 1024);
        mallopt(M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() {
    tune_allocator();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("hearth: {e}");
        std::process::exit(1);
    }
}
