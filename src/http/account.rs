//! Accounts and sessions: `/register` (user-interactive auth), `/login`, `/logout`,
//! `/account/*`, `/devices`.
//!
//! User-interactive auth: every flow Hearth offers has a single stage (`m.login.dummy`,
//! `m.login.registration_token`, or `m.login.password` to confirm a sensitive action), so a
//! request carrying a valid `auth` dict completes it in one go; the `session` handed out in the
//! 401 is accepted back but carries no server-side state.

use ruma::{
    api::client::{
        account::{
            change_password, get_3pids, get_username_availability,
            register::{self, RegistrationKind},
            whoami,
        },
        device::{delete_device, delete_devices, get_device, get_devices, update_device},
        session::{
            get_login_types,
            login::{self, v3::LoginInfo},
            logout, logout_all,
        },
        uiaa::{AuthData, UserIdentifier},
    },
    OwnedUserId, UserId,
};
use serde_json::{json, Value};
use tide::Response;

use super::{auth, json, peer_ip, ruma_req, ruma_req_compat, Req};
use crate::{
    config::Registration,
    error::{Error, Result},
    ops::account::{hash_password, user_id_for, verify_password},
    store::queries as q,
    util::{hash_token, random_string},
    App,
};

/// Creates a device and an access token for it; returns the token and the hashes of the
/// device's previous tokens (to evict from the cache).
fn new_session(
    tx: &mut crate::store::Tx<'_>,
    user_id: &str,
    device_id: &str,
    display_name: Option<&str>,
) -> Result<(String, Vec<String>)> {
    // A login that reuses a device ID replaces that device's old tokens.
    let old = q::delete_sessions(tx, user_id, q::Devices::One(device_id), false)?;
    super::keys::before_new_device(tx, user_id, device_id)?;
    q::upsert_device(tx, user_id, device_id, display_name, tx.now_ms)?;
    let token = format!("hth_{}", random_string(40));
    q::insert_token(tx, &hash_token(&token), user_id, device_id, tx.now_ms)?;
    Ok((token, old))
}

fn uia_401(flows: Value, error: Option<Error>) -> Error {
    let mut body =
        json!({ "flows": flows, "params": {}, "session": random_string(24), "completed": [] });
    if let Some(e) = error {
        body["errcode"] = e.errcode.into();
        body["error"] = e.message.into();
    }
    Error {
        body: Some(body),
        ..Error::new(
            401,
            "M_FORBIDDEN",
            "User-interactive authentication required",
        )
    }
}

/// The legacy form of a password auth dict (`"user": "alice"`, from before `identifier`)
/// that Synapse still accepts and some clients still send; ruma's `AuthData::Password`
/// requires `identifier`, so the legacy field is moved there before ruma parses the body.
pub(crate) fn legacy_auth_user(body: &mut Value) {
    let Some(auth) = body.get_mut("auth").and_then(Value::as_object_mut) else {
        return;
    };
    if auth.get("type").and_then(Value::as_str) != Some("m.login.password")
        || auth.contains_key("identifier")
    {
        return;
    }
    if let Some(user) = auth.remove("user") {
        auth.insert(
            "identifier".into(),
            json!({ "type": "m.id.user", "user": user }),
        );
    }
}

