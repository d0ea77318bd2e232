//! End-to-end encryption keys: `/keys/upload`, `/keys/query`, `/keys/claim`, `/keys/changes`,
//! cross-signing (`/keys/device_signing/upload`, `/keys/signatures/upload`), and the
//! device-list stream that `/sync` reads (`device_lists`, one-time key counts).
//!
//! The server never holds a private key: it stores what devices publish, checks every
//! signature it can (with ruma's ed25519 verification), hands each one-time key out once and
//! tells the users who share a room with someone when that someone's devices or keys change.
//!
//! Federation seam: users of other servers are answered in `failures` for now (`remote_*`);
//! the federation half will fetch their keys with `/user/keys/query` and `/user/keys/claim`,
//! and [`device_list_changed`] is where `m.device_list_update` EDUs will be queued.

use std::collections::{BTreeMap, BTreeSet};

use ruma::{
    api::client::keys::{
        claim_keys, get_key_changes, get_keys, upload_keys, upload_signatures, upload_signing_keys,
    },
    encryption::{CrossSigningKey, DeviceKeys, OneTimeKey},
    serde::{base64::Standard, Base64, Raw},
    signatures::{to_canonical_json_string_for_signing, verify_canonical_json_bytes},
    CanonicalJsonObject, CanonicalJsonValue, SigningKeyAlgorithm, UserId,
};
use serde_json::{json, Map, Value};
use tide::Response;

use super::{auth, json, ruma_req, ruma_req_compat, ruma_req_with_body, Req};
use crate::{
    error::{Error, Result},
    ops::e2ee::{claim_local, device_list_changed, query_local_user, Change},
    store::{e2ee as e, queries as q, Connection, Tx},
};

/// Parses signed JSON from a client into canonical JSON (what signatures are computed over):
/// floats and out-of-range integers are refused here, as they cannot have been signed.
pub fn canonical(raw: &str, what: &str) -> Result<CanonicalJsonObject> {
    serde_json::from_str(raw).map_err(|err| Error::bad_json(format!("{what}: {err}")))
}

/// Checks `signer`'s signature with key `key_id` (`ed25519:…`, whose public key is `public_key`,
/// unpadded base64) on `object`; the reason it fails otherwise.
pub fn check_signature(
    object: &CanonicalJsonObject,
    signer: &str,
    key_id: &str,
    public_key: &str,
) -> Result<(), String> {
    let sig = match object.get("signatures") {
        Some(CanonicalJsonValue::Object(s)) => match s.get(signer) {
            Some(CanonicalJsonValue::Object(s)) => match s.get(key_id) {
                Some(CanonicalJsonValue::String(s)) => s,
                _ => return Err(format!("no signature by {signer} with {key_id}")),
            },
            _ => return Err(format!("no signature by {signer}")),
        },
        _ => return Err("no signatures".into()),
    };
    let sig = Base64::<Standard>::parse(sig).map_err(|e| format!("signature: {e}"))?;
    let key = Base64::<Standard>::parse(public_key).map_err(|e| format!("public key: {e}"))?;
    let signed = to_canonical_json_string_for_signing(object).map_err(|e| e.to_string())?;
    verify_canonical_json_bytes(
        &SigningKeyAlgorithm::Ed25519,
        key.as_bytes(),
        sig.as_bytes(),
        signed.as_bytes(),
    )
    .map_err(|e| format!("signature by {signer} with {key_id} does not verify: {e}"))
}

