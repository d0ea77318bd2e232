//! Per-user data: filters, profile, account data, typing, receipts and read markers, push
//! rules.

use ruma::{
    push::{
        Action, NewConditionalPushRule, NewPatternedPushRule, NewPushRule, NewSimplePushRule,
        PushCondition, RuleKind, Ruleset,
    },
    OwnedEventId, OwnedRoomId, OwnedUserId, UserId,
};
use serde_json::{json, Value};
use tide::Response;

use super::{auth, body_json, json, param, Authed, Req};
use crate::{
    error::{Error, Result},
    notify::Topic,
    room::build::{self, NewEvent},
    store::{queries as q, Tx},
};

fn user_param(req: &Req) -> Result<OwnedUserId> {
    UserId::parse(param(req, "user_id")?).map_err(|e| Error::invalid_param(format!("user ID: {e}")))
}

fn room_param(req: &Req) -> Result<OwnedRoomId> {
    OwnedRoomId::try_from(param(req, "room_id")?)
        .map_err(|e| Error::invalid_param(format!("room ID: {e}")))
}

/// The path user must be the caller.
fn own(req: &Req, who: &Authed) -> Result<OwnedUserId> {
    let u = user_param(req)?;
    if u != who.user_id {
        return Err(Error::forbidden("You may only act for yourself"));
    }
    Ok(u)
}

// ---------------------------------------------------------------- filters

/// # `POST /_matrix/client/v3/user/{userId}/filter`
pub async fn create_filter(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    own(&req, &who)?;
    let body = body_json(&mut req).await?;
    // Validate with ruma's filter type so a stored filter always parses later.
    let _: ruma::api::client::filter::FilterDefinition = serde_json::from_value(body.clone())
        .map_err(|e| Error::bad_json(format!("filter: {e}")))?;
    let (u, j) = (who.user_id.to_string(), body.to_string());
    let id = req
        .state()
        .store
        .write(move |tx| q::insert_filter(tx, &u, &j))
        .await?;
    json(&json!({ "filter_id": id.to_string() }))
}

/// # `GET /_matrix/client/v3/user/{userId}/filter/{filterId}`
pub async fn get_filter(req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    own(&req, &who)?;
    let id: i64 = param(&req, "filter_id")?
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

/// # `GET /_matrix/client/v3/profile/{userId}`
pub async fn get_profile(req: Req) -> Result<Response> {
    let u = user_param(&req)?;
    let row = req
        .state()
        .store
        .read(move |c| q::get_user(c, u.as_str()))
        .await?
        .ok_or_else(|| Error::not_found("Profile not found"))?;
    let mut out = json!({});
    if let Some(d) = row.displayname {
        out["displayname"] = d.into();
    }
    if let Some(a) = row.avatar_url {
        out["avatar_url"] = a.into();
    }
    json(&out)
}

fn profile_field(req: &Req) -> Result<&'static str> {
    match param(req, "field")?.as_str() {
        "displayname" => Ok("displayname"),
        "avatar_url" => Ok("avatar_url"),
        _ => Err(Error::unrecognized("Unknown profile field")),
    }
}

/// # `GET /_matrix/client/v3/profile/{userId}/{keyName}`
pub async fn get_profile_field(req: Req) -> Result<Response> {
    let u = user_param(&req)?;
    let field = profile_field(&req)?;
    let row = req
        .state()
        .store
        .read(move |c| q::get_user(c, u.as_str()))
        .await?
        .ok_or_else(|| Error::not_found("Profile not found"))?;
    let value = if field == "displayname" {
        row.displayname
    } else {
        row.avatar_url
    };
    let value = value.ok_or_else(|| Error::not_found("Profile field not set"))?;
    json(&json!({ field: value }))
}

