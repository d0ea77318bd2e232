//! Per-user data: filters, profile, account data, typing, receipts and read markers, push
//! rules.

use ruma::{
    api::client::{
        config::{
            get_global_account_data, get_room_account_data, set_global_account_data,
            set_room_account_data,
        },
        filter::{create_filter, get_filter},
        profile::{
            get_avatar_url, get_display_name, get_profile, set_avatar_url, set_display_name,
        },
        push::{
            delete_pushrule, get_pushrule, get_pushrule_actions, get_pushrule_enabled,
            get_pushrules_all, get_pushrules_global_scope, set_pushrule, set_pushrule_actions,
            set_pushrule_enabled,
        },
        read_marker::set_read_marker,
        receipt::create_receipt::{self, v3::ReceiptType},
        typing::create_typing_event::{self, v3::Typing},
        user_directory::search_users,
    },
    events::receipt::ReceiptThread,
    push::{RuleKind, Ruleset},
    OwnedEventId, OwnedRoomId, OwnedUserId, UserId,
};
use serde_json::{json, Value};
use tide::Response;

use super::{
    auth, json, known_body, known_query, param, ruma_req, ruma_req_compat, ruma_req_with_body,
    Authed, Req,
};
use crate::{
    error::{Error, Result},
    notify::Topic,
    ops::{self, account},
    store::queries as q,
};

/// The path's user must be the caller.
fn own(user_id: &UserId, who: &Authed) -> Result<()> {
    if user_id != who.user_id {
        return Err(Error::forbidden("You may only act for yourself"));
    }
    Ok(())
}

// ---------------------------------------------------------------- filters

/// # `POST /_matrix/client/v3/user/{userId}/filter`
pub async fn create_filter(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    // ruma's filter type validates the filter, so a stored filter always parses later; the
    // JSON as sent is what is stored.
    let (body, raw): (create_filter::v3::Request, Value) =
        ruma_req_with_body(&mut req, &["user_id"]).await?;
    own(&body.user_id, &who)?;
    known_body(
        "event_format",
        body.filter.event_format.as_str(),
        &["client", "federation"],
    )?;
    let (u, j) = (who.user_id.to_string(), raw.to_string());
    let id = req
        .state()
        .store
        .write(move |tx| q::insert_filter(tx, &u, &j))
        .await?;
    json(&json!({ "filter_id": id.to_string() }))
}

/// # `GET /_matrix/client/v3/user/{userId}/filter/{filterId}`
pub async fn get_filter(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: get_filter::v3::Request = ruma_req(&mut req, &["user_id", "filter_id"]).await?;
    own(&body.user_id, &who)?;
    let id: i64 = body
        .filter_id
        .parse()
        .map_err(|_| Error::not_found("No such filter"))?;
    let u = who.user_id.to_string();
    let f = req
        .state()
        .store
        .read(move |c| q::get_filter(c, &u, id))
        .await?
        .ok_or_else(|| Error::not_found("No such filter"))?;
    let v: Value = serde_json::from_str(&f)?;
    json(&v)
}

// ---------------------------------------------------------------- profile

/// A user's profile: ours from the database, another server's over federation
/// (`/query/profile`).
async fn load_profile(req: &Req, user_id: OwnedUserId) -> Result<q::UserRow> {
    let app = req.state();
    if user_id.server_name() != app.server_name {
        use ruma::api::federation::query::get_profile_information::v1 as profile;
        let dest = user_id.server_name().to_owned();
        let res = app
            .fed
            .client
            .send(&dest, profile::Request::new(user_id))
            .await?;
        let field = |k: &str| res.data.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        return Ok(q::UserRow {
            password_hash: None,
            is_admin: false,
            deactivated: false,
            displayname: field("displayname"),
            avatar_url: field("avatar_url"),
        });
    }
    app.store
        .read(move |c| q::get_user(c, user_id.as_str()))
        .await?
        .ok_or_else(|| Error::not_found("Profile not found"))
}

