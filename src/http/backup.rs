//! Server-side key backup: `/room_keys/version` (create, read the latest or one, update,
//! delete) and `/room_keys/keys` (all, one room, one session: GET, PUT, DELETE).
//!
//! The keys are encrypted by the client for a key the server never sees. What the server
//! decides: which of two copies of a session's key to keep (Synapse's rule: a verified key
//! wins, then the lower first message index, then the lower forwarded count), and the
//! version's `etag`, bumped whenever its keys change, which clients compare with `count` to
//! notice that another device backed up keys.

use ruma::api::{
    client::backup::{
        add_backup_keys, add_backup_keys_for_room, add_backup_keys_for_session,
        create_backup_version, delete_backup_keys, delete_backup_keys_for_room,
        delete_backup_keys_for_session, delete_backup_version, get_backup_info, get_backup_keys,
        get_backup_keys_for_room, get_backup_keys_for_session, get_latest_backup_info,
        update_backup_version,
    },
    IncomingRequest,
};
use serde_json::{json, Map, Value};
use tide::Response;

use super::{auth, json, ruma_req, ruma_req_with_body, Authed, Req};
use crate::{
    error::{Error, Result},
    store::{
        e2ee::{self as e, BackupKeyRow, BackupVersionRow},
        Connection,
    },
};

/// A version from a path or query: Synapse stores them as integers, and a version that is not
/// one does not exist.
fn parse_version(v: &str) -> Result<i64> {
    v.parse()
        .map_err(|_| Error::not_found(format!("Unknown backup version {v:?}")))
}

/// A live backup version, or `M_NOT_FOUND`.
fn live_version(c: &Connection, user: &str, version: i64) -> Result<BackupVersionRow> {
    e::get_backup_version(c, user, Some(version))?
        .ok_or_else(|| Error::not_found(format!("Unknown backup version {version}")))
}

fn version_json(c: &Connection, user: &str, v: &BackupVersionRow) -> Result<Value> {
    Ok(json!({
        "algorithm": v.algorithm,
        "auth_data": serde_json::from_str::<Value>(&v.auth_data)?,
        "count": e::count_backup_keys(c, user, v.version)?,
        "etag": v.etag.to_string(),
        "version": v.version.to_string(),
    }))
}

/// `algorithm` and `auth_data` of a version body (ruma has checked the shape).
fn algorithm_of(body: &Value) -> Result<(String, String)> {
    let algorithm = body["algorithm"]
        .as_str()
        .ok_or_else(|| Error::bad_json("algorithm must be a string"))?;
    if !body["auth_data"].is_object() {
        return Err(Error::bad_json("auth_data must be an object"));
    }
    Ok((algorithm.to_owned(), body["auth_data"].to_string()))
}

/// # `POST /_matrix/client/v3/room_keys/version`
pub async fn create_version(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let (_, body): (create_backup_version::v3::Request, Value) =
        ruma_req_with_body(&mut req, &[]).await?;
    let (algorithm, auth_data) = algorithm_of(&body)?;
    let user = who.user_id.to_string();
    let version = req
        .state()
        .store
        .write(move |tx| e::insert_backup_version(tx, &user, &algorithm, &auth_data))
        .await?;
    json(&json!({ "version": version.to_string() }))
}

/// # `GET /_matrix/client/v3/room_keys/version`
pub async fn get_latest_version(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let _: get_latest_backup_info::v3::Request = ruma_req(&mut req, &[]).await?;
    let user = who.user_id.to_string();
    let out = req
        .state()
        .store
        .read(move |c| match e::get_backup_version(c, &user, None)? {
            Some(v) => version_json(c, &user, &v),
            None => Err(Error::not_found("No current backup version")),
        })
        .await?;
    json(&out)
}

/// # `GET /_matrix/client/v3/room_keys/version/{version}`
pub async fn get_version(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: get_backup_info::v3::Request = ruma_req(&mut req, &["version"]).await?;
    let version = parse_version(&body.version)?;
    let user = who.user_id.to_string();
    let out = req
        .state()
        .store
        .read(move |c| version_json(c, &user, &live_version(c, &user, version)?))
        .await?;
    json(&out)
}

