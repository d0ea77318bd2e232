//! Configuration: a TOML file (`--config`), command-line flags on top, embedded defaults under
//! both. `Config::default()` is a usable local server: `hearth.db` in the working directory,
//! client API on 127.0.0.1:8008, server name `localhost:8008`.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

/// Who may create accounts through `/register`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// Anyone who can reach the server (a single-user Pi on a LAN, a test server).
    Open,
    /// Only with a registration token (`m.login.registration_token`).
    Token,
    /// Only `hearth user create`.
    Closed,
}

/// A token bucket: `burst` requests at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RateLimits {
    pub enabled: bool,
    /// Per client IP.
    pub login: RateLimit,
    /// Per client IP.
    pub register: RateLimit,
    /// Per user, for event sends.
    pub send: RateLimit,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            enabled: true,
            login: RateLimit {
                per_second: 0.5,
                burst: 5.0,
            },
            register: RateLimit {
                per_second: 0.2,
                burst: 5.0,
            },
            send: RateLimit {
                per_second: 20.0,
                burst: 50.0,
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The server name in user IDs (`@alice:NAME`). Cannot change once the database exists.
    pub server_name: String,
    /// Addresses the client (and later federation) API listens on.
    pub listen: Vec<SocketAddr>,
    /// The SQLite file. Its `-wal` and `-shm` companions live beside it.
    pub database: PathBuf,
    /// PEM certificate chain and key: when both are set every listener speaks TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub registration: Registration,
    /// `registration = "open"` on a listener that is not loopback lets anyone who can reach
    /// the server create accounts (spam bots find such servers within hours). Hearth refuses to
    /// start that way unless this is set.
    pub allow_open_registration_from_anyone_on_the_internet: bool,
    /// Tokens accepted by `m.login.registration_token` (in addition to those in the database).
    pub registration_tokens: Vec<String>,
    pub rate_limits: RateLimits,
    /// Largest accepted request body, in bytes.
    pub max_request_bytes: usize,
    /// Longest accepted request line (`GET /path?query HTTP/1.1`), in bytes; longer gets 414
    /// `M_TOO_LARGE`.
    pub max_uri_bytes: usize,
    /// Largest accepted request head (request line and headers), in bytes; larger gets 431
    /// `M_TOO_LARGE`. At most 8191: the HTTP library drops larger heads without an answer.
    pub max_head_bytes: usize,
    /// Room version for `/createRoom` when the client names none.
    pub default_room_version: String,
    /// Reader connections in the pool (the writer is separate).
    pub db_readers: u32,
    /// The URL clients reach Hearth at (Synapse's `public_baseurl`), e.g.
    /// `https://matrix.example.org` behind a reverse proxy. Used for every absolute URL Hearth
    /// gives out (`/.well-known/matrix/client`). Without it: `https` when Hearth serves TLS
    /// itself, else `http`, with the host the request was sent to.
    pub public_baseurl: Option<String>,
    /// Reverse proxies (IPs or CIDR ranges) whose `X-Forwarded-For` is believed: for a
    /// request from one of them the client's address (rate limits, logs) is the right-most
    /// `X-Forwarded-For` entry that is not itself a trusted proxy. Empty: the TCP peer.
    pub trusted_proxies: Vec<crate::proxy::IpNet>,
    /// Federation with other servers (`[federation]` in TOML).
    pub federation: FederationConfig,
    /// The media repository (`[media]` in TOML).
    pub media: MediaConfig,
    /// Presence (`[presence]` in TOML).
    pub presence: PresenceConfig,
    /// TURN servers handed to clients for VoIP (`[turn]` in TOML).
    pub turn: TurnConfig,
    /// Push rules, unread counts and pushers (`[push]` in TOML).
    pub push: PushConfig,
}

/// Presence: online/idle/offline and status messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// Track presence and share it with clients and other servers. Off (Synapse's
    /// `presence.enabled: false`, which small servers often choose to save work): updates are
    /// accepted and dropped, `/sync` carries none, `m.presence` EDUs are ignored and
    /// `GET /presence/{userId}/status` says offline.
    pub enabled: bool,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// The TURN servers `GET /voip/turnServer` hands out, with Synapse's option names. With a
/// `turn_shared_secret` each answer carries time-limited credentials in the coturn REST scheme
/// (coturn's `use-auth-secret` / `static-auth-secret`); otherwise the static
/// `turn_username` / `turn_password`. No `turn_uris`: the answer is `{}` (no TURN server).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TurnConfig {
    /// e.g. `["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"]`.
    pub turn_uris: Vec<String>,
    pub turn_shared_secret: Option<String>,
    pub turn_username: Option<String>,
    pub turn_password: Option<String>,
    /// How long credentials made from the shared secret stay valid (the answer's `ttl`):
    /// milliseconds, or a string with a unit (`"90s"`, `"30m"`, `"1h"`, `"1d"`), as Synapse's
    /// `turn_user_lifetime`. One hour by default.
    pub turn_user_lifetime: Option<Lifetime>,
}