/// # `PUT /_matrix/client/v3/profile/{userId}/{keyName}`
///
/// The new profile is copied into a fresh member event in every joined room, in the same
/// commit as the profile itself.
pub async fn set_profile_field(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    own(&req, &who)?;
    let field = profile_field(&req)?;
    let body = body_json(&mut req).await?;
    let value = match body.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 256 || field == "avatar_url" => Some(s.clone()),
        Some(Value::String(_)) => return Err(Error::invalid_param("Display name too long")),
        Some(_) => return Err(Error::bad_json(format!("{field} must be a string"))),
    };
    let local = req.state().local.clone();
    let uid = who.user_id.clone();
    req.state()
        .store
        .write(move |tx| {
            let row = q::get_user(tx, uid.as_str())?
                .ok_or_else(|| Error::not_found("Profile not found"))?;
            let (d, a) = if field == "displayname" {
                (value.clone(), row.avatar_url)
            } else {
                (row.displayname, value.clone())
            };
            q::update_profile(tx, uid.as_str(), d.as_deref(), a.as_deref())?;
            for (room, membership, _) in q::list_user_rooms(tx, uid.as_str())? {
                if membership != "join" {
                    continue;
                }
                let mut content = json!({ "membership": "join" });
                if let Some(d) = &d {
                    content["displayname"] = d.clone().into();
                }
                if let Some(a) = &a {
                    content["avatar_url"] = a.clone().into();
                }
                let rid = OwnedRoomId::try_from(room).map_err(Error::internal)?;
                build::send(
                    tx,
                    &local,
                    &rid,
                    &uid,
                    NewEvent::state("m.room.member", uid.as_str(), content),
                    None,
                )?;
            }
            Ok(())
        })
        .await?;
    json(&json!({}))
}

// ---------------------------------------------------------------- account data

fn put_account_data_tx(
    tx: &mut Tx<'_>,
    user: &str,
    room: &str,
    kind: &str,
    content: &Value,
) -> Result<()> {
    let pos = tx.next_pos([Topic::user(user)]);
    q::upsert_account_data(tx, user, room, kind, &content.to_string(), pos)
}

async fn get_ad(req: &Req, room: Option<OwnedRoomId>) -> Result<Response> {
    let who = auth(req).await?;
    own(req, &who)?;
    let kind = param(req, "type")?;
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

async fn put_ad(req: &mut Req, room: Option<OwnedRoomId>) -> Result<Response> {
    let who = auth(req).await?;
    own(req, &who)?;
    let kind = param(req, "type")?;
    if kind == "m.fully_read" || kind == "m.push_rules" {
        return Err(Error::new(
            405,
            "M_BAD_JSON",
            format!("Cannot set {kind} through this API"),
        ));
    }
    let content = body_json(req).await?;
    let (u, r) = (
        who.user_id.to_string(),
        room.map(|r| r.to_string()).unwrap_or_default(),
    );
    req.state()
        .store
        .write(move |tx| put_account_data_tx(tx, &u, &r, &kind, &content))
        .await?;
    json(&json!({}))
}

/// # `GET /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn get_account_data(req: Req) -> Result<Response> {
    get_ad(&req, None).await
}

/// # `PUT /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn put_account_data(mut req: Req) -> Result<Response> {
    put_ad(&mut req, None).await
}

/// # `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn get_room_account_data(req: Req) -> Result<Response> {
    let room = room_param(&req)?;
    get_ad(&req, Some(room)).await
}

/// # `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn put_room_account_data(mut req: Req) -> Result<Response> {
    let room = room_param(&req)?;
    put_ad(&mut req, Some(room)).await
}

// ---------------------------------------------------------------- typing, receipts

/// # `PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}`
pub async fn typing(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    own(&req, &who)?;
    let room = room_param(&req)?;
    let body = body_json(&mut req).await?;
    let is_typing = body
        .get("typing")
        .and_then(Value::as_bool)
        .ok_or_else(|| Error::bad_json("typing is required"))?;
    let timeout = body
        .get("timeout")
        .and_then(Value::as_u64)
        .unwrap_or(30_000)
        .min(120_000);
    let app = req.state().clone();
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
    let until = is_typing.then(|| app.clock.now_ms() + timeout);
    app.typing.set(room.as_str(), who.user_id.as_str(), until);
    json(&json!({}))
}

/// Stores a receipt (one write); `m.read.private` is visible only to its owner.
async fn store_receipt(
    req: &Req,
    who: &Authed,
    room: &OwnedRoomId,
    kind: &str,
    event_id: &str,
    thread: &str,
) -> Result<()> {
    let (r, u, k, e, t) = (
        room.to_string(),
        who.user_id.to_string(),
        kind.to_owned(),
        event_id.to_owned(),
        thread.to_owned(),
    );
    req.state()
        .store
        .write(move |tx| {
            if q::get_membership(tx, &r, &u)?.as_deref() != Some("join") {
                return Err(Error::forbidden("You are not joined to this room"));
            }
            if q::get_event_room(tx, &e)?.as_deref() != Some(r.as_str()) {
                return Err(Error::not_found("Event not found in this room"));
            }
            if k == "m.fully_read" {
                return put_account_data_tx(tx, &u, &r, "m.fully_read", &json!({ "event_id": e }));
            }
            let pos = tx.next_pos([Topic::room(r.as_str())]);
            q::upsert_receipt(tx, &r, &k, &u, &t, &e, tx.now_ms, pos)
        })
        .await
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}`
pub async fn receipt(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let room = room_param(&req)?;
    let kind = param(&req, "receipt_type")?;
    if !matches!(kind.as_str(), "m.read" | "m.read.private" | "m.fully_read") {
        return Err(Error::invalid_param("Unknown receipt type"));
    }
    let event_id = OwnedEventId::try_from(param(&req, "event_id")?)
        .map_err(|e| Error::invalid_param(format!("event ID: {e}")))?;
    let body = body_json(&mut req).await?;
    let thread = body
        .get("thread_id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    store_receipt(&req, &who, &room, &kind, event_id.as_str(), &thread).await?;
    json(&json!({}))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/read_markers`
