//! Accounts: creating users (registration, `hearth user create`, embedders), passwords, and
//! what every new account starts with (the default push rules).

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use ruma::{OwnedUserId, UserId};
use serde_json::{json, Value};

use crate::{
    error::{Error, Result},
    notify::Topic,
    store::{queries as q, Tx},
    App,
};

/// At most this many argon2 computations at once. Each takes 19 MiB (argon2's default
/// memory cost): unbounded, a burst of logins would multiply the server's memory on a Pi.
const MAX_CONCURRENT_HASHES: usize = 2;

static HASH_SLOTS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static HASH_FREED: std::sync::Condvar = std::sync::Condvar::new();

/// Runs `f` in one of the argon2 slots. Called on the blocking pool (never on the executor),
/// so waiting here blocks only a pool thread; the slot is held by a guard inside that thread,
/// so a dropped request cannot leak it.
fn with_hash_slot<T>(f: impl FnOnce() -> T) -> T {
    struct Slot;
    impl Drop for Slot {
        fn drop(&mut self) {
            let mut n = HASH_SLOTS.lock().unwrap_or_else(|p| p.into_inner());
            *n -= 1;
            HASH_FREED.notify_one();
        }
    }
    {
        let mut n = HASH_SLOTS.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= MAX_CONCURRENT_HASHES {
            n = HASH_FREED.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
    }
    let _slot = Slot;
    f()
}

/// Hashes a password with argon2id on the blocking pool (~tens of ms of CPU).
pub async fn hash_password(password: String) -> Result<String> {
    smol::unblock(move || {
        with_hash_slot(|| {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(Error::internal)
        })
    })
    .await
}

/// Constant-time check (argon2's verify) on the blocking pool.
pub async fn verify_password(hash: String, password: String) -> bool {
    smol::unblock(move || {
        PasswordHash::new(&hash).is_ok_and(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
    })
    .await
}

/// Localparts allowed for new users (the spec's historical grammar, lower case).
fn valid_localpart(l: &str) -> bool {
    !l.is_empty()
        && l.bytes().all(
            |b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'),
        )
}

pub fn user_id_for(app: &App, localpart: &str) -> Result<OwnedUserId> {
    if !valid_localpart(localpart) {
        return Err(Error::invalid_username(
            "User ID may only contain a-z, 0-9, and ._=-/+",
        ));
    }
    let id = format!("@{localpart}:{}", app.server_name);
    if id.len() > 255 {
        return Err(Error::invalid_username("User ID is too long"));
    }
    OwnedUserId::try_from(id).map_err(|e| Error::invalid_username(e.to_string()))
}

/// Creates a user (no device). Used by `hearth user create` and embedders.
pub async fn create_user(
    app: &App,
    localpart: &str,
    password: Option<&str>,
    admin: bool,
) -> Result<OwnedUserId> {
    let user_id = user_id_for(app, &localpart.to_lowercase())?;
    let hash = match password {
        Some(p) => Some(hash_password(p.to_owned()).await?),
        None => None,
    };
    let (uid, local) = (user_id.clone(), localpart.to_lowercase());
    app.store
        .write(move |tx| {
            if q::get_user(tx, uid.as_str())?.is_some() {
                return Err(Error::user_in_use("User ID already taken"));
            }
            q::insert_user(tx, uid.as_str(), hash.as_deref(), admin, &local, tx.now_ms)?;
            init_push_rules(tx, &uid)
        })
        .await?;
    Ok(user_id)
}

/// Stores a user's (or, with `room`, a room's) account data at a new stream position that
/// wakes the user's long-polls.
pub fn put_account_data(
    tx: &mut Tx<'_>,
    user: &str,
    room: &str,
    kind: &str,
    content: &Value,
) -> Result<()> {
    let pos = tx.next_pos([Topic::user(user)]);
    q::upsert_account_data(tx, user, room, kind, &content.to_string(), pos)
}

/// Stores the default rule set (see `ops::push::default_rules`) for a new user.
pub fn init_push_rules(tx: &mut Tx<'_>, user: &UserId) -> Result<()> {
    let rules = super::push::default_rules(user);
    put_account_data(
        tx,
        user.as_str(),
        "",
        "m.push_rules",
        &json!({ "global": rules }),
    )
}