/// A duration in Synapse's config syntax: an integer is milliseconds; a string is a number
/// with a unit (`ms`, `s`, `m`, `h`, `d`, `w`, `y`) or bare milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "toml::Value")]
pub struct Lifetime(pub std::time::Duration);

impl TryFrom<toml::Value> for Lifetime {
    type Error = String;

    fn try_from(v: toml::Value) -> Result<Self, String> {
        let ms = match &v {
            toml::Value::Integer(i) if *i >= 0 => *i as u64,
            toml::Value::String(s) => {
                let s = s.trim();
                let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
                let (n, unit) = s.split_at(split);
                let n: u64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
                let per: u64 = match unit {
                    "" | "ms" => 1,
                    "s" => 1_000,
                    "m" => 60_000,
                    "h" => 3_600_000,
                    "d" => 86_400_000,
                    "w" => 7 * 86_400_000,
                    "y" => 365 * 86_400_000,
                    _ => return Err(format!("bad duration unit in {s:?}")),
                };
                n.checked_mul(per)
                    .ok_or_else(|| format!("duration {s:?} is too long"))?
            }
            _ => return Err(format!("bad duration {v}")),
        };
        Ok(Self(std::time::Duration::from_millis(ms)))
    }
}

impl TurnConfig {
    /// The `ttl` of shared-secret credentials.
    pub fn lifetime(&self) -> std::time::Duration {
        self.turn_user_lifetime
            .map(|l| l.0)
            .unwrap_or(std::time::Duration::from_secs(3600))
    }
}

/// Push rules that run (see `workers::push`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Evaluate every new event against the local members' push rules: unread counts in
    /// `/sync`, `/notifications`, pushes to phones. Off saves one evaluation per local member
    /// per message; events that arrive while it is off are never counted or pushed (the
    /// evaluator only moves its position past them), so turning it on does not flood phones.
    pub evaluate: bool,
    /// Seconds between two runs of the notification pruning (`workers::push_prune`: read
    /// notifications older than a day, read highlights older than 30 days); 0: never.
    pub prune_every_secs: u64,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            evaluate: true,
            prune_every_secs: 3600,
        }
    }
}

/// Uploads and thumbnails. Files live in a `media/` directory beside the database file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Largest accepted upload, in bytes (Synapse's `max_upload_size`, 50 MiB by default);
    /// larger gets 413 `M_TOO_LARGE`, while the body is still arriving.
    pub max_upload_bytes: u64,
    /// Total bytes of media one local user may have uploaded; an upload past it gets 400
    /// `M_RESOURCE_LIMIT_EXCEEDED` (as Synapse's `media_upload_limits`). 0 means no quota.
    pub user_quota_bytes: u64,
    /// Images with more pixels than this are not decoded for thumbnails (memory on a small
    /// machine: 32 megapixels is 128 MiB as RGBA).
    pub max_image_pixels: u64,
    /// Serve media uploaded from now on at the legacy unauthenticated
    /// `/_matrix/media/v3/download` and `/thumbnail` too (Synapse's
    /// `enable_authenticated_media = false`). Off by default, as in Synapse: Matrix 1.11 froze
    /// those endpoints, and media uploaded while this is off is never served there.
    pub legacy_unauthenticated_downloads: bool,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            max_upload_bytes: 50 * 1024 * 1024,
            user_quota_bytes: 1024 * 1024 * 1024,
            max_image_pixels: 32_000_000,
            legacy_unauthenticated_downloads: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {
    /// Check remote servers' TLS certificates against the Web PKI. Turn off only for tests
    /// with self-signed peers (`--insecure-federation-tls`); Hearth warns at start.
    pub verify_certificates: bool,
    /// Where other servers should connect (`host[:port]`), served as `m.server` at
    /// `/.well-known/matrix/server` when Hearth answers for the server name's host itself
    /// (e.g. `"matrix.example.org:443"`). Unset: that path is 404 and servers use port 8448.
    pub well_known_server: Option<String>,
    /// Notary servers asked (`POST /_matrix/key/v2/query`) for a server's keys when the server
    /// itself cannot be reached, e.g. `[{ server_name = "matrix.org" }]`.
    ///
    /// Empty by default, unlike Synapse's `matrix.org`: a notary can vouch for any server's
    /// keys, so trusting one is the operator's choice, and a default pointing at the Internet
    /// would make an unreachable peer cost a second timeout on isolated deployments. Without
    /// one, events signed by servers that are gone for good (common in old, large rooms)
    /// cannot be checked; operators joining such rooms should name a notary.
    pub trusted_key_servers: Vec<TrustedKeyServer>,
    /// Join rooms on other servers with partial state (`omit_members=true`, MSC3706): the
    /// join answers with the state minus most memberships, and the rest is fetched in the
    /// background (the resync). Off: the full state is downloaded before the join returns.
    pub partial_joins: bool,
    /// Answer other servers' `/send_join` with partial state when they ask for it
    /// (`omit_members=true`). Off: they always get the full state, so they join in full.
    /// Synapse 1.163 has no switch for its own faster joins (it asks `omit_members` whenever
    /// it is not in the room yet): this is how a benchmark measures a full join by Synapse.
    pub serve_partial_joins: bool,
}