pub async fn read_markers(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let room = room_param(&req)?;
    let body = body_json(&mut req).await?;
    for key in ["m.fully_read", "m.read", "m.read.private"] {
        if let Some(e) = body.get(key).and_then(Value::as_str) {
            let id = OwnedEventId::try_from(e)
                .map_err(|e| Error::invalid_param(format!("{key}: {e}")))?;
            store_receipt(&req, &who, &room, key, id.as_str(), "").await?;
        }
    }
    json(&json!({}))
}

// ---------------------------------------------------------------- push rules

/// Stores the default rule set (ruma's) for a new user.
pub fn init_push_rules(tx: &mut Tx<'_>, user: &UserId) -> Result<()> {
    let rules = Ruleset::server_default(user);
    put_account_data_tx(
        tx,
        user.as_str(),
        "",
        "m.push_rules",
        &json!({ "global": rules }),
    )
}

fn load_rules(conn: &rusqlite::Connection, user: &UserId) -> Result<Ruleset> {
    match q::get_account_data(conn, user.as_str(), "", "m.push_rules")? {
        Some(s) => {
            let v: Value = serde_json::from_str(&s)?;
            serde_json::from_value(v["global"].clone()).map_err(Error::internal)
        }
        None => Ok(Ruleset::server_default(user)),
    }
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
            put_account_data_tx(
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
pub async fn get_push_rules(req: Req) -> Result<Response> {
    json(&json!({ "global": rules_json(&req).await? }))
}

/// # `GET /_matrix/client/v3/pushrules/global/`
pub async fn get_push_rules_global(req: Req) -> Result<Response> {
    json(&rules_json(&req).await?)
}

fn rule_kind(req: &Req) -> Result<RuleKind> {
    match param(req, "kind")?.as_str() {
        "override" => Ok(RuleKind::Override),
        "underride" => Ok(RuleKind::Underride),
        "sender" => Ok(RuleKind::Sender),
        "room" => Ok(RuleKind::Room),
        "content" => Ok(RuleKind::Content),
        _ => Err(Error::invalid_param("Unknown push rule kind")),
    }
}

async fn find_rule(req: &Req) -> Result<Value> {
    let kind = param(req, "kind")?;
    rule_kind(req)?;
    let id = param(req, "rule_id")?;
    let all = rules_json(req).await?;
    all.get(&kind)
        .and_then(Value::as_array)
        .and_then(|list| list.iter().find(|r| r["rule_id"] == id.as_str()))
        .cloned()
        .ok_or_else(|| Error::not_found("Push rule not found"))
}

/// # `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn get_push_rule(req: Req) -> Result<Response> {
    json(&find_rule(&req).await?)
}

/// # `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn put_push_rule(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let kind = rule_kind(&req)?;
    let id = param(&req, "rule_id")?;
    let body = body_json(&mut req).await?;
    let get = |k: &str| {
        req.url()
            .query_pairs()
            .find(|(q, _)| q == k)
            .map(|(_, v)| v.into_owned())
    };
    let (before, after) = (get("before"), get("after"));
    let actions: Vec<Action> =
        serde_json::from_value(body.get("actions").cloned().unwrap_or(json!([])))
            .map_err(|e| Error::bad_json(format!("actions: {e}")))?;
    let rule = match kind {
        RuleKind::Override | RuleKind::Underride => {
            let conditions: Vec<PushCondition> =
                serde_json::from_value(body.get("conditions").cloned().unwrap_or(json!([])))
                    .map_err(|e| Error::bad_json(format!("conditions: {e}")))?;
            let r = NewConditionalPushRule::new(id, conditions, actions);
            if kind == RuleKind::Override {
                NewPushRule::Override(r)
            } else {
                NewPushRule::Underride(r)
            }
        }
        RuleKind::Content => {
            let pattern = body
                .get("pattern")
                .and_then(Value::as_str)
                .ok_or_else(|| Error::bad_json("pattern is required"))?;
            NewPushRule::Content(NewPatternedPushRule::new(id, pattern.to_owned(), actions))
        }
        RuleKind::Room => NewPushRule::Room(NewSimplePushRule::new(
            OwnedRoomId::try_from(id).map_err(|e| Error::invalid_param(e.to_string()))?,
            actions,
        )),
        RuleKind::Sender => NewPushRule::Sender(NewSimplePushRule::new(
            UserId::parse(id).map_err(|e| Error::invalid_param(e.to_string()))?,
            actions,
        )),
        _ => return Err(Error::invalid_param("Unknown push rule kind")),
    };
    update_rules(&req, &who, move |rules| {
        rules
            .insert(rule, after.as_deref(), before.as_deref())
            .map_err(|e| Error::bad_json(e.to_string()))
    })
    .await?;
    json(&json!({}))
}

