//! Remote servers' signing keys: fetched from the server itself (`/_matrix/key/v2/server`),
//! or, when it cannot be reached, from the configured notaries (`trusted_key_servers`,
//! `POST /_matrix/key/v2/query`); checked (an answer must be for the server asked and signed
//! by the keys it lists, and a notary's answer also by the notary); cached in memory and in
//! the `server_keys` table with their validity.
//!
//! A key is usable for something that happened at time `t` (an event's `origin_server_ts`, a
//! request's "now") when `t` is within its validity: up to `valid_until_ts` for a current key,
//! before `expired_ts` for an old one (`old_verify_keys`). A cached key not valid at `t` is
//! fetched again.
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
    api::federation::discovery::{
        get_remote_server_keys_batch::v2 as notary_query, get_server_keys, ServerSigningKeys,
    },
    serde::Base64,
    signatures::{verify_json, PublicKeyMap, PublicKeySet},
    CanonicalJsonObject, CanonicalJsonValue, OwnedServerName, ServerName,
};

use super::client::Client;
use crate::{
    cancel::{ResponseCache, Spawner},
    config::TrustedKeyServer,
    error::{Error, Result},
    store::{queries as q, Store},
    Clock,
};

/// The longest a fetched key is believed valid, whatever `valid_until_ts` it claims: the
/// spec's 7 days (room versions 5 and later).
const MAX_VALIDITY_MS: i64 = 7 * 24 * 3600 * 1000;

/// One known key: base64 public key, valid until (ms), expired at (ms, for old keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownKey {
    pub key: String,
    pub valid_until_ts: i64,
    pub expired_ts: Option<i64>,
}

impl KnownKey {
    /// Whether the key may verify a signature made at `ts` (ms).
    pub fn valid_at(&self, ts: i64) -> bool {
        match self.expired_ts {
            Some(expired) => ts < expired,
            None => ts <= self.valid_until_ts,
        }
    }
}

type ServerKeys = BTreeMap<String, KnownKey>;

/// One checked key answer: its keys, and the signed object as received (kept to be served
/// again, re-signed, when we act as a notary).
#[derive(Clone, Debug)]
pub struct Answer {
    pub keys: ServerKeys,
    pub valid_until_ts: i64,
    pub object: CanonicalJsonObject,
}

type Fetch = ResponseCache<OwnedServerName, std::result::Result<ServerKeys, Error>>;

pub struct Keys {
    cache: Arc<Cache>,
    /// Fetches for our own verification: directly, then through the notaries.
    fetches: Fetch,
    /// Direct fetches only, for serving as a notary: asking our notaries on behalf of a server
    /// that may itself be our notary could wait on itself.
    direct: Fetch,
}

#[derive(Default)]
struct Cache {
    memory: Mutex<HashMap<OwnedServerName, ServerKeys>>,
    /// The latest signed answer per server. Memory only (`server_keys` keeps the keys, not the
    /// signed documents): after a restart a notary query fetches the document again.
    signed: Mutex<HashMap<OwnedServerName, Answer>>,
    notaries: Vec<TrustedKeyServer>,
}

impl Cache {
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
        let known = m.entry(server.to_owned()).or_default();
        for (id, k) in keys {
            merge(known, id, k);
        }
    }

    fn signed(&self, server: &ServerName) -> Option<Answer> {
        self.signed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(server)
            .cloned()
    }

    fn remember_signed(&self, server: &ServerName, answer: Answer) {
        let mut m = self.signed.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 10_000 {
            m.clear();
        }
        match m.get(server) {
            Some(old) if old.valid_until_ts > answer.valid_until_ts => {}
            _ => {
                m.insert(server.to_owned(), answer);
            }
        }
    }
}

/// Adds what we learnt of a key: an old key stays old; otherwise the longer validity wins.
fn merge(known: &mut ServerKeys, id: &str, k: &KnownKey) {
    match known.get_mut(id) {
        None => {
            known.insert(id.to_owned(), k.clone());
        }
        Some(have) => {
            if k.expired_ts.is_some() && have.expired_ts.is_none() {
                *have = k.clone();
            } else if have.expired_ts.is_none() && k.valid_until_ts > have.valid_until_ts {
                have.valid_until_ts = k.valid_until_ts;
            }
        }
    }
}

impl Keys {
    pub fn new(spawner: &Spawner, notaries: Vec<TrustedKeyServer>) -> Self {
        Self {
            cache: Arc::new(Cache {
                notaries,
                ..Cache::default()
            }),
            fetches: ResponseCache::new(spawner, "key-fetch", Duration::from_secs(1)),
            direct: ResponseCache::new(spawner, "key-fetch-direct", Duration::from_secs(1)),
        }
    }