/// # `POST /_matrix/client/v3/register`
pub async fn register(mut req: Req) -> Result<Response> {
    let app = req.state().clone();
    app.limits.check("register", &peer_ip(&req))?;
    let body: register::v3::Request = ruma_req(&mut req, &[]).await?;
    match body.kind {
        RegistrationKind::User => {}
        RegistrationKind::Guest => return Err(Error::forbidden("Guest access is not enabled")),
        _ => return Err(Error::invalid_param("kind must be user or guest")),
    }
    let flows = match app.config.registration {
        Registration::Closed => return Err(Error::forbidden("Registration is disabled")),
        Registration::Open => json!([{ "stages": ["m.login.dummy"] }]),
        Registration::Token => json!([{ "stages": ["m.login.registration_token"] }]),
    };
    let localpart = match &body.username {
        Some(u) => u.to_lowercase(),
        None => random_string(12).to_lowercase(),
    };
    let user_id = user_id_for(&app, &localpart)?;
    let password = body.password;
    if password.as_ref().is_some_and(|p| p.len() > 512) {
        return Err(Error::invalid_param("Password too long"));
    }
    let uid = user_id.clone();
    if app
        .store
        .read(move |c| q::get_user(c, uid.as_str()))
        .await?
        .is_some()
    {
        return Err(Error::user_in_use("User ID already taken"));
    }
    let token_used = match (app.config.registration, body.auth) {
        (Registration::Open, Some(AuthData::Dummy(_))) => None,
        (Registration::Token, Some(AuthData::RegistrationToken(t))) => Some(t.token),
        // No auth yet, or only a session to poll: the 401 with the flows.
        (_, None | Some(AuthData::FallbackAcknowledgement(_))) => return Err(uia_401(flows, None)),
        (_, Some(_)) => {
            return Err(uia_401(
                flows,
                Some(Error::forbidden("Unsupported authentication stage")),
            ))
        }
    };
    let inhibit_login = body.inhibit_login;
    let device_id = body
        .device_id
        .map(|d| d.to_string())
        .unwrap_or_else(|| random_string(10).to_uppercase());
    let display = body.initial_device_display_name;
    let hash = match password {
        Some(p) => Some(hash_password(p).await?),
        None => None,
    };
    let config_tokens = app.config.registration_tokens.clone();
    let (uid, dev) = (user_id.clone(), device_id.clone());
    let token = app
        .store
        .write(move |tx| {
            if let Some(t) = &token_used {
                consume_registration_token(tx, t, &config_tokens)?;
            }
            if q::get_user(tx, uid.as_str())?.is_some() {
                return Err(Error::user_in_use("User ID already taken"));
            }
            q::insert_user(
                tx,
                uid.as_str(),
                hash.as_deref(),
                false,
                &localpart,
                tx.now_ms,
            )?;
            crate::ops::account::init_push_rules(tx, &uid)?;
            if inhibit_login {
                return Ok(None);
            }
            new_session(tx, uid.as_str(), &dev, display.as_deref()).map(|(t, _)| Some(t))
        })
        .await?;
    let mut out = json!({ "user_id": user_id, "home_server": app.server_name });
    if let Some(t) = token {
        out["access_token"] = t.into();
        out["device_id"] = device_id.into();
    }
    json(&out)
}

/// Accepts a token from the config list, or one from the database that has uses left.
fn consume_registration_token(
    tx: &crate::store::Tx<'_>,
    token: &str,
    config_tokens: &[String],
) -> Result<()> {
    if config_tokens.iter().any(|t| t == token) {
        return Ok(());
    }
    if !crate::store::queries::use_registration_token(tx, token, tx.now_ms as i64)? {
        return Err(uia_401(
            json!([{ "stages": ["m.login.registration_token"] }]),
            Some(Error::forbidden("Invalid registration token")),
        ));
    }
    Ok(())
}

/// # `GET /_matrix/client/v3/register/available`
pub async fn register_available(mut req: Req) -> Result<Response> {
    let app = req.state().clone();
    let body: get_username_availability::v3::Request = ruma_req(&mut req, &[]).await?;
    let uid = user_id_for(&app, &body.username.to_lowercase())?;
    if app
        .store
        .read(move |c| q::get_user(c, uid.as_str()))
        .await?
        .is_some()
    {
        return Err(Error::user_in_use("User ID already taken"));
    }
    json(&json!({ "available": true }))
}

/// # `GET /_matrix/client/v3/login`
pub async fn login_flows(mut req: Req) -> Result<Response> {
    let _: get_login_types::v3::Request = ruma_req(&mut req, &[]).await?;
    json(&json!({ "flows": [{ "type": "m.login.password" }] }))
}

/// The user named by a login identifier (`m.id.user`, or the deprecated top-level `user`).
fn login_user(
    app: &App,
    identifier: Option<&UserIdentifier>,
    user: Option<&str>,
) -> Result<OwnedUserId> {
    let user = match identifier {
        Some(UserIdentifier::Matrix(m)) => Some(m.user.as_str()),
        Some(_) => {
            return Err(Error::unknown("Only m.id.user identifiers are supported")
                .with_status(400, "M_UNKNOWN"))
        }
        None => user,
    };
    let user = user.ok_or_else(|| Error::bad_json("identifier.user is required"))?;
    if user.starts_with('@') {
        let id = UserId::parse(user).map_err(|_| Error::invalid_username("Invalid user ID"))?;
        if id.server_name() != app.server_name {
            return Err(Error::forbidden("Invalid username or password"));
        }
        Ok(id)
    } else {
        user_id_for(app, &user.to_lowercase())
            .map_err(|_| Error::forbidden("Invalid username or password"))
    }
}

