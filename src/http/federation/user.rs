//! `/_matrix/federation/v1/user/*`: our users' devices and end-to-end keys, as other servers
//! ask for them when their users talk to ours.

use ruma::api::federation::{
    device::get_devices::v1 as devices,
    keys::{claim_keys::v1 as claim, get_keys::v1 as query},
};
use serde_json::{json, Value};
use tide::Response;

use super::origin;
use crate::{
    error::{Error, Result},
    http::{json, Req},
    ops::e2ee,
    store::e2ee as e,
};

/// # `POST /_matrix/federation/v1/user/keys/query`
///
/// As the client `/keys/query` answers it, without a viewer: no user-signing keys, and only the
/// owners' own signatures.
pub async fn keys_query(mut req: Req) -> Result<Response> {
    let r = origin::<query::Request>(&mut req, &[]).await?.req;
    let app = req.state().clone();
    let ours = app.server_name.clone();
    let out = app
        .store
        .read(move |c| {
            let mut out = json!({ "device_keys": {}, "master_keys": {}, "self_signing_keys": {} });
            for (user, devices) in &r.device_keys {
                if user.server_name() != ours {
                    continue;
                }
                let devices: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
                e2ee::query_local_user(c, user.as_str(), &devices, "", &mut out)?;
            }
            if let Some(o) = out.as_object_mut() {
                o.remove("user_signing_keys");
            }
            Ok(out)
        })
        .await?;
    json(&out)
}

/// # `POST /_matrix/federation/v1/user/keys/claim`
pub async fn keys_claim(mut req: Req) -> Result<Response> {
    let r = origin::<claim::Request>(&mut req, &[]).await?.req;
    let app = req.state().clone();
    let ours = app.server_name.clone();
    let local: std::collections::BTreeMap<_, _> = r
        .one_time_keys
        .into_iter()
        .filter(|(u, _)| u.server_name() == ours)
        .collect();
    let keys = app
        .store
        .write(move |tx| e2ee::claim_local(tx, &local))
        .await?;
    json(&json!({ "one_time_keys": keys }))
}

/// # `GET /_matrix/federation/v1/user/devices/{userId}`
///
/// A local user's devices with their keys and display names, the cross-signing keys other
/// users verify them with, and `stream_id`: the position of the user's latest device-list
/// change (what later `m.device_list_update` EDUs count from).
pub async fn devices(mut req: Req) -> Result<Response> {
    let r = origin::<devices::Request>(&mut req, &["user_id"])
        .await?
        .req;
    let app = req.state().clone();
    if r.user_id.server_name() != app.server_name {
        return Err(Error::invalid_param("The user is not on this server"));
    }
    let user = r.user_id.to_string();
    let out = app
        .store
        .read(move |c| {
            let mut list = Vec::new();
            for row in e::list_device_keys(c, &user, None)? {
                let keys: Value = serde_json::from_str(&row.keys)?;
                let mut d = json!({ "device_id": row.device_id, "keys": keys });
                if let Some(name) = row.display_name {
                    d["device_display_name"] = name.into();
                }
                list.push(d);
            }
            let mut out = json!({
                "user_id": user,
                "stream_id": e::latest_device_list_change(c, &user)?.unwrap_or(0),
                "devices": list,
            });
            for (key_type, field) in [
                ("master", "master_key"),
                ("self_signing", "self_signing_key"),
            ] {
                if let Some(v) = e2ee::cross_signing_key(c, &user, key_type, "")? {
                    out[field] = v;
                }
            }
            Ok(out)
        })
        .await?;
    json(&out)
}
