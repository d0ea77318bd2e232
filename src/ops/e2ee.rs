//! End-to-end encryption use cases shared by the client handlers (`http::keys`,
//! `http::to_device`) and the federation handlers (`http::federation::{user, transactions}`):
//! device-list changes and the EDUs that tell other servers, a local user's keys as others
//! see them, claiming one-time keys, and delivering to-device messages from other servers.

use std::collections::{BTreeMap, BTreeSet};

use ruma::UserId;
use serde_json::{json, Map, Value};

use crate::{
    error::Result,
    notify::Topic,
    store::{e2ee as e, queries as q, Connection, Tx},
};

/// Records that `user`'s devices or keys changed, at a stream position that wakes the user
/// and everyone joined to a room with them: their next `/sync` lists the user in
/// `device_lists.changed`, in order with the rest of the stream. Other servers sharing a room
/// with the user are told in the same write: an `m.device_list_update` EDU for `device` (its
/// keys, or `deleted`), or an `m.signing_key_update` with the user's cross-signing keys when no
/// device is named. `stream_id` is this change's position and `prev_id` the user's previous
/// one, so a server that missed an update resyncs through `/user/devices`.
pub fn device_list_changed(tx: &mut Tx<'_>, user: &str, change: Change<'_>) -> Result<()> {
    let rooms: Vec<String> = q::list_user_rooms(tx, user)?
        .into_iter()
        .filter(|(_, m, _)| m == "join")
        .map(|(r, _, _)| r)
        .collect();
    let mut servers = BTreeSet::new();
    let own = UserId::parse(user)
        .map(|u| u.server_name().to_string())
        .unwrap_or_default();
    for r in &rooms {
        servers.extend(q::list_room_servers(tx, r, &own)?);
    }
    servers.remove(&own);
    let topics: Vec<Topic> = rooms
        .into_iter()
        .map(Topic::room)
        .chain([Topic::user(user)])
        .collect();
    let prev = e::latest_device_list_change(tx, user)?;
    let pos = tx.next_pos(topics);
    e::insert_device_list_change(tx, pos, user)?;
    if servers.is_empty() {
        return Ok(());
    }
    let edu = match change {
        Change::Device(d) | Change::Deleted(d) => {
            let mut content = json!({
                "user_id": user, "device_id": d, "stream_id": pos,
                "prev_id": prev.into_iter().collect::<Vec<_>>(),
            });
            if matches!(change, Change::Deleted(_)) {
                content["deleted"] = true.into();
            } else if let Some(row) = e::list_device_keys(tx, user, Some(&[d.to_owned()]))?.pop() {
                content["keys"] = serde_json::from_str(&row.keys)?;
                if let Some(name) = row.display_name {
                    content["device_display_name"] = name.into();
                }
            }
            json!({ "edu_type": "m.device_list_update", "content": content })
        }
        Change::CrossSigning => {
            let mut content = json!({ "user_id": user });
            for (key_type, field) in [
                ("master", "master_key"),
                ("self_signing", "self_signing_key"),
            ] {
                if let Some(v) = cross_signing_key(tx, user, key_type, "")? {
                    content[field] = v;
                }
            }
            json!({ "edu_type": "m.signing_key_update", "content": content })
        }
    };
    let servers: Vec<String> = servers.into_iter().collect();
    q::insert_outbox_edu(tx, &servers, &edu.to_string())
}