/// One notary: its name and, optionally, its keys (`key ID` → unpadded base64). Without
/// keys, the notary's own keys are fetched from it directly (trust on first use).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustedKeyServer {
    pub server_name: String,
    #[serde(default)]
    pub verify_keys: std::collections::BTreeMap<String, String>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            verify_certificates: true,
            well_known_server: None,
            trusted_key_servers: Vec::new(),
            partial_joins: true,
            serve_partial_joins: true,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost:8008".into(),
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8008))],
            database: PathBuf::from("hearth.db"),
            tls_cert: None,
            tls_key: None,
            registration: Registration::Open,
            allow_open_registration_from_anyone_on_the_internet: false,
            registration_tokens: Vec::new(),
            rate_limits: RateLimits::default(),
            max_request_bytes: 1024 * 1024,
            max_uri_bytes: 6 * 1024,
            max_head_bytes: crate::server::ASYNC_H1_MAX_HEAD,
            default_room_version: "10".into(),
            db_readers: 4,
            public_baseurl: None,
            trusted_proxies: Vec::new(),
            federation: FederationConfig::default(),
            media: MediaConfig::default(),
            presence: PresenceConfig::default(),
            turn: TurnConfig::default(),
            push: PushConfig::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file; keys it leaves out keep their defaults.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The directory media files are kept in: `media/` beside the database file.
    pub fn media_dir(&self) -> PathBuf {
        self.database
            .parent()
            .map(|p| p.join("media"))
            .unwrap_or_else(|| PathBuf::from("media"))
    }

    /// `public_baseurl` without its trailing `/`, if set.
    pub fn public_base(&self) -> Option<&str> {
        self.public_baseurl
            .as_deref()
            .map(|u| u.trim_end_matches('/'))
    }

    /// Checks what serde cannot: a valid server name, a supported room version, TLS halves.
    pub fn validate(&self) -> Result<(), String> {
        ruma::ServerName::parse(&self.server_name)
            .map_err(|e| format!("server_name {:?}: {e}", self.server_name))?;
        let v = ruma::RoomVersionId::try_from(self.default_room_version.as_str())
            .map_err(|e| format!("default_room_version: {e}"))?;
        if !crate::room::is_supported_version(&v) {
            return Err(format!("default_room_version {v} is not supported"));
        }
        let t = &self.turn;
        let static_creds = t.turn_username.is_some() && t.turn_password.is_some();
        if !t.turn_uris.is_empty() && t.turn_shared_secret.is_none() && !static_creds {
            // Synapse would answer `{}` here, hiding a half-done setup; refuse to start instead.
            return Err(
                "[turn] turn_uris needs turn_shared_secret or both turn_username and \
                        turn_password"
                    .into(),
            );
        }
        for n in &self.federation.trusted_key_servers {
            ruma::ServerName::parse(&n.server_name)
                .map_err(|e| format!("trusted_key_servers: {:?}: {e}", n.server_name))?;
            for (id, key) in &n.verify_keys {
                if !id.starts_with("ed25519:")
                    || ruma::serde::Base64::<ruma::serde::base64::Standard, Vec<u8>>::parse(key)
                        .is_err()
                {
                    return Err(format!(
                        "trusted_key_servers: {}: key {id:?} must be ed25519:… with a base64 key",
                        n.server_name
                    ));
                }
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("tls_cert and tls_key must be given together".into());
        }
        if self.listen.is_empty() {
            return Err("at least one listen address is needed".into());
        }
        let most = crate::server::ASYNC_H1_MAX_HEAD;
        if self.max_head_bytes > most || self.max_head_bytes < 256 {
            return Err(format!(
                "max_head_bytes must be 256 to {most} (the HTTP library's limit)"
            ));
        }
        if self.max_uri_bytes < 64 || self.max_uri_bytes >= self.max_head_bytes {
            return Err("max_uri_bytes must be at least 64 and less than max_head_bytes".into());
        }
        if let Some(u) = &self.public_baseurl {
            let url =
                http_types::Url::parse(u).map_err(|e| format!("public_baseurl {u:?}: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(format!(
                    "public_baseurl {u:?}: must be an http:// or https:// URL with a host"
                ));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(format!(
                    "public_baseurl {u:?}: must not have a query or fragment"
                ));
            }
        }
        if self.registration == Registration::Open
            && !self.allow_open_registration_from_anyone_on_the_internet
        {
            if let Some(a) = self.listen.iter().find(|a| !a.ip().is_loopback()) {
                return Err(format!(
                    "registration is open (no token) and Hearth listens on {a}, which is not \
                     loopback: anyone who can reach it could create accounts. Use \
                     `registration = \"token\"` (--registration token) with \
                     `registration_tokens`, or `registration = \"closed\"` and `hearth user \
                     create`; or, if you really mean it, set \
                     `allow_open_registration_from_anyone_on_the_internet = true` \
                     (--allow-open-registration-from-anyone-on-the-internet)"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Config, Registration};

    fn on(addr: &str, registration: Registration) -> Config {
        Config {
            listen: vec![addr.parse().unwrap()],
            registration,
            ..Config::default()
        }
    }

    #[test]
    fn open_registration_off_loopback_needs_the_explicit_key() {
        assert!(Config::default().validate().is_ok(), "the default starts");
        assert!(on("[::1]:8008", Registration::Open).validate().is_ok());
        let err = on("0.0.0.0:8008", Registration::Open)
            .validate()
            .unwrap_err();
        assert!(err.contains("registration = \"token\""), "{err}");
        assert!(err.contains("allow_open_registration_from_anyone_on_the_internet"));
        let mut both = on("127.0.0.1:8008", Registration::Open);
        both.listen.push("192.0.2.1:8008".parse().unwrap());
        assert!(both.validate().is_err(), "any non-loopback listener counts");
        assert!(on("0.0.0.0:8008", Registration::Token).validate().is_ok());
        assert!(on("0.0.0.0:8008", Registration::Closed).validate().is_ok());
        let mut meant = on("0.0.0.0:8008", Registration::Open);
        meant.public_baseurl = Some("https://matrix.example.org/".into());
        assert_eq!(meant.public_base(), Some("https://matrix.example.org"));
        meant.allow_open_registration_from_anyone_on_the_internet = true;
        assert!(meant.validate().is_ok());
    }

    #[test]
    fn new_keys_parse_from_toml() {
        let c: Config = toml::from_str(
            r#"
            listen = ["0.0.0.0:8008"]
            registration = "token"
            trusted_proxies = ["127.0.0.1", "10.0.0.0/8", "fd00::/8"]
            public_baseurl = "https://matrix.example.org"
            max_uri_bytes = 4096
            max_head_bytes = 8000
            "#,
        )
        .unwrap();
        assert!(c.validate().is_ok());
        assert_eq!(c.trusted_proxies.len(), 3);
        assert!(c.trusted_proxies[1].contains("10.9.8.7".parse().unwrap()));
        assert!(toml::from_str::<Config>(r#"trusted_proxies = ["10.0.0.0/40"]"#).is_err());
        let too_big = Config {
            max_head_bytes: 16 * 1024,
            ..Config::default()
        };
        assert!(
            too_big.validate().is_err(),
            "above the HTTP library's limit"
        );
    }

    #[test]
    fn public_baseurl_must_be_an_http_url() {
        for bad in [
            "matrix.example.org",
            "ftp://x.org",
            "https://",
            "https://x.org/?a=1",
        ] {
            let c = Config {
                public_baseurl: Some(bad.into()),
                ..Config::default()
            };
            assert!(c.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn turn_lifetime_syntax_and_credentials_required() {
        let parse = |t: &str| toml::from_str::<Config>(t).map(|c| c.turn.lifetime());
        let secs = std::time::Duration::from_secs;
        assert_eq!(parse("").unwrap(), secs(3600), "an hour by default");
        assert_eq!(
            parse("[turn]\nturn_user_lifetime = 90000").unwrap(),
            secs(90),
            "ms"
        );
        assert_eq!(
            parse("[turn]\nturn_user_lifetime = \"2h\"").unwrap(),
            secs(7200)
        );
        assert_eq!(
            parse("[turn]\nturn_user_lifetime = \"30m\"").unwrap(),
            secs(1800)
        );
        assert!(parse("[turn]\nturn_user_lifetime = \"2 fortnights\"").is_err());
        assert!(parse("[turn]\nturn_user_lifetime = -1").is_err());
        let mut c = Config::default();
        c.turn.turn_uris = vec!["turn:x".into()];
        assert!(c.validate().is_err(), "URIs without credentials");
        c.turn.turn_username = Some("u".into());
        assert!(c.validate().is_err(), "half of the static pair");
        c.turn.turn_password = Some("p".into());
        assert!(c.validate().is_ok());
        c.turn.turn_username = None;
        c.turn.turn_shared_secret = Some("s".into());
        assert!(c.validate().is_ok());
    }
}