/// # `DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn delete_push_rule(req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let kind = rule_kind(&req)?;
    let id = param(&req, "rule_id")?;
    update_rules(&req, &who, move |rules| {
        rules
            .remove(kind, &id)
            .map_err(|e| Error::not_found(e.to_string()))
    })
    .await?;
    json(&json!({}))
}

/// # `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/{attr}`
pub async fn get_push_rule_attr(req: Req) -> Result<Response> {
    let attr = param(&req, "attr")?;
    let rule = find_rule(&req).await?;
    match attr.as_str() {
        "enabled" => json(&json!({ "enabled": rule["enabled"] })),
        "actions" => json(&json!({ "actions": rule["actions"] })),
        _ => Err(Error::unrecognized("Unknown push rule attribute")),
    }
}

/// # `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/{attr}`
pub async fn put_push_rule_attr(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let kind = rule_kind(&req)?;
    let id = param(&req, "rule_id")?;
    let attr = param(&req, "attr")?;
    let body = body_json(&mut req).await?;
    match attr.as_str() {
        "enabled" => {
            let enabled = body
                .get("enabled")
                .and_then(Value::as_bool)
                .ok_or_else(|| Error::bad_json("enabled is required"))?;
            update_rules(&req, &who, move |r| {
                r.set_enabled(kind, &id, enabled)
                    .map_err(|e| Error::not_found(e.to_string()))
            })
            .await?;
        }
        "actions" => {
            let actions: Vec<Action> =
                serde_json::from_value(body.get("actions").cloned().unwrap_or(Value::Null))
                    .map_err(|e| Error::bad_json(format!("actions: {e}")))?;
            update_rules(&req, &who, move |r| {
                r.set_actions(kind, &id, actions)
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
    let body = body_json(&mut req).await?;
    let term = body
        .get("search_term")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::bad_json("search_term is required"))?
        .to_lowercase();
    let limit = body
        .get("limit")
        .and_then(Value::as_u64)
        .unwrap_or(10)
        .clamp(1, 100) as usize;
    let me = who.user_id.to_string();
    let (results, limited) = req
        .state()
        .store
        .read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT DISTINCT u.user_id, u.displayname, u.avatar_url
                 FROM users u JOIN current_state m ON m.type = 'm.room.member' AND m.state_key = u.user_id AND m.membership = 'join'
                 WHERE u.deactivated = 0
                   AND (m.room_id IN (SELECT room_id FROM current_state WHERE type = 'm.room.member' AND state_key = ?1 AND membership = 'join')
                        OR m.room_id IN (SELECT room_id FROM rooms WHERE is_public = 1))
                   AND (instr(lower(u.user_id), ?2) > 0 OR instr(lower(coalesce(u.displayname, '')), ?2) > 0)
                 ORDER BY u.user_id LIMIT ?3",
            )?;
            let rows = stmt.query_map(rusqlite::params![me, term, limit as i64 + 1], |r| {
                Ok(json!({ "user_id": r.get::<_, String>(0)?, "display_name": r.get::<_, Option<String>>(1)?, "avatar_url": r.get::<_, Option<String>>(2)? }))
            })?;
            let mut all: Vec<Value> = rows.collect::<rusqlite::Result<_>>()?;
            let limited = all.len() > limit;
            all.truncate(limit);
            Ok((all, limited))
        })
        .await?;
    json(&json!({ "results": results, "limited": limited }))
}

/// # `GET /_matrix/client/v3/pushers`
///
/// Hearth does not deliver push notifications to push gateways yet, so it stores no pushers
/// (`POST /pushers/set` is not offered) and the list is truthfully empty.
pub async fn pushers(req: Req) -> Result<Response> {
    auth(&req).await?;
    json(&json!({ "pushers": [] }))
}
