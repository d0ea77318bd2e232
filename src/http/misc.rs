//! Discovery and operations: `/versions`, `/capabilities`, `.well-known`, metrics.

use serde_json::json;
use tide::Response;

use ruma::api::client::discovery::{discover_homeserver, get_capabilities, get_supported_versions};

use super::{auth, json, ruma_req, Req};
use crate::{
    error::{Error, Result},
    room::SUPPORTED_VERSIONS,
};

/// The Client-Server API versions `/versions` claims.
///
/// Only versions whose required endpoints exist here. v1.11 made authenticated media
/// (`/_matrix/client/v1/media/*`, MSC3916) required: a client that sees it uses those
/// endpoints for every avatar and image, so it is claimed since the media repository
/// (`http::media`) serves them (`tests/edge.rs` checks that v1.11+ is claimed exactly when
/// `/_matrix/client/v1/media/config` answers).
pub const CLIENT_VERSIONS: &[&str] = &[
    "r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8",
    "v1.9", "v1.10", "v1.11",
];

/// # `GET /_matrix/client/versions`
pub async fn versions(mut req: Req) -> Result<Response> {
    let _: get_supported_versions::Request = ruma_req(&mut req, &[]).await?;
    json(&json!({
        "versions": CLIENT_VERSIONS,
        // Sticky events (MSC4354) and room summaries (MSC3266, the `im.nheko.summary` paths).
        "unstable_features": { "org.matrix.msc4354": true, "org.matrix.msc3266": true }
    }))
}

/// # `GET /_matrix/client/v3/capabilities`
pub async fn capabilities(mut req: Req) -> Result<Response> {
    auth(&req).await?;
    let _: get_capabilities::v3::Request = ruma_req(&mut req, &[]).await?;
    let app = req.state();
    let available: serde_json::Map<String, serde_json::Value> = SUPPORTED_VERSIONS
        .iter()
        .map(|v| ((*v).to_owned(), "stable".into()))
        .collect();
    json(&json!({
        "capabilities": {
            "m.room_versions": { "default": app.config.default_room_version, "available": available },
            "m.change_password": { "enabled": true },
            "m.set_displayname": { "enabled": true },
            "m.set_avatar_url": { "enabled": true },
            "m.3pid_changes": { "enabled": false },
            "m.get_login_token": { "enabled": false }
        }
    }))
}

/// # `GET /.well-known/matrix/client`
pub async fn well_known_client(mut req: Req) -> Result<Response> {
    let _: discover_homeserver::Request = ruma_req(&mut req, &[]).await?;
    json(&json!({ "m.homeserver": { "base_url": super::base_url(&req) } }))
}

/// # `GET /.well-known/matrix/server`
///
/// Server delegation, when configured (`federation.well_known_server`).
pub async fn well_known_server(req: Req) -> Result<Response> {
    match &req.state().config.federation.well_known_server {
        Some(s) => json(&json!({ "m.server": s })),
        None => Err(Error::not_found("No server delegation is configured")),
    }
}

/// # `GET /_hearth/metrics` (Prometheus text format)
pub async fn metrics(req: Req) -> Result<Response> {
    let app = req.state();
    let depths = app.store.read(crate::store::outbox::queue_depths).await?;
    let mut body = app.metrics.render(
        &app.notifier,
        app.spawner.live_tasks(),
        app.store.writer_stats(),
    );
    body.push_str(&crate::workers::federation::render_metrics(app, &depths));
    let mut res = Response::new(200);
    res.set_body(body);
    res.set_content_type("text/plain; version=0.0.4");
    Ok(res)
}

/// # `GET /_hearth/health`
///
/// Liveness for supervisors and load balancers: answers while the executor serves requests,
/// with the latest committed stream position.
/// Deliberately not cancellable, so benchmarks can compare it with a cancellable GET of the
/// same cost (see BENCHMARKS.md).
pub async fn health(req: Req) -> Result<Response> {
    let pos = req.state().notifier.pos();
    json(&json!({ "status": "ok", "stream_position": pos }))
}
