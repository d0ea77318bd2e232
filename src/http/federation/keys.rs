//! Our signing keys and server version, for other servers.

use ruma::{serde::Base64, signatures::sign_json, CanonicalJsonObject};
use serde_json::json;
use tide::Response;

use crate::{
    error::{Error, Result},
    http::{json, Req},
};

/// How long other servers may cache our key without asking again.
const KEY_VALIDITY_MS: u64 = 7 * 24 * 3600 * 1000;

/// # `GET /_matrix/key/v2/server`
pub async fn server_keys(req: Req) -> Result<Response> {
    let app = req.state();
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
    json(&obj)
}

/// # `GET /_matrix/federation/v1/version`
pub async fn version(_req: Req) -> Result<Response> {
    json(&json!({ "server": { "name": "Hearth", "version": env!("CARGO_PKG_VERSION") } }))
}