/// What changed in a user's device list (what the EDU to other servers says).
#[derive(Clone, Copy)]
pub enum Change<'a> {
    /// A device was added or its keys changed.
    Device(&'a str),
    Deleted(&'a str),
    /// Cross-signing keys or signatures.
    CrossSigning,
}

/// A remote user's device list changed (an `m.device_list_update` or `m.signing_key_update`
/// EDU from their server): recorded like a local change, so local users sharing a room with
/// them see them in `device_lists.changed` and query their keys again (Hearth does not cache
/// remote keys: a query always asks the user's server). Only for users of `origin`, and only
/// when someone here may share a room with them (see the partial-state case below).
pub fn remote_device_list_changed(tx: &mut Tx<'_>, origin: &str, content: &Value) -> Result<()> {
    let Some(user) = content["user_id"].as_str() else {
        return Ok(());
    };
    if !UserId::parse(user).is_ok_and(|u| u.server_name().as_str() == origin) {
        return Ok(());
    }
    let mut rooms: Vec<String> = q::list_user_rooms(tx, user)?
        .into_iter()
        .filter(|(_, m, _)| m == "join")
        .map(|(r, _, _)| r)
        .collect();
    // While a room is partial-state we know few of its remote members: an update from a
    // server in such a room may concern one of them, so it is kept. Once the resync adds
    // them, the change (if newer than a client's token) lists them, and the resync's own
    // member rows do for older tokens.
    rooms.extend(crate::store::partial_devices::list_partial_rooms_with_server(tx, origin)?);
    if rooms.is_empty() {
        return Ok(()); // nobody here shares a room with them
    }
    let pos = tx.next_pos(rooms.into_iter().map(Topic::room));
    e::insert_device_list_change(tx, pos, user)
}

/// Adds the signatures uploaded for a key to its `signatures`: the owner's own, and those by
/// `viewer` (a user-signing signature is shown only to the user who made it, as Synapse does).
fn merge_signatures(
    c: &Connection,
    object: &mut Value,
    owner: &str,
    target_key: &str,
    viewer: &str,
) -> Result<()> {
    for (signer, key_id, sig) in e::list_signatures(c, owner, target_key)? {
        if signer != owner && signer != viewer {
            continue;
        }
        if !object["signatures"].is_object() {
            object["signatures"] = json!({});
        }
        if !object["signatures"][&signer].is_object() {
            object["signatures"][&signer] = json!({});
        }
        object["signatures"][&signer][&key_id] = sig.into();
    }
    Ok(())
}

/// A user's cross-signing key of `key_type`, with its signatures, as `viewer` sees it.
pub fn cross_signing_key(
    c: &Connection,
    user: &str,
    key_type: &str,
    viewer: &str,
) -> Result<Option<Value>> {
    let Some((public, keys)) = e::get_cross_signing_key(c, user, key_type)? else {
        return Ok(None);
    };
    let mut v: Value = serde_json::from_str(&keys)?;
    merge_signatures(c, &mut v, user, &public, viewer)?;
    Ok(Some(v))
}

/// What `/keys/query` (and federation's `/user/keys/query`, with no viewer) says about one
/// local user.
pub fn query_local_user(
    c: &Connection,
    user: &str,
    devices: &[String],
    viewer: &str,
    out: &mut Value,
) -> Result<()> {
    let mut map = Map::new();
    for row in e::list_device_keys(c, user, Some(devices))? {
        let mut v: Value = serde_json::from_str(&row.keys)?;
        merge_signatures(c, &mut v, user, &row.device_id, viewer)?;
        if let Some(name) = row.display_name {
            v["unsigned"] = json!({ "device_display_name": name });
        }
        map.insert(row.device_id, v);
    }
    out["device_keys"][user] = Value::Object(map);
    for (key_type, field) in [
        ("master", "master_keys"),
        ("self_signing", "self_signing_keys"),
    ] {
        if let Some(v) = cross_signing_key(c, user, key_type, viewer)? {
            out[field][user] = v;
        }
    }
    // A user-signing key is only ever shown to its owner.
    if user == viewer {
        if let Some(v) = cross_signing_key(c, user, "user_signing", viewer)? {
            out["user_signing_keys"][user] = v;
        }
    }
    Ok(())
}

/// Claims keys of local users, in one write: each requested device gets one of its one-time
/// keys (deleted as it is handed out) or, when none is left, its fallback key (marked used).
/// Unknown users and devices are left out. Shared by `/keys/claim` and federation's
/// `/user/keys/claim`.
pub fn claim_local(
    tx: &mut Tx<'_>,
    wanted: &BTreeMap<ruma::OwnedUserId, BTreeMap<ruma::OwnedDeviceId, ruma::OneTimeKeyAlgorithm>>,
) -> Result<Map<String, Value>> {
    let mut keys = Map::new();
    for (user, devices) in wanted {
        let mut user_keys = Map::new();
        for (device, algorithm) in devices {
            let (u, d, alg) = (user.as_str(), device.as_str(), algorithm.as_str());
            let found = match e::claim_one_time_key(tx, u, d, alg)? {
                Some(k) => Some(k),
                None => e::claim_fallback_key(tx, u, d, alg)?,
            };
            if let Some((key_id, key)) = found {
                let key: Value = serde_json::from_str(&key)?;
                user_keys.insert(d.into(), json!({ format!("{alg}:{key_id}"): key }));
            }
        }
        if !user_keys.is_empty() {
            keys.insert(user.to_string(), Value::Object(user_keys));
        }
    }
    Ok(keys)
}

/// Delivers an `m.direct_to_device` EDU from `origin` to our users' devices (`*`: all of a
/// user's devices), in the transaction's write. A `message_id` already delivered for that
/// sender is skipped (a server may send an EDU again in a retried transaction), and a sender
/// that is not of `origin` is ignored.
pub fn deliver_remote(tx: &mut Tx<'_>, origin: &str, ours: &str, content: &Value) -> Result<()> {
    let (Some(sender), Some(kind), Some(id), Some(messages)) = (
        content["sender"].as_str(),
        content["type"].as_str(),
        content["message_id"].as_str(),
        content["messages"].as_object(),
    ) else {
        return Ok(());
    };
    let from_origin = ruma::UserId::parse(sender).is_ok_and(|u| u.server_name().as_str() == origin);
    if !from_origin || !e::insert_to_device_txn(tx, sender, "", &format!("federation:{id}"))? {
        return Ok(());
    }
    for (user, devices) in messages {
        let Ok(uid) = ruma::UserId::parse(user.as_str()) else {
            continue;
        };
        if uid.server_name().as_str() != ours {
            continue;
        }
        let Some(devices) = devices.as_object() else {
            continue;
        };
        for (device, msg) in devices {
            if !msg.is_object() {
                continue;
            }
            let targets = if device == "*" {
                e::list_device_ids(tx, user)?
            } else if e::device_exists(tx, user, device)? {
                vec![device.clone()]
            } else {
                continue;
            };
            let content = msg.to_string();
            for d in targets {
                let pos = tx.next_pos([Topic::user(user.as_str())]);
                e::insert_to_device(tx, user, &d, pos, sender, kind, &content)?;
            }
        }
    }
    Ok(())
}