    /// The keys of `server` for `key_ids`, each valid at `valid_at` (ms: now for a request's
    /// signature, the event's `origin_server_ts` for a PDU), fetching them if needed.
    pub async fn for_request(
        &self,
        ctx: &KeyContext,
        server: &ServerName,
        key_ids: &[&str],
        valid_at: i64,
    ) -> Result<PublicKeySet> {
        let usable = |keys: &ServerKeys| -> Option<PublicKeySet> {
            let mut out = PublicKeySet::new();
            for id in key_ids {
                let k = keys.get(*id).filter(|k| k.valid_at(valid_at))?;
                out.insert(id.to_string(), Base64::parse(&k.key).ok()?);
            }
            Some(out)
        };
        if let Some(set) = usable(&self.cache.remembered(server)) {
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
        self.cache.remember(server, &stored);
        if let Some(set) = usable(&self.cache.remembered(server)) {
            return Ok(set);
        }
        let fetched = self.fetch(ctx, server, true).await;
        if let Some(set) = usable(&self.cache.remembered(server)) {
            return Ok(set);
        }
        fetched?;
        Err(Error::new(
            401,
            "M_UNAUTHORIZED",
            format!("{server} has no key among {key_ids:?} valid at {valid_at}"),
        ))
    }

    /// One shared, shielded fetch of `server`'s keys; what it learns is remembered whoever
    /// is still waiting.
    async fn fetch(
        &self,
        ctx: &KeyContext,
        server: &ServerName,
        with_notaries: bool,
    ) -> Result<ServerKeys> {
        let (ctx2, cache, name) = (ctx.clone(), self.cache.clone(), server.to_owned());
        let make = move || async move {
            let keys = fetch_and_store(&ctx2, &cache, &name, with_notaries).await?;
            cache.remember(&name, &keys);
            Ok(keys)
        };
        let cache = if with_notaries {
            &self.fetches
        } else {
            &self.direct
        };
        cache.get_or_compute(server.to_owned(), make).await
    }

    /// What we answer, as a notary, about `server`: its latest signed key document (with
    /// the origin's signature), fetched from the server directly when we hold none valid at
    /// `min_valid_until`. A stale document is still returned when the server cannot be
    /// reached (as Synapse does: the asker decides what it accepts); `None` when we never
    /// had one.
    pub async fn notary_answer(
        &self,
        ctx: &KeyContext,
        server: &ServerName,
        min_valid_until: i64,
    ) -> Option<CanonicalJsonObject> {
        match self.cache.signed(server) {
            Some(a) if a.valid_until_ts >= min_valid_until => return Some(a.object),
            _ => {}
        }
        if let Err(e) = self.fetch(ctx, server, false).await {
            log::info!("notary: keys of {server}: {e}");
        }
        self.cache.signed(server).map(|a| a.object)
    }
}

/// What a key fetch needs; cheap to clone into its own task.
#[derive(Clone)]
pub struct KeyContext {
    pub client: Arc<Client>,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
}

/// Fetches `server`'s keys (directly; failing that, when allowed, through the notaries),
/// stores them and remembers the signed documents. Validity is capped at 7 days from now.
async fn fetch_and_store(
    ctx: &KeyContext,
    cache: &Cache,
    server: &ServerName,
    with_notaries: bool,
) -> Result<ServerKeys> {
    let answers = match direct(ctx, server).await {
        Ok(a) => vec![a],
        Err(e) if !with_notaries => return Err(e),
        Err(e) => {
            log::info!("keys of {server}: {e}; asking the notaries");
            let via = via_notaries(ctx, &cache.notaries, server).await;
            if via.is_empty() {
                return Err(e);
            }
            via
        }
    };
    let cap = ctx.clock.now_ms() as i64 + MAX_VALIDITY_MS;
    let mut keys = ServerKeys::new();
    for a in answers {
        for (id, k) in &a.keys {
            let mut k = k.clone();
            k.valid_until_ts = k.valid_until_ts.min(cap);
            merge(&mut keys, id, &k);
        }
        cache.remember_signed(server, a);
    }
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

/// `GET /_matrix/key/v2/server` on `server`, checked.
async fn direct(ctx: &KeyContext, server: &ServerName) -> Result<Answer> {
    let res = ctx
        .client
        .send_unauthenticated(server, get_server_keys::v2::Request::new())
        .await?;
    check_answer(server, res.server_key.json().get())
}

/// Asks each notary in turn for `server`'s keys; the first that answers with documents that
/// are self-signed by `server` and signed by the notary wins. Notaries that fail are logged.
async fn via_notaries(
    ctx: &KeyContext,
    notaries: &[TrustedKeyServer],
    server: &ServerName,
) -> Vec<Answer> {
    for n in notaries {
        let Ok(notary) = <&ServerName>::try_from(n.server_name.as_str()) else {
            continue;
        };
        if notary == server {
            continue;
        }
        match ask_notary(ctx, n, notary, server).await {
            Ok(answers) if !answers.is_empty() => return answers,
            Ok(_) => log::info!("notary {notary} has no keys of {server}"),
            Err(e) => log::warn!("notary {notary} for the keys of {server}: {e}"),
        }
    }
    Vec::new()
}

async fn ask_notary(
    ctx: &KeyContext,
    n: &TrustedKeyServer,
    notary: &ServerName,
    server: &ServerName,
) -> Result<Vec<Answer>> {
    let notary_keys: PublicKeySet = if n.verify_keys.is_empty() {
        // Trust on first use, as Synapse does for a notary configured without keys.
        let now = ctx.clock.now_ms() as i64;
        direct(ctx, notary)
            .await?
            .keys
            .into_iter()
            .filter(|(_, k)| k.valid_at(now))
            .filter_map(|(id, k)| Some((id, Base64::parse(&k.key).ok()?)))
            .collect()
    } else {
        n.verify_keys
            .iter()
            .filter_map(|(id, k)| Some((id.clone(), Base64::parse(k).ok()?)))
            .collect()
    };
    let query = BTreeMap::from([(server.to_owned(), BTreeMap::new())]);
    let res = ctx
        .client
        .send_unauthenticated(notary, notary_query::Request::new(query))
        .await?;
    let mut out = Vec::new();
    for raw in res.server_keys {
        let checked = check_answer(server, raw.json().get()).and_then(|a| {
            signed_by(&a.object, notary, &notary_keys)
                .map_err(|e| Error::new(502, "M_UNKNOWN", format!("notary {notary}: {e}")))?;
            Ok(a)
        });
        match checked {
            Ok(a) => out.push(a),
            Err(e) => log::warn!("{e}"),
        }
    }
    Ok(out)
}

/// Checks `object`'s signature by `entity` alone (other signers, such as a notary, are left
/// out of the check): at least one of `keys` must have signed it, and every signature by
/// `entity` with one of `keys` must be good.
pub fn signed_by(
    object: &CanonicalJsonObject,
    entity: &ServerName,
    keys: &PublicKeySet,
) -> std::result::Result<(), String> {
    let mut only = object.clone();
    match only.get_mut("signatures") {
        Some(CanonicalJsonValue::Object(sigs)) => sigs.retain(|k, _| k == entity.as_str()),
        _ => return Err("no signatures".into()),
    }
    let signed_with_known = match only.get("signatures") {
        Some(CanonicalJsonValue::Object(sigs)) => match sigs.get(entity.as_str()) {
            Some(CanonicalJsonValue::Object(by)) => by.keys().any(|id| keys.contains_key(id)),
            _ => false,
        },
        _ => false,
    };
    if !signed_with_known {
        return Err(format!("not signed by {entity} with a known key"));
    }
    let mut map = PublicKeyMap::new();
    map.insert(entity.to_string(), keys.clone());
    verify_json(&map, &only).map_err(|e| format!("bad signature by {entity}: {e}"))
}

/// Checks a `/_matrix/key/v2/server` answer: for the server asked, signed by every key it
/// lists as current. Returns current and old keys.
pub fn check_server_keys(server: &ServerName, json: &str) -> Result<ServerKeys> {
    Ok(check_answer(server, json)?.keys)
}

/// [`check_server_keys`], keeping the signed document and its validity.
pub fn check_answer(server: &ServerName, json: &str) -> Result<Answer> {
    let bad = |m: String| Error::new(502, "M_UNKNOWN", format!("keys of {server}: {m}"));
    let parsed: ServerSigningKeys =
        serde_json::from_str(json).map_err(|e| bad(format!("malformed: {e}")))?;
    if parsed.server_name != server {
        return Err(bad(format!("answer is for {}", parsed.server_name)));
    }
    let object: CanonicalJsonObject =
        serde_json::from_str(json).map_err(|e| bad(format!("not canonical JSON: {e}")))?;
    if parsed.verify_keys.is_empty() {
        return Err(bad("no verify_keys".into()));
    }
    // Each current key must have signed the document (as Synapse requires).
    for (id, k) in &parsed.verify_keys {
        let one = PublicKeySet::from([(id.to_string(), k.key.clone())]);
        signed_by(&object, server, &one).map_err(|e| bad(format!("self-signature: {e}")))?;
    }
    let until = u64::from(parsed.valid_until_ts.get()) as i64;
    let mut keys: ServerKeys = parsed
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
        keys.entry(id.to_string()).or_insert(KnownKey {
            key: k.key.encode(),
            valid_until_ts: expired,
            expired_ts: Some(expired),
        });
    }
    Ok(Answer {
        keys,
        valid_until_ts: until,
        object,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_keys_are_valid_until_their_validity_old_keys_before_they_expired() {
        let current = KnownKey {
            key: String::new(),
            valid_until_ts: 100,
            expired_ts: None,
        };
        assert!(current.valid_at(100) && !current.valid_at(101));
        let old = KnownKey {
            expired_ts: Some(50),
            ..current.clone()
        };
        assert!(old.valid_at(49) && !old.valid_at(50) && !old.valid_at(100));
        // A key learnt to be old stays old, whatever validity was claimed before.
        let mut known = ServerKeys::from([("ed25519:a".into(), current.clone())]);
        merge(&mut known, "ed25519:a", &old);
        assert_eq!(known["ed25519:a"], old);
        merge(&mut known, "ed25519:a", &current);
        assert_eq!(known["ed25519:a"], old);
    }
}