/// # `PUT /_matrix/client/v3/room_keys/version/{version}`
///
/// Replaces `auth_data`; the algorithm cannot change, and a `version` in the body must be the
/// one in the path (Synapse's checks).
pub async fn update_version(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let (parsed, body): (update_backup_version::v3::Request, Value) =
        ruma_req_with_body(&mut req, &["version"]).await?;
    let version = parse_version(&parsed.version)?;
    let (algorithm, auth_data) = algorithm_of(&body)?;
    if body
        .get("version")
        .is_some_and(|v| v.as_str() != Some(parsed.version.as_str()))
    {
        return Err(Error::invalid_param(
            "The version in the body does not match the one in the path",
        ));
    }
    let user = who.user_id.to_string();
    req.state()
        .store
        .write(move |tx| {
            let current = live_version(tx, &user, version)?;
            if current.algorithm != algorithm {
                return Err(Error::invalid_param("The algorithm does not match"));
            }
            e::update_backup_auth_data(tx, &user, version, &auth_data)
        })
        .await?;
    json(&json!({}))
}

/// # `DELETE /_matrix/client/v3/room_keys/version/{version}`
pub async fn delete_version(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: delete_backup_version::v3::Request = ruma_req(&mut req, &["version"]).await?;
    let version = parse_version(&body.version)?;
    let user = who.user_id.to_string();
    let found = req
        .state()
        .store
        .write(move |tx| e::delete_backup_version(tx, &user, version))
        .await?;
    if !found {
        return Err(Error::not_found(format!(
            "Unknown backup version {version}"
        )));
    }
    json(&json!({}))
}

/// Which keys of a version a request is about.
#[derive(Clone)]
struct Scope {
    room: Option<String>,
    session: Option<String>,
}

/// One uploaded key, checked: what Synapse requires of it (`session_data` is opaque to the
/// server and algorithm-dependent, so only its being an object is checked).
fn backup_key(room: &str, session: &str, v: &Value) -> Result<BackupKeyRow> {
    let bad = |field: &str| {
        Error::invalid_param(format!(
            "{field} is missing or invalid in the key for session {session} in room {room}"
        ))
    };
    let index = |field: &str| {
        v[field]
            .as_u64()
            .and_then(|n| i64::try_from(n).ok())
            .ok_or_else(|| bad(field))
    };
    if !v["session_data"].is_object() {
        return Err(bad("session_data"));
    }
    Ok(BackupKeyRow {
        room_id: room.to_owned(),
        session_id: session.to_owned(),
        first_message_index: index("first_message_index")?,
        forwarded_count: index("forwarded_count")?,
        is_verified: v["is_verified"]
            .as_bool()
            .ok_or_else(|| bad("is_verified"))?,
        session_data: v["session_data"].to_string(),
    })
}

/// Whether `new` should replace `old` (Synapse's `_should_replace_room_key`): a verified key
/// beats an unverified one; between equals, the one that decrypts from an earlier message, then
/// the one forwarded fewer times.
fn better(new: &BackupKeyRow, old: &BackupKeyRow) -> bool {
    (
        !new.is_verified,
        new.first_message_index,
        new.forwarded_count,
    ) < (
        !old.is_verified,
        old.first_message_index,
        old.forwarded_count,
    )
}

/// The version keys are uploaded to must be the latest: otherwise `M_WRONG_ROOM_KEYS_VERSION`
/// (403) with the current version, so the client can notice a newer backup.
fn current_version(c: &Connection, user: &str, version: i64) -> Result<BackupVersionRow> {
    match e::get_backup_version(c, user, None)? {
        Some(v) if v.version == version => Ok(v),
        Some(v) if e::get_backup_version(c, user, Some(version))?.is_some() => Err(Error {
            body: Some(json!({
                "errcode": "M_WRONG_ROOM_KEYS_VERSION",
                "error": "Wrong backup version",
                "current_version": v.version.to_string(),
            })),
            ..Error::new(403, "M_WRONG_ROOM_KEYS_VERSION", "Wrong backup version")
        }),
        _ => Err(Error::not_found(format!(
            "Unknown backup version {version}"
        ))),
    }
}

