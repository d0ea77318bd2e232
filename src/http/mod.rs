//! The HTTP layer: the route table, the request helpers every handler uses, and the
//! handlers, one file per area of the Client-Server API.
//!
//! A handler is `async fn(Req) -> Result<Response>`; `h(...)` turns it into a tide endpoint
//! that maps errors to Matrix JSON, and `c(...)` does the same for **cancellable** routes:
//! the handler future is dropped if the client disconnects (see `server::ConnWatch`) or the
//! server shuts down. Writes are never marked `c`.

pub mod account;
pub mod backup;
pub mod events;
pub mod federation;
pub mod keys;
pub mod knock;
pub mod media;
pub mod misc;
pub mod presence;
pub mod push;
pub mod rooms;
pub mod search;
pub mod summary;
pub mod sync;
pub mod to_device;
pub mod user;
pub mod voip;

use std::{future::Future, sync::atomic::Ordering};

use futures_lite::{AsyncReadExt, FutureExt};
use percent_encoding::percent_decode_str;
use ruma::{
    api::{
        error::{DeserializationError, FromHttpRequestError},
        IncomingRequest, IncomingRequestExt,
    },
    OwnedDeviceId, OwnedUserId,
};
use serde::Serialize;
use tide::{Response, StatusCode};

use crate::{
    error::{Error, Result},
    server::{Cancelled, ClientAddr, ConnWatch},
    util::{check_id_len, hash_token},
    App,
};

pub type Req = tide::Request<App>;

/// The JSON error response for `e`.
pub fn error_response(e: &Error) -> Response {
    let status = StatusCode::try_from(e.status).unwrap_or(StatusCode::InternalServerError);
    let mut res = Response::new(status);
    res.set_body(tide::Body::from_json(&e.to_json()).unwrap_or_else(|_| tide::Body::from("{}")));
    res.set_content_type(tide::http::mime::JSON);
    res
}

/// A 200 with a JSON body.
pub fn json<T: Serialize>(v: &T) -> Result<Response> {
    let body = serde_json::to_vec(v)?;
    let mut res = Response::new(StatusCode::Ok);
    res.set_body(body);
    res.set_content_type(tide::http::mime::JSON);
    Ok(res)
}

/// A non-cancellable endpoint: once started it runs to its end even if the client leaves.
pub fn h<F, Fut>(f: F) -> impl tide::Endpoint<App>
where
    F: Fn(Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response>> + Send + 'static,
{
    move |req: Req| {
        let fut = f(req);
        async move { Ok::<_, tide::Error>(fut.await.unwrap_or_else(|e| error_response(&e))) }
    }
}

/// A cancellable endpoint: the handler is dropped at its current `.await` when the client
/// disconnects or the server shuts down. Only for handlers without side effects (reads and
/// long-polls), or whose side effects are shielded.
pub fn c<F, Fut>(f: F) -> impl tide::Endpoint<App>
where
    F: Fn(Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response>> + Send + 'static,
{
    move |req: Req| {
        let watch = req.ext::<ConnWatch>().cloned();
        let app = req.state().clone();
        let fut = f(req);
        async move {
            let handler = async { Some(fut.await) };
            let gone = async {
                match &watch {
                    Some(w) => w.closed().or(app.shutdown.wait()).await,
                    None => app.shutdown.wait().await,
                }
                None
            };
            match handler.or(gone).await {
                Some(out) => Ok::<_, tide::Error>(out.unwrap_or_else(|e| error_response(&e))),
                None => {
                    app.metrics.cancelled_total.fetch_add(1, Ordering::SeqCst);
                    let mut res = Response::new(StatusCode::RequestTimeout);
                    res.insert_ext(Cancelled);
                    Ok(res)
                }
            }
        }
    }
}

/// A path parameter, percent-decoded. Every path parameter is an ID, an event type, a state
/// key, a transaction ID or a short name, so all are held to the spec's 255-byte limit here,
/// the one place every handler (and [`ruma_req`]) takes them from.
pub fn param(req: &Req, name: &str) -> Result<String> {
    let raw = req
        .param(name)
        .map_err(|_| Error::missing_param(format!("missing path parameter {name}")))?;
    let s = percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| Error::invalid_param(format!("path parameter {name} is not UTF-8")))?;
    check_id_len(&format!("path parameter {name}"), &s, Error::invalid_param)?;
    Ok(s)
}

/// Reads the body, refusing more than `max_request_bytes`.
pub async fn body_bytes(req: &mut Req) -> Result<Vec<u8>> {
    let max = req.state().config.max_request_bytes;
    if req.len().is_some_and(|l| l > max) {
        return Err(Error::too_large("Request body too large"));
    }
    let mut buf = Vec::new();
    let body = req.take_body();
    body.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| Error::bad_json(format!("reading body: {e}")))?;
    if buf.len() > max {
        return Err(Error::too_large("Request body too large"));
    }
    Ok(buf)
}