/// Checks a user's password; `M_FORBIDDEN` for unknown users and wrong passwords alike.
async fn check_password(app: &App, user_id: &UserId, password: &str) -> Result<()> {
    let uid = user_id.to_owned();
    let row = app
        .store
        .read(move |c| q::get_user(c, uid.as_str()))
        .await?;
    let Some(row) = row else {
        return Err(Error::forbidden("Invalid username or password"));
    };
    if row.deactivated {
        return Err(Error::user_deactivated("This account has been deactivated"));
    }
    let Some(hash) = row.password_hash else {
        return Err(Error::forbidden("Invalid username or password"));
    };
    if verify_password(hash, password.to_owned()).await {
        Ok(())
    } else {
        Err(Error::forbidden("Invalid username or password"))
    }
}

/// # `POST /_matrix/client/v3/login`
pub async fn login(mut req: Req) -> Result<Response> {
    let app = req.state().clone();
    app.limits.check("login", &peer_ip(&req))?;
    // ruma's `LoginInfo` deserialiser indexes `data["type"]`, which panics when the key is
    // missing: give it a `null` to refuse instead, and answer like Synapse.
    let mut has_type = true;
    let parsed = ruma_req_compat::<login::v3::Request>(&mut req, &[], |b| {
        if let Some(o) = b.as_object_mut() {
            if !o.contains_key("type") {
                has_type = false;
                o.insert("type".into(), Value::Null);
            }
        }
    })
    .await;
    if !has_type {
        return Err(Error::new(400, "M_UNKNOWN", "Unknown login type"));
    }
    let (body, _) = parsed?;
    let LoginInfo::Password(p) = body.login_info else {
        return Err(Error::new(400, "M_UNKNOWN", "Unknown login type"));
    };
    #[allow(deprecated)] // the top-level `user` of old clients, as Synapse accepts it
    let user_id = login_user(&app, p.identifier.as_ref(), p.user.as_deref())?;
    check_password(&app, &user_id, &p.password).await?;
    let device_id = body
        .device_id
        .map(|d| d.to_string())
        .unwrap_or_else(|| random_string(10).to_uppercase());
    let display = body.initial_device_display_name;
    let (uid, dev) = (user_id.clone(), device_id.clone());
    let (token, old) = app
        .store
        .write(move |tx| new_session(tx, uid.as_str(), &dev, display.as_deref()))
        .await?;
    app.tokens.remove(&old);
    json(
        &json!({ "user_id": user_id, "access_token": token, "device_id": device_id, "home_server": app.server_name }),
    )
}

/// # `POST /_matrix/client/v3/logout`
pub async fn logout(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let _: logout::v3::Request = ruma_req(&mut req, &[]).await?;
    let app = req.state().clone();
    let (u, d) = (who.user_id.to_string(), who.device_id.to_string());
    let hashes = app
        .store
        .write(move |tx| super::keys::delete_devices(tx, &u, q::Devices::One(&d)))
        .await?;
    app.tokens.remove(&hashes);
    json(&json!({}))
}

/// # `POST /_matrix/client/v3/logout/all`
pub async fn logout_all(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let _: logout_all::v3::Request = ruma_req(&mut req, &[]).await?;
    let app = req.state().clone();
    let u = who.user_id.to_string();
    let hashes = app
        .store
        .write(move |tx| super::keys::delete_devices(tx, &u, q::Devices::All))
        .await?;
    app.tokens.remove(&hashes);
    json(&json!({}))
}

/// # `GET /_matrix/client/v3/account/whoami`
pub async fn whoami(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let _: whoami::v3::Request = ruma_req(&mut req, &[]).await?;
    json(&json!({ "user_id": who.user_id, "device_id": who.device_id, "is_guest": false }))
}

/// Requires a `m.login.password` auth dict for the caller (sensitive operations).
pub(crate) async fn require_password_uia(
    app: &App,
    who: &super::Authed,
    auth: Option<AuthData>,
) -> Result<()> {
    let flows = json!([{ "stages": ["m.login.password"] }]);
    let p = match auth {
        None | Some(AuthData::FallbackAcknowledgement(_)) => return Err(uia_401(flows, None)),
        Some(AuthData::Password(p)) => p,
        Some(_) => {
            return Err(uia_401(
                flows,
                Some(Error::forbidden("Unsupported authentication stage")),
            ))
        }
    };
    let claimed =
        login_user(app, Some(&p.identifier), None).unwrap_or_else(|_| who.user_id.clone());
    if claimed != who.user_id {
        return Err(Error::forbidden("Cannot authenticate as another user"));
    }
    check_password(app, &who.user_id, &p.password)
        .await
        .map_err(|e| uia_401(flows, Some(e)))
}