/// Stores the better of each uploaded key and the stored one; bumps the etag if anything
/// changed. Returns the `{etag, count}` answer.
async fn put_keys(
    req: &Req,
    who: Authed,
    version: &str,
    keys: Vec<BackupKeyRow>,
) -> Result<Response> {
    let version = parse_version(version)?;
    let user = who.user_id.to_string();
    let out = req
        .state()
        .store
        .write(move |tx| {
            let v = current_version(tx, &user, version)?;
            let mut changed = false;
            for k in &keys {
                let old = e::list_backup_keys(tx, &user, version, Some(&k.room_id), Some(&k.session_id))?;
                if old.first().is_none_or(|old| better(k, old)) {
                    e::upsert_backup_key(tx, &user, version, k)?;
                    changed = true;
                }
            }
            let etag = if changed { v.etag + 1 } else { v.etag };
            if changed {
                e::set_backup_etag(tx, &user, version, etag)?;
            }
            Ok(json!({ "etag": etag.to_string(), "count": e::count_backup_keys(tx, &user, version)? }))
        })
        .await?;
    json(&out)
}

/// The keys of a `sessions` object.
fn sessions_of(room: &str, sessions: &Value) -> Result<Vec<BackupKeyRow>> {
    sessions
        .as_object()
        .ok_or_else(|| Error::bad_json("sessions must be an object"))?
        .iter()
        .map(|(s, v)| backup_key(room, s, v))
        .collect()
}

/// # `PUT /_matrix/client/v3/room_keys/keys`
pub async fn put_all(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let (parsed, body): (add_backup_keys::v3::Request, Value) =
        ruma_req_with_body(&mut req, &[]).await?;
    let mut keys = Vec::new();
    for (room, r) in body["rooms"].as_object().into_iter().flatten() {
        keys.extend(sessions_of(room, &r["sessions"])?);
    }
    put_keys(&req, who, &parsed.version, keys).await
}

/// # `PUT /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn put_room(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let (parsed, body): (add_backup_keys_for_room::v3::Request, Value) =
        ruma_req_with_body(&mut req, &["room_id"]).await?;
    let keys = sessions_of(parsed.room_id.as_str(), &body["sessions"])?;
    put_keys(&req, who, &parsed.version, keys).await
}

/// # `PUT /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn put_session(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let (parsed, body): (add_backup_keys_for_session::v3::Request, Value) =
        ruma_req_with_body(&mut req, &["room_id", "session_id"]).await?;
    let key = backup_key(parsed.room_id.as_str(), &parsed.session_id, &body)?;
    put_keys(&req, who, &parsed.version, vec![key]).await
}

fn key_json(k: &BackupKeyRow) -> Result<Value> {
    Ok(json!({
        "first_message_index": k.first_message_index,
        "forwarded_count": k.forwarded_count,
        "is_verified": k.is_verified,
        "session_data": serde_json::from_str::<Value>(&k.session_data)?,
    }))
}

/// Reads the keys of a version in `scope`, shaped as the endpoint answers.
async fn get_keys(req: &Req, who: Authed, version: &str, scope: Scope) -> Result<Response> {
    let version = parse_version(version)?;
    let user = who.user_id.to_string();
    let out = req
        .state()
        .store
        .read(move |c| {
            live_version(c, &user, version)?;
            let rows = e::list_backup_keys(
                c,
                &user,
                version,
                scope.room.as_deref(),
                scope.session.as_deref(),
            )?;
            if scope.session.is_some() {
                return match rows.first() {
                    Some(k) => key_json(k),
                    None => Err(Error::not_found("No room_keys found")),
                };
            }
            let mut rooms = Map::new();
            for k in &rows {
                let room = rooms
                    .entry(k.room_id.clone())
                    .or_insert_with(|| json!({ "sessions": {} }));
                room["sessions"][&k.session_id] = key_json(k)?;
            }
            Ok(match scope.room {
                Some(r) => rooms
                    .remove(&r)
                    .unwrap_or_else(|| json!({ "sessions": {} })),
                None => json!({ "rooms": rooms }),
            })
        })
        .await?;
    json(&out)
}

