//! The Server-Server API: inbound handlers, one file per spec area, and the X-Matrix
//! extractor every authenticated federation route goes through.
//!
//! Reads are registered with `c(..)` (cancellable on disconnect) like the client reads.

pub mod directory;
pub mod events;
pub mod hierarchy;
pub mod keys;
pub mod knock;
pub mod membership;
pub mod query;
pub mod transactions;
pub mod user;

use ruma::{
    api::{federation::authentication::XMatrix, IncomingRequest, IncomingRequestExt},
    signatures::PublicKeyMap,
    OwnedServerName,
};

use super::{body_bytes, http_request, param, parse_error, Req};
use crate::error::{Error, Result};

fn unauthorized(msg: impl Into<String>) -> Error {
    Error::new(401, "M_UNAUTHORIZED", msg)
}

/// An authenticated federation request: who sent it, and the request parsed into ruma's type.
pub struct Origin<R> {
    pub origin: OwnedServerName,
    pub req: R,
}

/// Verifies the request's X-Matrix signature (fetching the origin's key if needed, once for
/// every waiter) and parses it into ruma's request type. Fails with 401 `M_UNAUTHORIZED` for a
/// missing, malformed or wrong signature, or a `destination` that is not us; with 403
/// `M_FORBIDDEN` when the request names a room (`room_id`) whose server ACL denies the origin.
pub async fn origin<R: IncomingRequest>(req: &mut Req, params: &[&str]) -> Result<Origin<R>> {
    let app = req.state().clone();
    let header = req
        .header("Authorization")
        .map(|h| h.last().as_str().to_owned())
        .ok_or_else(|| unauthorized("Missing X-Matrix authorization"))?;
    let xm = XMatrix::parse(&header)
        .map_err(|e| unauthorized(format!("Malformed X-Matrix authorization: {e}")))?;
    if xm
        .destination
        .as_ref()
        .is_some_and(|d| *d != app.server_name)
    {
        return Err(unauthorized("X-Matrix destination is not this server"));
    }
    let args = params
        .iter()
        .map(|p| param(req, p))
        .collect::<Result<Vec<_>>>()?;
    let body = body_bytes(req).await?;
    let http_req = http_request(req, body)?;
    let ctx = crate::ops::federation::key_context(&app);
    let keys = app
        .fed
        .keys
        .for_request(
            &ctx,
            &xm.origin,
            &[xm.key.as_str()],
            app.clock.now_ms() as i64,
        )
        .await?;
    let mut map = PublicKeyMap::new();
    map.insert(xm.origin.to_string(), keys);
    xm.verify_http_request(&http_req, &app.server_name, &map)
        .map_err(|e| unauthorized(format!("Bad X-Matrix signature: {e}")))?;
    // A destination we back off from is reachable again: send its queue now.
    crate::workers::federation::contacted(&app, &xm.origin).await;
    // Server ACLs: every request about a room (its `roomId` path parameter) from a server
    // the room denies is refused, whatever the endpoint.
    if let Some(i) = params.iter().position(|p| *p == "room_id") {
        crate::fed::acl::check(&app, &args[i], &xm.origin).await?;
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (parts, body) = http_req.into_parts();
    let parsed = R::try_from_http_request(http::Request::from_parts(parts, &body[..]), &args)
        .map_err(parse_error)?;
    Ok(Origin {
        origin: xm.origin,
        req: parsed,
    })
}