/// # `GET /_matrix/client/v3/profile/{userId}`
pub async fn get_profile(mut req: Req) -> Result<Response> {
    let body: get_profile::v3::Request = ruma_req(&mut req, &["user_id"]).await?;
    let row = load_profile(&req, body.user_id).await?;
    let mut out = json!({});
    if let Some(d) = row.displayname {
        out["displayname"] = d.into();
    }
    if let Some(a) = row.avatar_url {
        out["avatar_url"] = a.into();
    }
    json(&out)
}

/// The profile fields Hearth stores (the `{keyName}` of the path).
#[derive(Clone, Copy, PartialEq)]
enum Field {
    Displayname,
    AvatarUrl,
}

impl Field {
    fn of(req: &Req) -> Result<Self> {
        match param(req, "field")?.as_str() {
            "displayname" => Ok(Self::Displayname),
            "avatar_url" => Ok(Self::AvatarUrl),
            _ => Err(Error::unrecognized("Unknown profile field")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Displayname => "displayname",
            Self::AvatarUrl => "avatar_url",
        }
    }
}

/// # `GET /_matrix/client/v3/profile/{userId}/{keyName}`
pub async fn get_profile_field(mut req: Req) -> Result<Response> {
    let field = Field::of(&req)?;
    let user_id = match field {
        Field::Displayname => {
            ruma_req::<get_display_name::v3::Request>(&mut req, &["user_id"])
                .await?
                .user_id
        }
        Field::AvatarUrl => {
            ruma_req::<get_avatar_url::v3::Request>(&mut req, &["user_id"])
                .await?
                .user_id
        }
    };
    let row = load_profile(&req, user_id).await?;
    let value = match field {
        Field::Displayname => row.displayname,
        Field::AvatarUrl => row.avatar_url,
    };
    let value = value.ok_or_else(|| Error::not_found("Profile field not set"))?;
    json(&json!({ field.name(): value }))
}

/// # `PUT /_matrix/client/v3/profile/{userId}/{keyName}`
///
/// The new profile is copied into a fresh member event in every joined room, in the same
/// commit as the profile itself. A missing or `null` value clears the field.
pub async fn set_profile_field(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let field = Field::of(&req)?;
    let (user_id, value) = match field {
        Field::Displayname => {
            let b: set_display_name::v3::Request = ruma_req(&mut req, &["user_id"]).await?;
            if b.displayname.as_ref().is_some_and(|d| d.len() > 256) {
                return Err(Error::invalid_param("Display name too long"));
            }
            (b.user_id, b.displayname)
        }
        Field::AvatarUrl => {
            let b: set_avatar_url::v3::Request = ruma_req(&mut req, &["user_id"]).await?;
            (b.user_id, b.avatar_url.map(|u| u.to_string()))
        }
    };
    own(&user_id, &who)?;
    let (d, a) = match field {
        Field::Displayname => (Some(value), None),
        Field::AvatarUrl => (None, Some(value)),
    };
    ops::profile::set_profile(req.state(), &who.user_id, d, a).await?;
    json(&json!({}))
}

// ---------------------------------------------------------------- account data

async fn get_ad(
    req: &Req,
    who: Authed,
    room: Option<OwnedRoomId>,
    kind: String,
) -> Result<Response> {
    let (u, r) = (
        who.user_id.to_string(),
        room.map(|r| r.to_string()).unwrap_or_default(),
    );
    let v = req
        .state()
        .store
        .read(move |c| q::get_account_data(c, &u, &r, &kind))
        .await?
        .ok_or_else(|| Error::not_found("Account data not found"))?;
    let v: Value = serde_json::from_str(&v)?;
    json(&v)
}

/// Stores account data; the content is free-form JSON (an object, checked by the body helper).
async fn put_ad(
    req: &Req,
    who: Authed,
    room: Option<OwnedRoomId>,
    kind: String,
    content: Value,
) -> Result<Response> {
    if kind == "m.fully_read" || kind == "m.push_rules" {
        return Err(Error::new(
            405,
            "M_BAD_JSON",
            format!("Cannot set {kind} through this API"),
        ));
    }
    let (u, r) = (
        who.user_id.to_string(),
        room.map(|r| r.to_string()).unwrap_or_default(),
    );
    req.state()
        .store
        .write(move |tx| account::put_account_data(tx, &u, &r, &kind, &content))
        .await?;
    json(&json!({}))
}

/// # `GET /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn get_account_data(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let b: get_global_account_data::v3::Request = ruma_req(&mut req, &["user_id", "type"]).await?;
    own(&b.user_id, &who)?;
    get_ad(&req, who, None, b.event_type.to_string()).await
}

