//! Remote servers' signing keys: fetched from the server itself (`/_matrix/key/v2/server`),
//! checked (the answer must be signed by the keys it lists, for the server asked), cached in
//! memory and in the `server_keys` table with their validity.
//!
//! A fetch that several requests wait on runs once, in its own task (`ResponseCache`): a
//! dropped request never cancels it for the others, and its result is stored by the writer
//! whoever is still waiting.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use ruma::{
    api::federation::discovery::{get_server_keys, ServerSigningKeys},
    serde::Base64,
    signatures::{verify_json, PublicKeyMap, PublicKeySet},
    CanonicalJsonObject, OwnedServerName, ServerName,
};

use super::client::Client;
use crate::{
    cancel::{ResponseCache, Spawner},
    error::{Error, Result},
    store::{queries as q, Store},
    Clock,
};

/// One known key: base64 public key, valid until (ms), expired at (ms, for old keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownKey {
    pub key: String,
    pub valid_until_ts: i64,
    pub expired_ts: Option<i64>,
}

type ServerKeys = BTreeMap<String, KnownKey>;

pub struct Keys {
    memory: Mutex<HashMap<OwnedServerName, ServerKeys>>,
    fetches: ResponseCache<OwnedServerName, std::result::Result<ServerKeys, Error>>,
}

impl Keys {
    pub fn new(spawner: &Spawner) -> Self {
        Self {
            memory: Mutex::default(),
            fetches: ResponseCache::new(spawner, "key-fetch", Duration::from_secs(1)),
        }
    }

    fn remembered(&self, server: &ServerName) -> ServerKeys {
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(server)
            .cloned()
            .unwrap_or_default()
    }

    fn remember(&self, server: &ServerName, keys: &ServerKeys) {
        let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 10_000 {
            m.clear();
        }
        m.entry(server.to_owned()).or_default().extend(keys.clone());
    }

    /// The keys of `server` usable now for `key_ids`, fetching them if needed. Keys past
    /// their validity are fetched again; a key the server no longer lists is not usable.
    pub async fn for_request(
        &self,
        ctx: &KeyContext,
        server: &ServerName,
        key_ids: &[&str],
    ) -> Result<PublicKeySet> {
        let now = ctx.clock.now_ms() as i64;
        let usable = |keys: &ServerKeys| -> Option<PublicKeySet> {
            let mut out = PublicKeySet::new();
            for id in key_ids {
                let k = keys.get(*id)?;
                if k.expired_ts.is_some() || k.valid_until_ts < now {
                    return None;
                }
                out.insert(id.to_string(), Base64::parse(&k.key).ok()?);
            }
            Some(out)
        };
        if let Some(set) = usable(&self.remembered(server)) {
            return Ok(set);
        }
        let s = server.as_str().to_owned();
        let stored = ctx.store.read(move |c| q::list_server_keys(c, &s)).await?;
        let stored: ServerKeys = stored
            .into_iter()
            .map(|r| {
                (
                    r.key_id,
                    KnownKey {
                        key: r.key,
                        valid_until_ts: r.valid_until_ts,
                        expired_ts: r.expired_ts,
                    },
                )
            })
            .collect();
        self.remember(server, &stored);
        if let Some(set) = usable(&stored) {
            return Ok(set);
        }
        let ctx2 = ctx.clone();
        let name = server.to_owned();
        let fetched = self
            .fetches
            .get_or_compute(server.to_owned(), move || async move {
                fetch_and_store(&ctx2, &name).await
            })
            .await?;
        self.remember(server, &fetched);
        usable(&fetched).ok_or_else(|| {
            Error::new(
                401,
                "M_UNAUTHORIZED",
                format!("{server} has no valid key among {key_ids:?}"),
            )
        })
    }
}

/// What a key fetch needs; cheap to clone into its own task.
#[derive(Clone)]
pub struct KeyContext {
    pub client: Arc<Client>,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
}

async fn fetch_and_store(ctx: &KeyContext, server: &ServerName) -> Result<ServerKeys> {
    let res = ctx
        .client
        .send_unauthenticated(server, get_server_keys::v2::Request::new())
        .await?;
    let keys = check_server_keys(server, res.server_key.json().get())?;
    let (s, rows) = (server.as_str().to_owned(), keys.clone());
    ctx.store
        .write(move |tx| {
            for (id, k) in &rows {
                q::upsert_server_key(tx, &s, id, &k.key, k.valid_until_ts, k.expired_ts)?;
            }
            Ok(())
        })
        .await?;
    Ok(keys)
}

/// Checks a `/_matrix/key/v2/server` answer: for the server asked, signed by every key it
/// lists as current. Returns current and old keys.
pub fn check_server_keys(server: &ServerName, json: &str) -> Result<ServerKeys> {
    let bad = |m: String| Error::new(502, "M_UNKNOWN", format!("keys of {server}: {m}"));
    let parsed: ServerSigningKeys =
        serde_json::from_str(json).map_err(|e| bad(format!("malformed: {e}")))?;
    if parsed.server_name != server {
        return Err(bad(format!("answer is for {}", parsed.server_name)));
    }
    let object: CanonicalJsonObject =
        serde_json::from_str(json).map_err(|e| bad(format!("not canonical JSON: {e}")))?;
    let own: PublicKeySet = parsed
        .verify_keys
        .iter()
        .map(|(id, k)| (id.to_string(), k.key.clone()))
        .collect();
    if own.is_empty() {
        return Err(bad("no verify_keys".into()));
    }
    let mut map = PublicKeyMap::new();
    map.insert(server.to_string(), own);
    verify_json(&map, &object).map_err(|e| bad(format!("bad self-signature: {e}")))?;
    let until = u64::from(parsed.valid_until_ts.get()) as i64;
    let mut out: ServerKeys = parsed
        .verify_keys
        .into_iter()
        .map(|(id, k)| {
            (
                id.to_string(),
                KnownKey {
                    key: k.key.encode(),
                    valid_until_ts: until,
                    expired_ts: None,
                },
            )
        })
        .collect();
    for (id, k) in parsed.old_verify_keys {
        let expired = u64::from(k.expired_ts.get()) as i64;
        out.entry(id.to_string()).or_insert(KnownKey {
            key: k.key.encode(),
            valid_until_ts: expired,
            expired_ts: Some(expired),
        });
    }
    Ok(out)
}
