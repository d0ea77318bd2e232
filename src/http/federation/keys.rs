//! Our signing keys and server version, for other servers; and the notary endpoints, which
//! serve other servers' keys as we know them, re-signed by us.

use ruma::{
    api::federation::discovery::{
        get_remote_server_keys::v2 as query_one, get_remote_server_keys_batch::v2 as query_batch,
    },
    serde::Base64,
    signatures::sign_json,
    CanonicalJsonObject, ServerName,
};
use serde_json::json;
use tide::Response;

use crate::{
    error::{Error, Result},
    http::{json, ruma_req, Req},
    App,
};

/// How long other servers may cache our key without asking again.
const KEY_VALIDITY_MS: u64 = 7 * 24 * 3600 * 1000;

/// Most servers one notary query may name: each unknown one costs an outbound fetch.
const MAX_QUERIED_SERVERS: usize = 50;

/// Our key document, signed by us.
fn own_keys(app: &App) -> Result<CanonicalJsonObject> {
    let pair = &app.local.key.pair;
    let key_id = format!("ed25519:{}", pair.version());
    let body = json!({
        "server_name": app.server_name.as_str(),
        "valid_until_ts": app.clock.now_ms() + KEY_VALIDITY_MS,
        "verify_keys": { key_id: { "key": Base64::<ruma::serde::base64::Standard, _>::new(pair.public_key().to_vec()).encode() } },
        "old_verify_keys": {},
    });
    let mut obj: CanonicalJsonObject = serde_json::from_value(body)?;
    sign_json(app.server_name.as_str(), pair, &mut obj).map_err(Error::internal)?;
    Ok(obj)
}

/// # `GET /_matrix/key/v2/server`
pub async fn server_keys(req: Req) -> Result<Response> {
    json(&own_keys(req.state())?)
}

/// # `GET /_matrix/federation/v1/version`
pub async fn version(_req: Req) -> Result<Response> {
    json(&json!({ "server": { "name": "Hearth", "version": env!("CARGO_PKG_VERSION") } }))
}

/// # `POST /_matrix/key/v2/query`
pub async fn query_keys(mut req: Req) -> Result<Response> {
    let r = ruma_req::<query_batch::Request>(&mut req, &[]).await?;
    if r.server_keys.len() > MAX_QUERIED_SERVERS {
        return Err(Error::bad_json(format!(
            "At most {MAX_QUERIED_SERVERS} servers per key query"
        )));
    }
    let app = req.state().clone();
    let now = app.clock.now_ms() as i64;
    let mut out = Vec::new();
    for (server, criteria) in &r.server_keys {
        // The latest of the askers' minimums over the key IDs; "now" when none is given.
        let min = criteria
            .values()
            .filter_map(|c| c.minimum_valid_until_ts)
            .map(|t| u64::from(t.get()) as i64)
            .max()
            .unwrap_or(now);
        out.extend(notary_keys(&app, server, min).await?);
    }
    json(&json!({ "server_keys": out }))
}

/// # `GET /_matrix/key/v2/query/{serverName}`
pub async fn query_server_keys(mut req: Req) -> Result<Response> {
    let r = ruma_req::<query_one::Request>(&mut req, &["server_name"]).await?;
    let app = req.state().clone();
    let min = u64::from(r.minimum_valid_until_ts.get()) as i64;
    let out = notary_keys(&app, &r.server_name, min).await?;
    json(&json!({ "server_keys": out }))
}

/// The key documents we can vouch for about `server` (ours, or the latest the server signed
/// itself), each signed by us as notary. Empty when we know none.
async fn notary_keys(app: &App, server: &ServerName, min: i64) -> Result<Vec<CanonicalJsonObject>> {
    if server == app.server_name {
        return Ok(vec![own_keys(app)?]);
    }
    let ctx = crate::ops::federation::key_context(app);
    let Some(mut doc) = app.fed.keys.notary_answer(&ctx, server, min).await else {
        return Ok(Vec::new());
    };
    sign_json(app.server_name.as_str(), &app.local.key.pair, &mut doc).map_err(Error::internal)?;
    Ok(vec![doc])
}