/// Checks a raw body: empty (or only whitespace) is `None`; otherwise it must be UTF-8 and
/// JSON (`M_NOT_JSON`) and an object (`M_BAD_JSON`).
fn parse_body(buf: &[u8]) -> Result<Option<serde_json::Value>> {
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let text = std::str::from_utf8(buf)
        .map_err(|e| Error::not_json(format!("Content not JSON: not UTF-8: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::not_json(format!("Content not JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::bad_json("Content must be a JSON object"));
    }
    Ok(Some(v))
}

/// The body as a JSON object (empty body = `{}`), with `M_NOT_JSON` for non-JSON and
/// `M_BAD_JSON` for JSON that is not an object. The client handlers use [`ruma_req`] (free-form
/// bodies: [`ruma_req_with_body`]); this is for endpoints ruma has no type for.
pub async fn body_json(req: &mut Req) -> Result<serde_json::Value> {
    let buf = body_bytes(req).await?;
    Ok(parse_body(&buf)?.unwrap_or_else(|| serde_json::json!({})))
}

/// Parses the request into ruma's typed request for the endpoint (path params by name, in
/// the order the endpoint's path declares them), so validation of IDs, query strings and
/// bodies is ruma's, not ours. Errors: a body that is not UTF-8 or not JSON is `M_NOT_JSON`;
/// JSON of the wrong shape (a wrong type, a missing field, an invalid ID) is `M_BAD_JSON`;
/// a bad path or query parameter is `M_INVALID_PARAM`; a path parameter over 255 bytes is
/// refused by [`param`]. Ruma parses unknown enum strings into `_Custom` variants: handlers
/// reject those with [`known_body`] / [`known_query`].
pub async fn ruma_req<R: IncomingRequest>(req: &mut Req, params: &[&str]) -> Result<R> {
    Ok(ruma_req_with_body(req, params).await?.0)
}

/// [`ruma_req`], also returning the body as JSON (`{}` when empty) for the checks ruma's
/// types leave open (a `Raw` field's shape).
pub async fn ruma_req_with_body<R: IncomingRequest>(
    req: &mut Req,
    params: &[&str],
) -> Result<(R, serde_json::Value)> {
    ruma_req_inner(req, params, None::<fn(&mut serde_json::Value)>).await
}

/// [`ruma_req_with_body`] after `fix` has adjusted the (object) body: for the few places where
/// ruma's type is stricter than what clients send and Synapse accepts (each caller says which).
pub async fn ruma_req_compat<R: IncomingRequest>(
    req: &mut Req,
    params: &[&str],
    fix: impl FnOnce(&mut serde_json::Value),
) -> Result<(R, serde_json::Value)> {
    ruma_req_inner(req, params, Some(fix)).await
}

/// The tide request as an `http::Request` with `body`: what ruma's parsers (and X-Matrix
/// verification) take.
pub fn http_request<B>(req: &Req, body: B) -> Result<http::Request<B>> {
    let url = req.url();
    let uri = match url.query() {
        Some(q) => format!("{}?{}", url.path(), q),
        None => url.path().to_owned(),
    };
    let mut builder = http::Request::builder()
        .method(req.method().as_ref())
        .uri(uri);
    for (name, values) in req.iter() {
        for v in values.iter() {
            builder = builder.header(name.as_str(), v.as_str());
        }
    }
    builder
        .body(body)
        .map_err(|e| Error::invalid_param(format!("bad request: {e}")))
}

/// The Matrix error for a request ruma's parser refused.
pub fn parse_error(e: FromHttpRequestError) -> Error {
    match e {
        FromHttpRequestError::Deserialization(d) => match d {
            DeserializationError::Utf8(e) => Error::not_json(format!("Content not JSON: {e}")),
            DeserializationError::Json(e) => Error::bad_json(e.to_string()),
            // Path parameters are deserialised with the query's error type.
            DeserializationError::Query(e) => Error::invalid_param(e.to_string()),
            DeserializationError::Ident(e) => Error::invalid_param(e.to_string()),
            DeserializationError::Header(e) => Error::invalid_param(e.to_string()),
            e => Error::bad_json(e.to_string()),
        },
        e => Error::unrecognized(e.to_string()),
    }
}

async fn ruma_req_inner<R: IncomingRequest>(
    req: &mut Req,
    params: &[&str],
    fix: Option<impl FnOnce(&mut serde_json::Value)>,
) -> Result<(R, serde_json::Value)> {
    // A name ending in `?` is a parameter some of the endpoint's routes lack (the state key
    // of `/state/{type}`): it is left out of the arguments when absent.
    let args = params
        .iter()
        .filter_map(|p| match p.strip_suffix('?') {
            Some(name) if req.param(name).is_err() => None,
            Some(name) => Some(param(req, name)),
            None => Some(param(req, p)),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut body = body_bytes(req).await?;
    let parsed = parse_body(&body)?;
    let empty = parsed.is_none();
    let mut json = parsed.unwrap_or_else(|| serde_json::json!({}));
    let fixed = fix.is_some();
    if let Some(fix) = fix {
        fix(&mut json);
    }
    if empty || fixed {
        // An empty (or whitespace) body is `{}`, as ruma's generated parsers read it; the
        // hand-written ones (state events, push rules) get the same.
        body = serde_json::to_vec(&json)?;
    }
    let http_req = http_request(req, &body[..])?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let parsed = R::try_from_http_request(http_req, &args).map_err(parse_error)?;
    Ok((parsed, json))
}

/// Rejects an enum value from a body that ruma kept as its catch-all `_Custom` variant:
/// `value` must be one of `allowed` (`M_BAD_JSON` otherwise).
pub fn known_body(field: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(Error::bad_json(format!(
        "Unknown {field} {value:?}: expected one of {allowed:?}"
    )))
}

/// Like [`known_body`], for a query parameter (`M_INVALID_PARAM`).
pub fn known_query(field: &str, value: &str, allowed: &[&str]) -> Result<()> {
    known_body(field, value, allowed).map_err(|e| e.with_status(400, "M_INVALID_PARAM"))
}

/// The authenticated caller.
#[derive(Clone, Debug)]
pub struct Authed {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub token_hash: String,
}

fn access_token(req: &Req) -> Option<String> {
    if let Some(h) = req.header("Authorization") {
        let v = h.last().as_str();
        return v.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    req.url()
        .query_pairs()
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v.into_owned())
}

/// Resolves the access token (header or query) to a user and device, through the cache.
pub async fn auth(req: &Req) -> Result<Authed> {
    let token = access_token(req).ok_or_else(|| Error::missing_token("Missing access token"))?;
    auth_token(req.state(), &token).await
}

/// Resolves an access token to a user and device, through the cache. A token revoked while
/// this runs is never cached (see [`crate::ephemeral::TokenCache`]).
pub async fn auth_token(app: &App, token: &str) -> Result<Authed> {
    let hash = hash_token(token);
    let who = match app.tokens.get(&hash) {
        Some(w) => Some(w),
        None => {
            // Taken before the read: a revocation committed after this point moves it.
            let generation = app.tokens.generation();
            let h = hash.clone();
            let found = app
                .store
                .read(move |c| crate::store::queries::get_token(c, &h))
                .await?;
            if let Some(w) = &found {
                app.tokens
                    .insert_if_unchanged(generation, hash.clone(), w.clone());
            }
            found
        }
    };
    let (user, device) = who.ok_or_else(|| Error::unknown_token("Unrecognised access token"))?;
    Ok(Authed {
        user_id: OwnedUserId::try_from(user).map_err(Error::internal)?,
        device_id: OwnedDeviceId::from(device),
        token_hash: hash,
    })
}

/// The base of every absolute URL Hearth gives out (no trailing `/`): `public_baseurl` if
/// configured; otherwise `https` when Hearth serves TLS itself, else `http`, with the host (and
/// port) the request was sent to, or the server name.
pub fn base_url(req: &Req) -> String {
    let config = &req.state().config;
    if let Some(base) = config.public_base() {
        return base.to_owned();
    }
    let scheme = if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let url = req.url();
    let host = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        (None, _) => req.state().server_name.to_string(),
    };
    format!("{scheme}://{host}")
}

/// The client's address, for per-IP rate limits: the TCP peer, or what a trusted proxy says
/// (see [`crate::proxy`]; computed once per request by the server).
pub fn peer_ip(req: &Req) -> String {
    if let Some(ClientAddr(ip)) = req.ext::<ClientAddr>() {
        return ip.to_string();
    }
    req.ext::<ConnWatch>()
        .map(|w| w.peer.ip().to_string())
        .unwrap_or_default()
}

/// Registers a handler under both `/_matrix/client/v3/...` and the legacy `r0` prefix that
/// some clients still use.
macro_rules! client {
    ($s:expr, $method:ident $path:literal => $ep:expr) => {{
        $s.at(concat!("/_matrix/client/v3", $path)).$method($ep);
        $s.at(concat!("/_matrix/client/r0", $path)).$method($ep);
    }};
}

/// The route table. `c(..)` marks a cancellable route; `h(..)` one that runs to completion.
pub fn routes(app: App) -> tide::Server<App> {
    let mut s = tide::with_state(app);
    s.at("/_matrix/client/versions").get(c(misc::versions));
    s.at("/_hearth/metrics").get(c(misc::metrics));
    s.at("/_hearth/health").get(h(misc::health));
    s.at("/.well-known/matrix/server")
        .get(c(misc::well_known_server));
    s.at("/.well-known/matrix/client")
        .get(c(misc::well_known_client));
    client!(s, get "/capabilities" => c(misc::capabilities));

    // federation (reads cancellable like the client reads)
    s.at("/_matrix/key/v2/server")
        .get(c(federation::keys::server_keys));
    s.at("/_matrix/federation/v1/version")
        .get(c(federation::keys::version));
    s.at("/_matrix/key/v2/query")
        .post(c(federation::keys::query_keys));
    s.at("/_matrix/key/v2/query/:server_name")
        .get(c(federation::keys::query_server_keys));
    s.at("/_matrix/federation/v1/query/profile")
        .get(c(federation::query::profile));
    s.at("/_matrix/federation/v1/user/keys/query")
        .post(c(federation::user::keys_query));
    s.at("/_matrix/federation/v1/user/keys/claim")
        .post(h(federation::user::keys_claim));
    s.at("/_matrix/federation/v1/user/devices/:user_id")
        .get(c(federation::user::devices));
    s.at("/_matrix/federation/v1/query/directory")
        .get(c(federation::directory::query_directory));
    s.at("/_matrix/federation/v1/publicRooms")
        .get(c(federation::directory::public_rooms));
    s.at("/_matrix/federation/v1/publicRooms")
        .post(c(federation::directory::public_rooms_filtered));
    s.at("/_matrix/federation/v1/hierarchy/:room_id")
        .get(c(federation::hierarchy::hierarchy));
    s.at("/_matrix/federation/v1/event/:event_id")
        .get(c(federation::events::get_event));
    s.at("/_matrix/federation/v1/state_ids/:room_id")
        .get(c(federation::events::state_ids));
    s.at("/_matrix/federation/v1/state/:room_id")
        .get(c(federation::events::state));
    s.at("/_matrix/federation/v1/event_auth/:room_id/:event_id")
        .get(c(federation::events::event_auth));
    s.at("/_matrix/federation/v1/get_missing_events/:room_id")
        .post(c(federation::events::get_missing_events));
    s.at("/_matrix/federation/v1/backfill/:room_id")
        .get(c(federation::events::backfill));
    s.at("/_matrix/federation/v1/make_join/:room_id/:user_id")
        .get(c(federation::membership::make_join));
    s.at("/_matrix/federation/v2/send_join/:room_id/:event_id")
        .put(h(federation::membership::send_join_v2));
    s.at("/_matrix/federation/v1/send/:transaction_id")
        .put(h(federation::transactions::send));
    s.at("/_matrix/federation/v2/invite/:room_id/:event_id")
        .put(h(federation::membership::invite_v2));
    s.at("/_matrix/federation/v1/make_leave/:room_id/:user_id")
        .get(c(federation::membership::make_leave));
    s.at("/_matrix/federation/v2/send_leave/:room_id/:event_id")
        .put(h(federation::membership::send_leave_v2));

    // knock (client and federation)
    client!(s, post "/knock/:room" => h(knock::knock));
    s.at("/_matrix/federation/v1/make_knock/:room_id/:user_id")
        .get(c(federation::knock::make_knock));
    s.at("/_matrix/federation/v1/send_knock/:room_id/:event_id")
        .put(h(federation::knock::send_knock));

    // account and session
    client!(s, get "/login" => c(account::login_flows));
    client!(s, post "/login" => h(account::login));
    client!(s, post "/register" => h(account::register));
    client!(s, get "/register/available" => c(account::register_available));
    client!(s, post "/logout" => h(account::logout));
    client!(s, post "/logout/all" => h(account::logout_all));
    client!(s, get "/account/whoami" => c(account::whoami));
    client!(s, post "/account/password" => h(account::change_password));
    client!(s, get "/account/3pid" => c(account::threepids));
    client!(s, get "/devices" => c(account::list_devices));
    client!(s, get "/devices/:device_id" => c(account::get_device));
    client!(s, put "/devices/:device_id" => h(account::update_device));
    client!(s, delete "/devices/:device_id" => h(account::delete_device));
    client!(s, post "/delete_devices" => h(account::delete_devices));

    // rooms
    client!(s, post "/createRoom" => h(rooms::create_room));
    client!(s, post "/join/:room" => h(rooms::join_by_id_or_alias));
    client!(s, post "/rooms/:room_id/join" => h(rooms::join_by_id));
    client!(s, post "/rooms/:room_id/leave" => h(rooms::leave));
    client!(s, post "/rooms/:room_id/forget" => h(rooms::forget));
    client!(s, post "/rooms/:room_id/invite" => h(rooms::invite));
    client!(s, post "/rooms/:room_id/kick" => h(rooms::kick));
    client!(s, post "/rooms/:room_id/ban" => h(rooms::ban));
    client!(s, post "/rooms/:room_id/unban" => h(rooms::unban));
    client!(s, get "/joined_rooms" => c(rooms::joined_rooms));
    client!(s, get "/directory/room/:alias" => c(rooms::get_alias));
    client!(s, put "/directory/room/:alias" => h(rooms::put_alias));
    client!(s, delete "/directory/room/:alias" => h(rooms::delete_alias));
    client!(s, get "/rooms/:room_id/aliases" => c(rooms::room_aliases));
    client!(s, get "/directory/list/room/:room_id" => c(rooms::get_visibility));
    client!(s, put "/directory/list/room/:room_id" => h(rooms::set_visibility));
    client!(s, get "/publicRooms" => c(rooms::public_rooms));
    s.at("/_matrix/client/v1/room_summary/:room")
        .get(c(summary::summary));
    s.at("/_matrix/client/unstable/im.nheko.summary/rooms/:room/summary")
        .get(c(summary::summary));
    s.at("/_matrix/client/unstable/im.nheko.summary/summary/:room")
        .get(c(summary::summary));
    client!(s, post "/publicRooms" => c(rooms::public_rooms));

    // events
    client!(s, put "/rooms/:room_id/send/:event_type/:txn_id" => h(events::send_message));
    client!(s, put "/rooms/:room_id/state/:event_type" => h(events::put_state));
    client!(s, put "/rooms/:room_id/state/:event_type/" => h(events::put_state));
    client!(s, put "/rooms/:room_id/state/:event_type/:state_key" => h(events::put_state));
    client!(s, get "/rooms/:room_id/state" => c(events::get_state_all));
    client!(s, get "/rooms/:room_id/state/:event_type" => c(events::get_state));
    client!(s, get "/rooms/:room_id/state/:event_type/" => c(events::get_state));
    client!(s, get "/rooms/:room_id/state/:event_type/:state_key" => c(events::get_state));
    client!(s, put "/rooms/:room_id/redact/:event_id/:txn_id" => h(events::redact));
    client!(s, get "/rooms/:room_id/messages" => c(events::messages));
    client!(s, get "/rooms/:room_id/members" => c(events::members));
    client!(s, get "/rooms/:room_id/joined_members" => c(events::joined_members));
    client!(s, get "/rooms/:room_id/event/:event_id" => c(events::get_event));
    client!(s, get "/rooms/:room_id/context/:event_id" => c(events::context));

    client!(s, post "/user_directory/search" => c(user::search_users));

    // search and TURN (issue 13)
    client!(s, post "/search" => c(search::search));
    client!(s, get "/voip/turnServer" => c(voip::turn_server));

    // sync
    client!(s, get "/sync" => c(sync::sync));
    client!(s, post "/user/:user_id/filter" => h(user::create_filter));
    client!(s, get "/user/:user_id/filter/:filter_id" => c(user::get_filter));

    // profile, account data, ephemeral, push rules
    client!(s, get "/profile/:user_id" => c(user::get_profile));
    client!(s, get "/profile/:user_id/:field" => c(user::get_profile_field));
    client!(s, put "/profile/:user_id/:field" => h(user::set_profile_field));
    client!(s, get "/user/:user_id/account_data/:type" => c(user::get_account_data));
    client!(s, put "/user/:user_id/account_data/:type" => h(user::put_account_data));
    client!(s, get "/user/:user_id/rooms/:room_id/account_data/:type" => c(user::get_room_account_data));
    client!(s, put "/user/:user_id/rooms/:room_id/account_data/:type" => h(user::put_room_account_data));
    client!(s, put "/rooms/:room_id/typing/:user_id" => h(user::typing));
    client!(s, post "/rooms/:room_id/receipt/:receipt_type/:event_id" => h(user::receipt));
    client!(s, post "/rooms/:room_id/read_markers" => h(user::read_markers));
    client!(s, get "/pushrules/" => c(user::get_push_rules));
    client!(s, get "/pushrules" => c(user::get_push_rules));
    client!(s, get "/pushrules/global/" => c(user::get_push_rules_global));
    client!(s, get "/pushrules/global" => c(user::get_push_rules_global));
    client!(s, get "/pushrules/global/:kind/:rule_id" => c(user::get_push_rule));
    client!(s, put "/pushrules/global/:kind/:rule_id" => h(user::put_push_rule));
    client!(s, delete "/pushrules/global/:kind/:rule_id" => h(user::delete_push_rule));
    client!(s, get "/pushrules/global/:kind/:rule_id/:attr" => c(user::get_push_rule_attr));
    client!(s, put "/pushrules/global/:kind/:rule_id/:attr" => h(user::put_push_rule_attr));

    // presence
    client!(s, put "/presence/:user_id/status" => h(presence::put_status));
    client!(s, get "/presence/:user_id/status" => c(presence::get_status));
    // push: notifications and pushers
    client!(s, get "/notifications" => c(push::notifications));
    client!(s, get "/pushers" => c(push::pushers));
    client!(s, post "/pushers/set" => h(push::set_pusher));

    // end-to-end encryption: keys, cross-signing, to-device messages, key backup
    client!(s, post "/keys/upload" => h(keys::upload));
    client!(s, post "/keys/query" => c(keys::query));
    client!(s, post "/keys/claim" => h(keys::claim));
    client!(s, get "/keys/changes" => c(keys::changes));
    client!(s, post "/keys/device_signing/upload" => h(keys::upload_signing_keys));
    client!(s, post "/keys/signatures/upload" => h(keys::upload_signatures));
    client!(s, put "/sendToDevice/:event_type/:txn_id" => h(to_device::send));
    client!(s, post "/room_keys/version" => h(backup::create_version));
    client!(s, get "/room_keys/version" => c(backup::get_latest_version));
    client!(s, get "/room_keys/version/:version" => c(backup::get_version));
    client!(s, put "/room_keys/version/:version" => h(backup::update_version));
    client!(s, delete "/room_keys/version/:version" => h(backup::delete_version));
    client!(s, get "/room_keys/keys" => c(backup::get_all));
    client!(s, put "/room_keys/keys" => h(backup::put_all));
    client!(s, delete "/room_keys/keys" => h(backup::delete_all));
    client!(s, get "/room_keys/keys/:room_id" => c(backup::get_room));
    client!(s, put "/room_keys/keys/:room_id" => h(backup::put_room));
    client!(s, delete "/room_keys/keys/:room_id" => h(backup::delete_room));
    client!(s, get "/room_keys/keys/:room_id/:session_id" => c(backup::get_session));
    client!(s, put "/room_keys/keys/:room_id/:session_id" => h(backup::put_session));
    client!(s, delete "/room_keys/keys/:room_id/:session_id" => h(backup::delete_session));

    // media: uploads run to completion; downloads and thumbnails are cancellable (a
    // thumbnail or remote fetch runs in its own shared task, see `crate::media`)
    for v in ["v3", "r0"] {
        let at = |p: &str| format!("/_matrix/media/{v}{p}");
        s.at(&at("/upload")).post(h(media::upload));
        s.at(&at("/config")).get(c(media::legacy_config));
        s.at(&at("/download/:server_name/:media_id"))
            .get(c(media::legacy_download));
        s.at(&at("/download/:server_name/:media_id/:file_name"))
            .get(c(media::legacy_download_named));
        s.at(&at("/thumbnail/:server_name/:media_id"))
            .get(c(media::legacy_thumbnail));
    }
    s.at("/_matrix/media/v1/create").post(h(media::create));
    s.at("/_matrix/media/v3/upload/:server_name/:media_id")
        .put(h(media::upload_reserved));
    s.at("/_matrix/client/v1/media/config")
        .get(c(media::config));
    s.at("/_matrix/client/v1/media/download/:server_name/:media_id")
        .get(c(media::download));
    s.at("/_matrix/client/v1/media/download/:server_name/:media_id/:file_name")
        .get(c(media::download_named));
    s.at("/_matrix/client/v1/media/thumbnail/:server_name/:media_id")
        .get(c(media::thumbnail));
    s.at("/_matrix/federation/v1/media/download/:media_id")
        .get(c(media::federation_download));
    s.at("/_matrix/federation/v1/media/thumbnail/:media_id")
        .get(c(media::federation_thumbnail));
    s
}