/// Two signed objects carry the same signed content (signatures and `unsigned` aside).
fn same_signed_content(a: &CanonicalJsonObject, b: &CanonicalJsonObject) -> bool {
    match (
        to_canonical_json_string_for_signing(a),
        to_canonical_json_string_for_signing(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn to_string(o: &CanonicalJsonObject) -> Result<String> {
    Ok(serde_json::to_string(o)?)
}

/// `device_lists` for `user` between two stream positions: who to re-query (a key or device
/// change of someone sharing a room, someone newly sharing one) and who to forget (no longer
/// sharing any room). `rooms` is the user's (room, membership, position) list.
pub fn device_lists(
    c: &Connection,
    user: &str,
    rooms: &[(String, String, i64)],
    since: i64,
    upto: i64,
) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let mut changed: BTreeSet<String> = e::list_key_changes_sharing(c, user, since, upto)?
        .into_iter()
        .collect();
    let mut gone = BTreeSet::new();
    for (room, membership, mpos) in rooms {
        if *mpos > upto {
            continue;
        }
        let joined_members = || -> Result<Vec<String>> {
            Ok(q::list_members(c, room)?
                .into_iter()
                .filter(|(_, m, _)| m == "join")
                .map(|(u, _, _)| u)
                .collect())
        };
        match membership.as_str() {
            // The user joined in this range: everyone in the room is new to them.
            "join" if *mpos > since => changed.extend(joined_members()?),
            "join" => {
                for (other, m) in e::list_member_changes_between(c, room, since, upto)? {
                    if m == "join" {
                        changed.insert(other);
                    } else {
                        gone.insert(other);
                    }
                }
            }
            // The user left (or was kicked or banned) in this range; an invite or a knock
            // shares nothing yet.
            "leave" | "ban" if *mpos > since => gone.extend(joined_members()?),
            _ => {}
        }
    }
    let mut left = BTreeSet::new();
    for other in gone {
        if other != user && !e::shares_room(c, user, &other)? {
            changed.remove(&other);
            left.insert(other);
        }
    }
    Ok((changed, left))
}

/// The one-time key counts and unused fallback key types of a device, as `/sync` and
/// `/keys/upload` report them. `signed_curve25519` is always present (0 when none), as
/// Synapse sends it: clients read its absence as "unknown" and do not top up.
pub fn key_counts(
    c: &Connection,
    user: &str,
    device: &str,
) -> Result<(Map<String, Value>, Vec<String>)> {
    let mut counts = Map::new();
    counts.insert("signed_curve25519".into(), 0.into());
    for (alg, n) in e::count_one_time_keys(c, user, device)? {
        counts.insert(alg, n.into());
    }
    Ok((counts, e::list_unused_fallback_algorithms(c, user, device)?))
}

/// A checked one-time or fallback key: (algorithm, key ID, canonical JSON of the key).
struct NewKey {
    algorithm: String,
    key_id: String,
    json: String,
}

/// Checks the keys of a `one_time_keys` or `fallback_keys` map: each is a string or a signed
/// object whose signature by the device verifies (when the device's ed25519 key is known).
fn check_keys(
    keys: &BTreeMap<ruma::OwnedOneTimeKeyId, Raw<OneTimeKey>>,
    who: &super::Authed,
    device_ed25519: Option<&str>,
) -> Result<Vec<NewKey>> {
    let mut out = Vec::with_capacity(keys.len());
    for (id, raw) in keys {
        let parsed: OneTimeKey = raw
            .deserialize()
            .map_err(|err| Error::bad_json(format!("key {id}: {err}")))?;
        let value: CanonicalJsonValue = serde_json::from_str(raw.json().get())
            .map_err(|err| Error::bad_json(format!("key {id}: {err}")))?;
        if let (OneTimeKey::SignedKey(_), CanonicalJsonValue::Object(o), Some(ed)) =
            (&parsed, &value, device_ed25519)
        {
            let key_id = format!("ed25519:{}", who.device_id);
            check_signature(o, who.user_id.as_str(), &key_id, ed)
                .map_err(|err| Error::invalid_param(format!("key {id}: {err}")))?;
        }
        out.push(NewKey {
            algorithm: id.algorithm().to_string(),
            key_id: id.key_name().to_string(),
            json: serde_json::to_string(&value)?,
        });
    }
    Ok(out)
}

/// Checked device keys (canonical JSON without `unsigned`), one-time keys and fallback keys.
type CheckedUpload = (Option<CanonicalJsonObject>, Vec<NewKey>, Vec<NewKey>);

/// Checks everything a `/keys/upload` carries: device keys that are the caller's device's and
/// signed by it, one-time and fallback keys signed by it (with the key uploaded now, else the
/// `stored` one).
fn check_upload(
    body: &upload_keys::v3::Request,
    who: &super::Authed,
    stored: Option<String>,
) -> Result<CheckedUpload> {
    let mut ed = stored;
    let device_keys = match &body.device_keys {
        Some(raw) => {
            let keys: DeviceKeys = raw
                .deserialize()
                .map_err(|err| Error::bad_json(format!("device_keys: {err}")))?;
            if keys.user_id != who.user_id || keys.device_id != who.device_id {
                return Err(Error::invalid_param(
                    "device_keys: user_id and device_id must be the caller's",
                ));
            }
            let key_id = format!("ed25519:{}", who.device_id);
            let key = keys
                .keys
                .iter()
                .find(|(id, _)| id.as_str() == key_id)
                .map(|(_, k)| k.clone())
                .ok_or_else(|| Error::invalid_param(format!("device_keys: no {key_id} key")))?;
            let mut object = canonical(raw.json().get(), "device_keys")?;
            check_signature(&object, who.user_id.as_str(), &key_id, &key)
                .map_err(|err| Error::invalid_param(format!("device_keys: {err}")))?;
            // `unsigned` is the server's to fill (the display name), not the device's.
            object.remove("unsigned");
            ed = Some(key);
            Some(object)
        }
        None => None,
    };
    let otks = check_keys(&body.one_time_keys, who, ed.as_deref())?;
    let fallbacks = check_keys(&body.fallback_keys, who, ed.as_deref())?;
    Ok((device_keys, otks, fallbacks))
}

/// # `POST /_matrix/client/v3/keys/upload`
pub async fn upload(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: upload_keys::v3::Request = ruma_req(&mut req, &[]).await?;
    let app = req.state().clone();
    let (u, d) = (who.user_id.to_string(), who.device_id.to_string());
    // The device's stored ed25519 key, to check signed one-time keys uploaded without device
    // keys.
    let stored = match body.device_keys {
        Some(_) => None,
        None => {
            let (u, d) = (u.clone(), d.clone());
            app.store.read(move |c| stored_ed25519(c, &u, &d)).await?
        }
    };
    // Up to a hundred ed25519 verifications: on the blocking pool, not the executor thread.
    let (device_keys, otks, fallbacks) =
        smol::unblock(move || check_upload(&body, &who, stored)).await?;
    let counts = app
        .store
        .write(move |tx| {
            if let Some(object) = device_keys {
                let stored = e::get_device_keys(tx, &u, &d)?;
                let same = match &stored {
                    Some(s) => canonical(s, "stored device keys").is_ok_and(|old| old == object),
                    None => false,
                };
                if !same {
                    e::upsert_device_keys(tx, &u, &d, &to_string(&object)?)?;
                    device_list_changed(tx, &u, Change::Device(&d))?;
                }
            }
            for k in &otks {
                match e::get_one_time_key(tx, &u, &d, &k.algorithm, &k.key_id)? {
                    Some(old) if old == k.json => {}
                    Some(_) => {
                        return Err(Error::invalid_param(format!(
                            "One time key {}:{} already exists with other content",
                            k.algorithm, k.key_id
                        )))
                    }
                    None => e::insert_one_time_key(tx, &u, &d, &k.algorithm, &k.key_id, &k.json)?,
                }
            }
            for k in &fallbacks {
                e::upsert_fallback_key(tx, &u, &d, &k.algorithm, &k.key_id, &k.json)?;
            }
            Ok(key_counts(tx, &u, &d)?.0)
        })
        .await?;
    json(&json!({ "one_time_key_counts": counts }))
}

/// The stored ed25519 key of a device, if it uploaded device keys.
fn stored_ed25519(c: &Connection, user: &str, device: &str) -> Result<Option<String>> {
    let Some(keys) = e::get_device_keys(c, user, device)? else {
        return Ok(None);
    };
    let v: Value = serde_json::from_str(&keys)?;
    Ok(v["keys"][format!("ed25519:{device}")]
        .as_str()
        .map(str::to_owned))
}

/// # `POST /_matrix/client/v3/keys/query`
pub async fn query(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: get_keys::v3::Request = ruma_req(&mut req, &[]).await?;
    let app = req.state().clone();
    let ours = app.server_name.clone();
    let viewer = who.user_id.to_string();
    let remote = by_remote_server(&body.device_keys, &ours);
    let mut out = app
        .store
        .read(move |c| {
            let mut out = json!({
                "device_keys": {}, "master_keys": {}, "self_signing_keys": {},
                "user_signing_keys": {}, "failures": {},
            });
            for (user, devices) in &body.device_keys {
                if user.server_name() != ours {
                    continue;
                }
                let devices: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
                query_local_user(c, user.as_str(), &devices, &viewer, &mut out)?;
            }
            Ok(out)
        })
        .await?;
    // Users of other servers: asked of their servers (`/user/keys/query`), one after the other;
    // a server that fails is named in `failures` and the rest of the answer stands.
    for (server, users) in remote {
        let req = ruma::api::federation::keys::get_keys::v1::Request::new(users);
        match app.fed.client.send(&server, req).await {
            Ok(res) => {
                for (field, map) in [
                    ("device_keys", serde_json::to_value(&res.device_keys)?),
                    ("master_keys", serde_json::to_value(&res.master_keys)?),
                    (
                        "self_signing_keys",
                        serde_json::to_value(&res.self_signing_keys)?,
                    ),
                ] {
                    if let Value::Object(m) = map {
                        for (user, v) in m {
                            // Only what the server may speak for: its own users.
                            if UserId::parse(user.as_str()).is_ok_and(|u| u.server_name() == server)
                            {
                                out[field][user] = v;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                out["failures"][server.as_str()] =
                    json!({ "status": e.status, "message": e.message });
            }
        }
    }
    json(&out)
}

/// The requested users of other servers, grouped by server.
fn by_remote_server<V: Clone>(
    wanted: &BTreeMap<ruma::OwnedUserId, V>,
    ours: &ruma::ServerName,
) -> BTreeMap<ruma::OwnedServerName, BTreeMap<ruma::OwnedUserId, V>> {
    let mut out: BTreeMap<ruma::OwnedServerName, BTreeMap<ruma::OwnedUserId, V>> = BTreeMap::new();
    for (user, v) in wanted {
        if user.server_name() != ours {
            out.entry(user.server_name().to_owned())
                .or_default()
                .insert(user.clone(), v.clone());
        }
    }
    out
}

/// # `POST /_matrix/client/v3/keys/claim`
///
/// Each requested device gets one of its one-time keys (deleted as it is handed out, in the
/// same write, so two claims never get the same key) or, when none is left, its fallback key
/// (marked used). Unknown users and devices are left out of the answer rather than failing the
/// whole claim, as Synapse does: a client claims for many devices at once, some of which may
/// have just been deleted.
pub async fn claim(mut req: Req) -> Result<Response> {
    auth(&req).await?;
    let body: claim_keys::v3::Request = ruma_req(&mut req, &[]).await?;
    let app = req.state().clone();
    let ours = app.server_name.clone();
    let remote = by_remote_server(&body.one_time_keys, &ours);
    let local: BTreeMap<_, _> = body
        .one_time_keys
        .into_iter()
        .filter(|(u, _)| u.server_name() == ours)
        .collect();
    let keys = app.store.write(move |tx| claim_local(tx, &local)).await?;
    let mut out = json!({ "one_time_keys": keys, "failures": {} });
    // Users of other servers: claimed from their servers (`/user/keys/claim`).
    for (server, wanted) in remote {
        let req = ruma::api::federation::keys::claim_keys::v1::Request::new(wanted);
        match app.fed.client.send(&server, req).await {
            Ok(res) => {
                if let Value::Object(m) = serde_json::to_value(&res.one_time_keys)? {
                    for (user, v) in m {
                        if UserId::parse(user.as_str()).is_ok_and(|u| u.server_name() == server) {
                            out["one_time_keys"][user] = v;
                        }
                    }
                }
            }
            Err(e) => {
                out["failures"][server.as_str()] =
                    json!({ "status": e.status, "message": e.message });
            }
        }
    }
    json(&out)
}

/// # `GET /_matrix/client/v3/keys/changes`
pub async fn changes(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: get_key_changes::v3::Request = ruma_req(&mut req, &[]).await?;
    let from = super::sync::parse_since(&body.from)?.pos;
    let to = super::sync::parse_since(&body.to)?.pos;
    let user = who.user_id.to_string();
    let (changed, left) = req
        .state()
        .store
        .read(move |c| {
            let rooms = q::list_user_rooms(c, &user)?;
            device_lists(c, &user, &rooms, from, to)
        })
        .await?;
    json(&json!({ "changed": changed, "left": left }))
}

// ---------------------------------------------------------------- cross-signing

/// A checked cross-signing key: its public key and canonical JSON.
struct NewCrossKey {
    public: String,
    object: CanonicalJsonObject,
}

/// Checks one uploaded cross-signing key: the caller's, with the right usage and exactly one
/// ed25519 key whose ID names it.
fn check_cross_key(raw: &Raw<CrossSigningKey>, user: &UserId, usage: &str) -> Result<NewCrossKey> {
    let what = format!("{usage} key");
    let key: CrossSigningKey = raw
        .deserialize()
        .map_err(|err| Error::bad_json(format!("{what}: {err}")))?;
    if key.user_id != user {
        return Err(Error::invalid_param(format!(
            "{what}: user_id must be the caller's"
        )));
    }
    if !key.usage.iter().any(|u| u.as_str() == usage) {
        return Err(Error::invalid_param(format!(
            "{what}: usage must include {usage}"
        )));
    }
    let mut keys = key.keys.iter();
    let (Some((id, public)), None) = (keys.next(), keys.next()) else {
        return Err(Error::invalid_param(format!(
            "{what}: exactly one key is required"
        )));
    };
    if id.as_str() != format!("ed25519:{public}") {
        return Err(Error::invalid_param(format!(
            "{what}: the key ID must be ed25519:<the public key>"
        )));
    }
    Base64::<Standard>::parse(public)
        .map_err(|err| Error::invalid_param(format!("{what}: public key: {err}")))?;
    Ok(NewCrossKey {
        public: public.clone(),
        object: canonical(raw.json().get(), &what)?,
    })
}

/// # `POST /_matrix/client/v3/keys/device_signing/upload`
///
/// The first upload for a user without a master key needs no user-interactive auth, and nor
/// does uploading again exactly what is stored (a client retrying); replacing keys needs the
/// password, as Synapse does.
pub async fn upload_signing_keys(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let (body, _): (upload_signing_keys::v3::Request, Value) =
        ruma_req_compat(&mut req, &[], super::account::legacy_auth_user).await?;
    let app = req.state().clone();
    let user = who.user_id.clone();
    let mut new = Vec::new();
    for (raw, usage) in [
        (&body.master_key, "master"),
        (&body.self_signing_key, "self_signing"),
        (&body.user_signing_key, "user_signing"),
    ] {
        if let Some(raw) = raw {
            new.push((usage, check_cross_key(raw, &user, usage)?));
        }
    }
    let u = user.to_string();
    let stored = app
        .store
        .read(move |c| {
            ["master", "self_signing", "user_signing"]
                .into_iter()
                .map(|t| Ok((t, e::get_cross_signing_key(c, &u, t)?)))
                .collect::<Result<BTreeMap<_, _>>>()
        })
        .await?;
    let has_master = stored["master"].is_some();
    let unchanged = new.iter().all(|(t, k)| {
        stored[t]
            .as_ref()
            .is_some_and(|(_, s)| canonical(s, "stored key").is_ok_and(|s| s == k.object))
    });
    if unchanged && has_master {
        return json(&json!({}));
    }
    if has_master {
        super::account::require_password_uia(&app, &who, body.auth).await?;
    }
    // The master key that signs the others: the new one, or the stored one.
    let master = match new.iter().find(|(t, _)| *t == "master") {
        Some((_, k)) => k.public.clone(),
        None => match &stored["master"] {
            Some((public, _)) => public.clone(),
            None => return Err(Error::missing_param("A master key is required")),
        },
    };
    for (t, k) in &new {
        if *t != "master" {
            check_signature(
                &k.object,
                user.as_str(),
                &format!("ed25519:{master}"),
                &master,
            )
            .map_err(|err| Error::invalid_param(format!("{t} key: {err}")))?;
        }
    }
    let u = user.to_string();
    app.store
        .write(move |tx| {
            for (t, k) in &new {
                if let Some((old, _)) = e::get_cross_signing_key(tx, &u, t)? {
                    if old != k.public {
                        // What the replaced key signed no longer means anything.
                        e::delete_signatures_by(tx, &u, &format!("ed25519:{old}"))?;
                    }
                }
                e::upsert_cross_signing_key(tx, &u, t, &k.public, &to_string(&k.object)?)?;
            }
            device_list_changed(tx, &u, Change::CrossSigning)
        })
        .await?;
    json(&json!({}))
}

/// One accepted signature: (target user, target key, signer key ID, signature).
type NewSignature = (String, String, String, String);

/// Checks one signed object of `/keys/signatures/upload` against what is stored; returns the
/// signatures to store, or the failure to report for this key.
fn check_signed_key(
    c: &Connection,
    me: &str,
    target_user: &str,
    key_id: &str,
    raw: &str,
) -> Result<Result<Vec<NewSignature>, (&'static str, String)>> {
    let object: CanonicalJsonObject = match serde_json::from_str(raw) {
        Ok(o) => o,
        Err(err) => return Ok(Err(("M_BAD_JSON", err.to_string()))),
    };
    let bad_sig = |m: String| Ok(Err(("M_INVALID_SIGNATURE", m)));
    let signer_key = |key_type: &str| e::get_cross_signing_key(c, me, key_type);
    // (the stored object it must match, signer key ID, signer public key)
    let (stored, signers): (String, Vec<(String, String)>) = if target_user == me {
        let master = e::get_cross_signing_key(c, me, "master")?;
        match master {
            // The user's master key, signed by one of their devices.
            Some((public, keys)) if public == key_id => {
                let mut signers = Vec::new();
                if let Some(CanonicalJsonValue::Object(sigs)) = object.get("signatures") {
                    if let Some(CanonicalJsonValue::Object(mine)) = sigs.get(me) {
                        for id in mine.keys() {
                            let Some(device) = id.strip_prefix("ed25519:") else {
                                continue;
                            };
                            if device == public {
                                continue;
                            }
                            if let Some(ed) = stored_ed25519(c, me, device)? {
                                signers.push((id.clone(), ed));
                            }
                        }
                    }
                }
                if signers.is_empty() {
                    return bad_sig("no signature by a known device of the user".into());
                }
                (keys, signers)
            }
            // One of the user's devices, signed by their self-signing key.
            _ => {
                let Some(keys) = e::get_device_keys(c, me, key_id)? else {
                    return Ok(Err(("M_NOT_FOUND", format!("unknown key {key_id}"))));
                };
                let Some((ssk, _)) = signer_key("self_signing")? else {
                    return bad_sig("no self-signing key uploaded".into());
                };
                (keys, vec![(format!("ed25519:{ssk}"), ssk)])
            }
        }
    } else {
        // Another user's master key, signed by the caller's user-signing key.
        match e::get_cross_signing_key(c, target_user, "master")? {
            Some((public, keys)) if public == key_id => {
                let Some((usk, _)) = signer_key("user_signing")? else {
                    return bad_sig("no user-signing key uploaded".into());
                };
                (keys, vec![(format!("ed25519:{usk}"), usk)])
            }
            _ => return Ok(Err(("M_NOT_FOUND", format!("unknown key {key_id}")))),
        }
    };
    let stored = canonical(&stored, "stored key")?;
    if !same_signed_content(&stored, &object) {
        return Ok(Err((
            "M_INVALID_PARAM",
            "the signed object does not match the stored key".into(),
        )));
    }
    let mut out = Vec::new();
    for (signer_key_id, public) in signers {
        if let Err(m) = check_signature(&object, me, &signer_key_id, &public) {
            return bad_sig(m);
        }
        let Some(CanonicalJsonValue::Object(sigs)) = object.get("signatures") else {
            continue;
        };
        if let Some(CanonicalJsonValue::Object(mine)) = sigs.get(me) {
            if let Some(CanonicalJsonValue::String(sig)) = mine.get(&signer_key_id) {
                out.push((
                    target_user.to_owned(),
                    key_id.to_owned(),
                    signer_key_id.clone(),
                    sig.clone(),
                ));
            }
        }
    }
    Ok(Ok(out))
}

/// # `POST /_matrix/client/v3/keys/signatures/upload`
///
/// Each signature is checked against the signer's key and the signed object against the stored
/// key; the good ones are stored and the others reported per key in `failures`.
pub async fn upload_signatures(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let (_, body): (upload_signatures::v3::Request, Value) =
        ruma_req_with_body(&mut req, &[]).await?;
    let app = req.state().clone();
    let me = who.user_id.to_string();
    let ours = app.server_name.clone();
    let failures = app
        .store
        .write(move |tx| {
            let mut failures = Map::new();
            let mut fail = |user: &str, key: &str, code: &str, msg: String| {
                let entry = failures.entry(user.to_owned()).or_insert_with(|| json!({}));
                entry[key] = json!({ "errcode": code, "error": msg });
            };
            let mut changed = BTreeSet::new();
            for (target_user, keys) in body.as_object().into_iter().flatten() {
                let Some(keys) = keys.as_object() else {
                    fail(target_user, "", "M_BAD_JSON", "expected an object".into());
                    continue;
                };
                let remote = UserId::parse(target_user.as_str())
                    .map(|u| u.server_name() != ours)
                    .unwrap_or(true);
                for (key_id, signed) in keys {
                    if remote {
                        // Federation seam: signatures of remote users' keys are sent to their
                        // server (`m.signing_key_update`) by the federation half.
                        fail(
                            target_user,
                            key_id,
                            "M_UNKNOWN",
                            "remote users are not supported yet".into(),
                        );
                        continue;
                    }
                    match check_signed_key(tx, &me, target_user, key_id, &signed.to_string())? {
                        Ok(sigs) => {
                            for (tu, tk, signer_key, sig) in sigs {
                                e::upsert_signature(tx, &tu, &tk, &me, &signer_key, &sig)?;
                            }
                            // A self-signature changes what everyone sees of the caller; a
                            // user-signing one only what the caller's own devices see.
                            changed.insert(me.clone());
                        }
                        Err((code, msg)) => fail(target_user, key_id, code, msg),
                    }
                }
            }
            for user in changed {
                device_list_changed(tx, &user, Change::CrossSigning)?;
            }
            Ok(failures)
        })
        .await?;
    json(&json!({ "failures": failures }))
}

/// Deletes the given devices' sessions and devices, with everything end-to-end encryption
/// keeps for them (keys, one-time keys, signatures of their keys, to-device inbox) and the
/// pushers they set, and records
/// the device-list change if any device existed. Returns the removed token hashes.
pub fn delete_devices(tx: &mut Tx<'_>, user: &str, which: q::Devices<'_>) -> Result<Vec<String>> {
    let devices: Vec<String> = e::list_device_ids(tx, user)?
        .into_iter()
        .filter(|d| match which {
            q::Devices::One(one) => d == one,
            q::Devices::All => true,
            q::Devices::AllBut(but) => d != but,
        })
        .collect();
    let hashes = q::delete_sessions(tx, user, which, true)?;
    for d in &devices {
        e::delete_device_e2e(tx, user, d)?;
    }
    // Their pushers go too (Synapse's `remove_pushers_by_devices`): a logged-out phone must
    // stop receiving the account's notifications.
    crate::store::pushfix::delete_pushers_of_devices(tx, user, &devices)?;
    for d in &devices {
        device_list_changed(tx, user, Change::Deleted(d))?;
    }
    Ok(hashes)
}

/// Called before a login creates (or reuses) a device: a new device is a device-list change
/// for everyone sharing a room with the user.
pub fn before_new_device(tx: &mut Tx<'_>, user: &str, device: &str) -> Result<()> {
    if !e::device_exists(tx, user, device)? {
        device_list_changed(tx, user, Change::Device(device))?;
    }
    Ok(())
}