/// Deletes the keys of a version in `scope`; the etag moves, as Synapse does.
async fn delete_keys(req: &Req, who: Authed, version: &str, scope: Scope) -> Result<Response> {
    let version = parse_version(version)?;
    let user = who.user_id.to_string();
    let out = req
        .state()
        .store
        .write(move |tx| {
            let v = live_version(tx, &user, version)?;
            e::delete_backup_keys(tx, &user, version, scope.room.as_deref(), scope.session.as_deref())?;
            e::set_backup_etag(tx, &user, version, v.etag + 1)?;
            Ok(json!({ "etag": (v.etag + 1).to_string(), "count": e::count_backup_keys(tx, &user, version)? }))
        })
        .await?;
    json(&out)
}

/// The version and scope of a request that reads or deletes backed-up keys.
trait Scoped: IncomingRequest {
    fn scope(self) -> (String, Scope);
}

macro_rules! scoped {
    ($($t:ty => |$r:ident| ($room:expr, $session:expr);)*) => {$(
        impl Scoped for $t {
            fn scope(self) -> (String, Scope) {
                let $r = self;
                let scope = Scope { room: $room, session: $session };
                ($r.version, scope)
            }
        }
    )*};
}

scoped! {
    get_backup_keys::v3::Request => |r| (None, None);
    get_backup_keys_for_room::v3::Request => |r| (Some(r.room_id.to_string()), None);
    get_backup_keys_for_session::v3::Request =>
        |r| (Some(r.room_id.to_string()), Some(r.session_id.clone()));
    delete_backup_keys::v3::Request => |r| (None, None);
    delete_backup_keys_for_room::v3::Request => |r| (Some(r.room_id.to_string()), None);
    delete_backup_keys_for_session::v3::Request =>
        |r| (Some(r.room_id.to_string()), Some(r.session_id.clone()));
}

/// A read (`delete: false`) or deletion of the keys a request of type `R` names.
async fn scoped<R: Scoped>(mut req: Req, params: &[&str], delete: bool) -> Result<Response> {
    let who = auth(&req).await?;
    let (version, scope) = ruma_req::<R>(&mut req, params).await?.scope();
    if delete {
        delete_keys(&req, who, &version, scope).await
    } else {
        get_keys(&req, who, &version, scope).await
    }
}

/// # `GET /_matrix/client/v3/room_keys/keys`
pub async fn get_all(req: Req) -> Result<Response> {
    scoped::<get_backup_keys::v3::Request>(req, &[], false).await
}

/// # `GET /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn get_room(req: Req) -> Result<Response> {
    scoped::<get_backup_keys_for_room::v3::Request>(req, &["room_id"], false).await
}

/// # `GET /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn get_session(req: Req) -> Result<Response> {
    scoped::<get_backup_keys_for_session::v3::Request>(req, &["room_id", "session_id"], false).await
}

/// # `DELETE /_matrix/client/v3/room_keys/keys`
pub async fn delete_all(req: Req) -> Result<Response> {
    scoped::<delete_backup_keys::v3::Request>(req, &[], true).await
}

/// # `DELETE /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn delete_room(req: Req) -> Result<Response> {
    scoped::<delete_backup_keys_for_room::v3::Request>(req, &["room_id"], true).await
}

/// # `DELETE /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn delete_session(req: Req) -> Result<Response> {
    scoped::<delete_backup_keys_for_session::v3::Request>(req, &["room_id", "session_id"], true)
        .await
}