/// # `POST /_matrix/client/v3/account/password`
pub async fn change_password(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let app = req.state().clone();
    let (body, _): (change_password::v3::Request, Value) =
        ruma_req_compat(&mut req, &[], legacy_auth_user).await?;
    require_password_uia(&app, &who, body.auth).await?;
    let logout_devices = body.logout_devices;
    let hash = hash_password(body.new_password).await?;
    let (u, d) = (who.user_id.to_string(), who.device_id.to_string());
    let hashes = app
        .store
        .write(move |tx| {
            q::update_password(tx, &u, &hash)?;
            if logout_devices {
                return super::keys::delete_devices(tx, &u, q::Devices::AllBut(&d));
            }
            Ok(Vec::new())
        })
        .await?;
    app.tokens.remove(&hashes);
    json(&json!({}))
}

fn device_json(d: &q::DeviceRow) -> Value {
    json!({ "device_id": d.device_id, "display_name": d.display_name, "last_seen_ts": d.last_seen_ts, "last_seen_ip": d.last_seen_ip })
}

/// # `GET /_matrix/client/v3/devices`
pub async fn list_devices(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let _: get_devices::v3::Request = ruma_req(&mut req, &[]).await?;
    let u = who.user_id.to_string();
    let devices = req
        .state()
        .store
        .read(move |c| q::list_devices(c, &u, None))
        .await?;
    json(&json!({ "devices": devices.iter().map(device_json).collect::<Vec<_>>() }))
}

/// # `GET /_matrix/client/v3/devices/{deviceId}`
pub async fn get_device(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: get_device::v3::Request = ruma_req(&mut req, &["device_id"]).await?;
    let (u, id) = (who.user_id.to_string(), body.device_id.to_string());
    let devices = req
        .state()
        .store
        .read(move |c| q::list_devices(c, &u, Some(&id)))
        .await?;
    let d = devices
        .first()
        .ok_or_else(|| Error::not_found("Unknown device"))?;
    json(&device_json(d))
}

/// # `PUT /_matrix/client/v3/devices/{deviceId}`
pub async fn update_device(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: update_device::v3::Request = ruma_req(&mut req, &["device_id"]).await?;
    let (u, id, name) = (
        who.user_id.to_string(),
        body.device_id.to_string(),
        body.display_name,
    );
    let found = req
        .state()
        .store
        .write(move |tx| q::update_device_name(tx, &u, &id, name.as_deref()))
        .await?;
    if !found {
        return Err(Error::not_found("Unknown device"));
    }
    json(&json!({}))
}

async fn delete_devices_inner(
    req: &Req,
    ids: Vec<String>,
    auth_data: Option<AuthData>,
) -> Result<Response> {
    let who = auth(req).await?;
    let app = req.state().clone();
    require_password_uia(&app, &who, auth_data).await?;
    let u = who.user_id.to_string();
    let hashes = app
        .store
        .write(move |tx| {
            let mut hashes = Vec::new();
            for id in &ids {
                hashes.extend(super::keys::delete_devices(tx, &u, q::Devices::One(id))?);
            }
            Ok(hashes)
        })
        .await?;
    app.tokens.remove(&hashes);
    json(&json!({}))
}

/// # `DELETE /_matrix/client/v3/devices/{deviceId}`
pub async fn delete_device(mut req: Req) -> Result<Response> {
    let (body, _): (delete_device::v3::Request, Value) =
        ruma_req_compat(&mut req, &["device_id"], legacy_auth_user).await?;
    delete_devices_inner(&req, vec![body.device_id.to_string()], body.auth).await
}

/// # `POST /_matrix/client/v3/delete_devices`
pub async fn delete_devices(mut req: Req) -> Result<Response> {
    let (body, _): (delete_devices::v3::Request, Value) =
        ruma_req_compat(&mut req, &[], legacy_auth_user).await?;
    let ids = body.devices.iter().map(|d| d.to_string()).collect();
    delete_devices_inner(&req, ids, body.auth).await
}

/// # `GET /_matrix/client/v3/account/3pid`
///
/// Hearth has no identity-server integration, so no third-party identifier can be bound to an
/// account: the list is truthfully empty. (Element's notification settings load it.)
pub async fn threepids(mut req: Req) -> Result<Response> {
    auth(&req).await?;
    let _: get_3pids::v3::Request = ruma_req(&mut req, &[]).await?;
    json(&json!({ "threepids": [] }))
}