/// # `PUT /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn put_account_data(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let (b, content): (set_global_account_data::v3::Request, Value) =
        ruma_req_with_body(&mut req, &["user_id", "type"]).await?;
    own(&b.user_id, &who)?;
    put_ad(&req, who, None, b.event_type.to_string(), content).await
}

/// # `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn get_room_account_data(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let b: get_room_account_data::v3::Request =
        ruma_req(&mut req, &["user_id", "room_id", "type"]).await?;
    own(&b.user_id, &who)?;
    get_ad(&req, who, Some(b.room_id), b.event_type.to_string()).await
}

/// # `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn put_room_account_data(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let (b, content): (set_room_account_data::v3::Request, Value) =
        ruma_req_with_body(&mut req, &["user_id", "room_id", "type"]).await?;
    own(&b.user_id, &who)?;
    put_ad(
        &req,
        who,
        Some(b.room_id),
        b.event_type.to_string(),
        content,
    )
    .await
}

// ---------------------------------------------------------------- typing, receipts

/// ruma's `Typing` requires `timeout` when `typing` is true, but the spec makes it optional
/// and Synapse defaults it to 30 s: a missing one gets that default before ruma parses.
fn default_typing_timeout(body: &mut Value) {
    if let Some(o) = body.as_object_mut() {
        if o.get("typing") == Some(&Value::Bool(true)) && !o.contains_key("timeout") {
            o.insert("timeout".into(), 30_000.into());
        }
    }
}

/// # `PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}`
pub async fn typing(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let (body, _): (create_typing_event::v3::Request, Value) =
        ruma_req_compat(&mut req, &["room_id", "user_id"], default_typing_timeout).await?;
    own(&body.user_id, &who)?;
    let timeout = match body.state {
        Typing::Yes(info) => Some(u64::try_from(info.timeout.as_millis()).unwrap_or(u64::MAX)),
        _ => None,
    };
    let app = req.state().clone();
    let room = body.room_id;
    let (r, u) = (room.to_string(), who.user_id.to_string());
    if app
        .store
        .read(move |c| q::get_membership(c, &r, &u))
        .await?
        .as_deref()
        != Some("join")
    {
        return Err(Error::forbidden("You are not joined to this room"));
    }
    let until = timeout.map(|t| app.clock.now_ms() + t.min(120_000));
    app.typing.set(room.as_str(), who.user_id.as_str(), until);
    ops::edu::queue_typing(&app, &room, &who.user_id, until.is_some()).await?;
    json(&json!({}))
}

/// One receipt or read marker to store.
struct Marker {
    kind: &'static str,
    event_id: OwnedEventId,
    thread: String,
}

