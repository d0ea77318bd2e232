//! Small helpers with no better home.

use rand::{distributions::Alphanumeric, Rng};
use sha2::{Digest, Sha256};

pub fn random_string(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// Hex SHA-256 of an access token: what the database stores instead of the token.
pub fn hash_token(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Wall-clock time in milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The spec's size limit for user IDs, room IDs, event IDs, room aliases, event types and
/// state keys, in bytes ("Size limits" in the room events section of the spec).
pub const MAX_ID_BYTES: usize = 255;

/// Checks one identifier-like string against [`MAX_ID_BYTES`]; `err` builds the error (the
/// caller decides between `M_INVALID_PARAM` for a path and `M_BAD_JSON` for a body).
pub fn check_id_len(
    what: &str,
    s: &str,
    err: fn(String) -> crate::error::Error,
) -> crate::error::Result<()> {
    if s.len() > MAX_ID_BYTES {
        return Err(err(format!("{what} is longer than {MAX_ID_BYTES} bytes")));
    }
    Ok(())
}
