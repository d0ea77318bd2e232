//! `GET /_matrix/client/v3/voip/turnServer`: the TURN servers for VoIP calls, from `[turn]`.
//!
//! With a shared secret, credentials follow the coturn REST scheme exactly as Synapse makes
//! them: username `"<expiry unix seconds>:<user ID>"`, password the standard (padded) base64 of
//! HMAC-SHA1(secret, username); the TURN server recomputes the HMAC with the same secret and
//! refuses the username once its expiry has passed. SHA-1 is what coturn's scheme is defined
//! with (ring names it "for legacy use only"; here HMAC-SHA1 is the protocol, not a choice).

use base64::Engine;
use ring::hmac;
use ruma::api::client::voip::get_turn_server_info;
use serde_json::json;
use tide::Response;

use super::{auth, json, ruma_req, Req};
use crate::{config::TurnConfig, error::Result};

/// The time-limited credentials for `user_id` at `now_ms`: `(username, password)`.
pub fn shared_secret_credentials(
    secret: &str,
    user_id: &str,
    now_ms: u64,
    lifetime_ms: u64,
) -> (String, String) {
    let expiry = now_ms.saturating_add(lifetime_ms) / 1000;
    let username = format!("{expiry}:{user_id}");
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    let tag = hmac::sign(&key, username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
    (username, password)
}

/// The answer for `user_id`; `{}` when no TURN server is configured (the spec allows it).
pub fn turn_answer(t: &TurnConfig, user_id: &str, now_ms: u64) -> serde_json::Value {
    if t.turn_uris.is_empty() {
        return json!({});
    }
    let lifetime = t.lifetime();
    let (username, password) = match (&t.turn_shared_secret, &t.turn_username, &t.turn_password) {
        (Some(secret), _, _) => {
            shared_secret_credentials(secret, user_id, now_ms, lifetime.as_millis() as u64)
        }
        (None, Some(u), Some(p)) => (u.clone(), p.clone()),
        // Refused by `Config::validate`; answered as "no TURN server" all the same.
        _ => return json!({}),
    };
    json!({
        "username": username,
        "password": password,
        "uris": t.turn_uris,
        "ttl": lifetime.as_secs(),
    })
}

/// # `GET /_matrix/client/v3/voip/turnServer`
pub async fn turn_server(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let _: get_turn_server_info::v3::Request = ruma_req(&mut req, &[]).await?;
    let app = req.state().clone();
    json(&turn_answer(
        &app.config.turn,
        who.user_id.as_str(),
        app.clock.now_ms(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha1_matches_rfc_2202() {
        // RFC 2202 test case 2: key "Jefe", data "what do ya want for nothing?".
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, b"Jefe");
        let tag = hmac::sign(&key, b"what do ya want for nothing?");
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79");
    }

    #[test]
    fn shared_secret_username_and_password() {
        let (u, p) = shared_secret_credentials("s3cret", "@a:x", 1_700_000_000_500, 3_600_000);
        assert_eq!(u, "1700003600:@a:x");
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, b"s3cret");
        let expected = base64::engine::general_purpose::STANDARD
            .encode(hmac::sign(&key, u.as_bytes()).as_ref());
        assert_eq!(p, expected);
        assert_eq!(p.len(), 28, "20 bytes, padded base64");
    }
}