/// Stores receipts and the fully-read marker in ONE write: all of them or, if one is refused,
/// none. `m.read.private` is visible only to its owner; `m.fully_read` is room account data.
async fn store_markers(
    req: &Req,
    who: &Authed,
    room: &OwnedRoomId,
    markers: Vec<Marker>,
) -> Result<()> {
    if markers.is_empty() {
        return Ok(());
    }
    let (r, u) = (room.to_string(), who.user_id.to_string());
    let us = req.state().server_name.to_string();
    req.state()
        .store
        .write(move |tx| {
            if q::get_membership(tx, &r, &u)?.as_deref() != Some("join") {
                return Err(Error::forbidden("You are not joined to this room"));
            }
            for m in markers {
                let e = m.event_id.as_str();
                if q::get_event_room(tx, e)?.as_deref() != Some(r.as_str()) {
                    return Err(Error::not_found("Event not found in this room"));
                }
                if m.kind == "m.fully_read" {
                    account::put_account_data(
                        tx,
                        &u,
                        &r,
                        "m.fully_read",
                        &json!({ "event_id": e }),
                    )?;
                    continue;
                }
                let pos = tx.next_pos([Topic::room(r.as_str())]);
                q::upsert_receipt(tx, &r, m.kind, &u, &m.thread, e, tx.now_ms, pos)?;
                if m.kind == "m.read" {
                    let now = tx.now_ms;
                    ops::edu::queue_receipt(tx, &us, &r, &u, e, &m.thread, now)?;
                }
            }
            Ok(())
        })
        .await
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}`
pub async fn receipt(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: create_receipt::v3::Request =
        ruma_req(&mut req, &["room_id", "receipt_type", "event_id"]).await?;
    let kind = match body.receipt_type {
        ReceiptType::Read => "m.read",
        ReceiptType::ReadPrivate => "m.read.private",
        ReceiptType::FullyRead => "m.fully_read",
        _ => return Err(Error::invalid_param("Unknown receipt type")),
    };
    let thread = match &body.thread {
        ReceiptThread::Unthreaded => String::new(),
        ReceiptThread::Main | ReceiptThread::Thread(_) => {
            body.thread.as_str().unwrap_or_default().to_owned()
        }
        _ => return Err(Error::bad_json("thread_id must be \"main\" or an event ID")),
    };
    let marker = Marker {
        kind,
        event_id: body.event_id,
        thread,
    };
    store_markers(&req, &who, &body.room_id, vec![marker]).await?;
    json(&json!({}))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/read_markers`
pub async fn read_markers(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: set_read_marker::v3::Request = ruma_req(&mut req, &["room_id"]).await?;
    let markers = [
        ("m.fully_read", body.fully_read),
        ("m.read", body.read_receipt),
        ("m.read.private", body.private_read_receipt),
    ]
    .into_iter()
    .filter_map(|(kind, id)| {
        id.map(|event_id| Marker {
            kind,
            event_id,
            thread: String::new(),
        })
    })
    .collect();
    store_markers(&req, &who, &body.room_id, markers).await?;
    json(&json!({}))
}

// ---------------------------------------------------------------- push rules

fn load_rules(conn: &crate::store::Connection, user: &UserId) -> Result<Ruleset> {
    ops::push::load_rules(conn, user.as_str())
}

/// Loads, changes and stores a user's rule set in one write.
async fn update_rules<F>(req: &Req, who: &Authed, f: F) -> Result<()>
where
    F: FnOnce(&mut Ruleset) -> Result<()> + Send + 'static,
{
    let uid = who.user_id.clone();
    req.state()
        .store
        .write(move |tx| {
            let mut rules = load_rules(tx, &uid)?;
            f(&mut rules)?;
            account::put_account_data(
                tx,
                uid.as_str(),
                "",
                "m.push_rules",
                &json!({ "global": rules }),
            )
        })
        .await
}

async fn rules_json(req: &Req) -> Result<Value> {
    let who = auth(req).await?;
    let rules = req
        .state()
        .store
        .read(move |c| load_rules(c, &who.user_id))
        .await?;
    Ok(serde_json::to_value(rules)?)
}

/// # `GET /_matrix/client/v3/pushrules/`
pub async fn get_push_rules(mut req: Req) -> Result<Response> {
    let _: get_pushrules_all::v3::Request = ruma_req(&mut req, &[]).await?;
    json(&json!({ "global": rules_json(&req).await? }))
}

/// # `GET /_matrix/client/v3/pushrules/global/`
pub async fn get_push_rules_global(mut req: Req) -> Result<Response> {
    let _: get_pushrules_global_scope::v3::Request = ruma_req(&mut req, &[]).await?;
    json(&rules_json(&req).await?)
}

/// The kinds of push rule the spec defines; ruma keeps others as `_Custom`.
fn known_kind(kind: &RuleKind) -> Result<()> {
    known_query(
        "push rule kind",
        kind.as_str(),
        &["override", "underride", "sender", "room", "content"],
    )
}

/// The rule as JSON, from the user's rule set.
async fn find_rule(req: &Req, kind: &RuleKind, id: &str) -> Result<Value> {
    known_kind(kind)?;
    let all = rules_json(req).await?;
    all.get(kind.as_str())
        .and_then(Value::as_array)
        .and_then(|list| list.iter().find(|r| r["rule_id"] == id))
        .cloned()
        .ok_or_else(|| Error::not_found("Push rule not found"))
}

/// # `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn get_push_rule(mut req: Req) -> Result<Response> {
    let b: get_pushrule::v3::Request = ruma_req(&mut req, &["kind", "rule_id"]).await?;
    json(&find_rule(&req, &b.kind, &b.rule_id).await?)
}

/// # `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn put_push_rule(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let b: set_pushrule::v3::Request = ruma_req(&mut req, &["kind", "rule_id"]).await?;
    let (rule, before, after) = (b.rule, b.before, b.after);
    update_rules(&req, &who, move |rules| {
        rules
            .insert(rule, after.as_deref(), before.as_deref())
            .map_err(|e| Error::bad_json(e.to_string()))
    })
    .await?;
    json(&json!({}))
}

/// # `DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn delete_push_rule(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let b: delete_pushrule::v3::Request = ruma_req(&mut req, &["kind", "rule_id"]).await?;
    known_kind(&b.kind)?;
    update_rules(&req, &who, move |rules| {
        rules
            .remove(b.kind, &b.rule_id)
            .map_err(|e| Error::not_found(e.to_string()))
    })
    .await?;
    json(&json!({}))
}

/// # `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/{attr}`
pub async fn get_push_rule_attr(mut req: Req) -> Result<Response> {
    match param(&req, "attr")?.as_str() {
        "enabled" => {
            let b: get_pushrule_enabled::v3::Request =
                ruma_req(&mut req, &["kind", "rule_id"]).await?;
            let rule = find_rule(&req, &b.kind, &b.rule_id).await?;
            json(&json!({ "enabled": rule["enabled"] }))
        }
        "actions" => {
            let b: get_pushrule_actions::v3::Request =
                ruma_req(&mut req, &["kind", "rule_id"]).await?;
            let rule = find_rule(&req, &b.kind, &b.rule_id).await?;
            json(&json!({ "actions": rule["actions"] }))
        }
        _ => Err(Error::unrecognized("Unknown push rule attribute")),
    }
}

/// # `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/{attr}`
pub async fn put_push_rule_attr(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    match param(&req, "attr")?.as_str() {
        "enabled" => {
            let b: set_pushrule_enabled::v3::Request =
                ruma_req(&mut req, &["kind", "rule_id"]).await?;
            known_kind(&b.kind)?;
            update_rules(&req, &who, move |r| {
                r.set_enabled(b.kind, &b.rule_id, b.enabled)
                    .map_err(|e| Error::not_found(e.to_string()))
            })
            .await?;
        }
        "actions" => {
            let b: set_pushrule_actions::v3::Request =
                ruma_req(&mut req, &["kind", "rule_id"]).await?;
            known_kind(&b.kind)?;
            update_rules(&req, &who, move |r| {
                r.set_actions(b.kind, &b.rule_id, b.actions)
                    .map_err(|e| Error::not_found(e.to_string()))
            })
            .await?;
        }
        _ => return Err(Error::unrecognized("Unknown push rule attribute")),
    }
    json(&json!({}))
}

// ---------------------------------------------------------------- user directory

/// # `POST /_matrix/client/v3/user_directory/search`
///
/// Like Synapse's default (`search_all_users: false`): users who share a room with the
/// requester or are in a public room, matched on user ID or display name.
pub async fn search_users(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let body: search_users::v3::Request = ruma_req(&mut req, &[]).await?;
    let term = body.search_term.to_lowercase();
    let limit = usize::try_from(u64::from(body.limit))
        .unwrap_or(usize::MAX)
        .clamp(1, 100);
    let me = who.user_id.to_string();
    let (results, limited) = req
        .state()
        .store
        .read(move |c| {
            let mut all: Vec<Value> = q::search_user_directory(c, &me, &term, limit + 1)?
                .into_iter()
                .map(|u| json!({ "user_id": u.user_id, "display_name": u.displayname, "avatar_url": u.avatar_url }))
                .collect();
            let limited = all.len() > limit;
            all.truncate(limit);
            Ok((all, limited))
        })
        .await?;
    json(&json!({ "results": results, "limited": limited }))
}
