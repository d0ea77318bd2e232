//! The content repository: uploads (`/_matrix/media/v3/upload`, `/_matrix/media/v1/create`),
//! authenticated downloads and thumbnails (`/_matrix/client/v1/media/*`, Matrix 1.11), the
//! frozen legacy `/_matrix/media/v3/{download,thumbnail,config}`, and the federation side
//! (`/_matrix/federation/v1/media/*`). The work is in `crate::media`; this file parses
//! requests (path, query and headers with ruma's types; an upload's body is streamed, never
//! parsed whole) and serves files with the headers that make user content safe to open in a
//! browser.

// The legacy endpoints' request types are deprecated by ruma (Matrix 1.11 froze them), but
// the spec still describes them and Hearth serves them.
#![allow(deprecated)]

use std::time::Duration;

use ruma::{
    api::{
        client::{
            authenticated_media::{
                get_content, get_content_as_filename, get_content_thumbnail, get_media_config,
            },
            media::{
                create_content, create_content_async, create_mxc_uri,
                get_content as legacy_content, get_content_as_filename as legacy_named,
                get_content_thumbnail as legacy_thumbnail, get_media_config as legacy_config,
            },
        },
        federation::authenticated_media::{
            get_content as fed_content, get_content_thumbnail as fed_thumbnail, Content,
            ContentMetadata, FileOrLocation,
        },
        IncomingRequest, IncomingRequestExt, OutgoingResponseExt,
    },
    http_headers::{ContentDisposition, ContentDispositionType},
    media::Method as RumaMethod,
    ServerName,
};
use serde_json::json;
use tide::{Response, StatusCode};

use super::{auth, federation::origin, http_request, json, known_query, param, parse_error, Req};
use crate::{
    error::{Error, Result},
    media::{self, thumbnail as thumb, Target, Upload},
    store::media::MediaRow,
    App,
};

/// Types a browser may show inline (Synapse's `INLINE_CONTENT_TYPES`): none can run script.
/// Anything else (HTML, SVG, JavaScript, unknown types) is sent as an attachment.
const INLINE_CONTENT_TYPES: &[&str] = &[
    "text/css",
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/x-pn-wav",
    "audio/flac",
    "audio/x-flac",
];

/// Text types that get `; charset=UTF-8` when they name none (Synapse's `TEXT_CONTENT_TYPES`).
const TEXT_CONTENT_TYPES: &[&str] = &[
    "text/css",
    "text/csv",
    "text/html",
    "text/calendar",
    "text/plain",
    "text/javascript",
    "application/json",
    "application/ld+json",
    "application/rtf",
    "image/svg+xml",
    "text/xml",
];

/// Synapse's policy for media: nothing in a served file may run or load anything.
const CSP: &str = "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; \
                   style-src 'unsafe-inline'; media-src 'self'; object-src 'self';";

/// Parses the path, query and headers of `req` into ruma's type for the endpoint, without
/// touching the body (an upload's body is streamed to disk by the handler).
fn ruma_head<R: IncomingRequest>(req: &Req, params: &[&str]) -> Result<R> {
    let args = params
        .iter()
        .map(|p| param(req, p))
        .collect::<Result<Vec<_>>>()?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    R::try_from_http_request(http_request(req, &[][..])?, &args).map_err(parse_error)
}

/// The upload's metadata from the request: content type (a header, so ASCII), file name.
fn upload_meta(
    req: &Req,
    content_type: Option<String>,
    filename: Option<String>,
) -> Result<Upload> {
    if filename.as_ref().is_some_and(|f| f.len() > 255) {
        return Err(Error::invalid_param("filename is longer than 255 bytes"));
    }
    if content_type
        .as_ref()
        .is_some_and(|c| !media::header_safe(c))
    {
        return Err(Error::invalid_param(
            "Content-Type is not a plain ASCII value",
        ));
    }
    Ok(Upload {
        content_type,
        filename,
        length: req.len().map(|l| l as u64),
    })
}

fn mxc(app: &App, media_id: &str) -> String {
    format!("mxc://{}/{media_id}", app.server_name)
}

/// # `POST /_matrix/media/v3/upload`
pub async fn upload(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let r: create_content::v3::Request = ruma_head(&req, &[])?;
    let meta = upload_meta(&req, r.content_type, r.filename)?;
    let app = req.state().clone();
    let body = req.take_body();
    let id = media::upload(&app, who.user_id.as_str(), Target::New, meta, body).await?;
    json(&json!({ "content_uri": mxc(&app, &id) }))
}

/// # `POST /_matrix/media/v1/create`
pub async fn create(req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let _: create_mxc_uri::v1::Request = ruma_head(&req, &[])?;
    let app = req.state().clone();
    let (id, expires) = media::reserve(&app, who.user_id.as_str()).await?;
    json(&json!({ "content_uri": mxc(&app, &id), "unused_expires_at": expires }))
}

/// # `PUT /_matrix/media/v3/upload/{serverName}/{mediaId}`
pub async fn upload_reserved(mut req: Req) -> Result<Response> {
    let who = auth(&req).await?;
    let r: create_content_async::v3::Request = ruma_head(&req, &["server_name", "media_id"])?;
    media::check_media_id(&r.media_id)?;
    let app = req.state().clone();
    if r.server_name != app.server_name {
        return Err(Error::not_found("Unknown media ID"));
    }
    let meta = upload_meta(&req, r.content_type, r.filename)?;
    let body = req.take_body();
    let target = Target::Reserved(r.media_id);
    media::upload(&app, who.user_id.as_str(), target, meta, body).await?;
    json(&json!({}))
}

/// # `GET /_matrix/client/v1/media/config`
pub async fn config(req: Req) -> Result<Response> {
    auth(&req).await?;
    let _: get_media_config::v1::Request = ruma_head(&req, &[])?;
    config_response(&req)
}

/// # `GET /_matrix/media/v3/config`
pub async fn legacy_config(req: Req) -> Result<Response> {
    // Authenticated like every `/config` (the spec never made this one public).
    auth(&req).await?;
    let _: legacy_config::v3::Request = ruma_head(&req, &[])?;
    config_response(&req)
}

fn config_response(req: &Req) -> Result<Response> {
    json(&json!({ "m.upload.size": req.state().config.media.max_upload_bytes }))
}

/// # `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}`
pub async fn download(req: Req) -> Result<Response> {
    auth(&req).await?;
    let r: get_content::v1::Request = ruma_head(&req, &["server_name", "media_id"])?;
    let app = req.state().clone();
    let (row, file) = media::get(&app, &r.server_name, &r.media_id, r.timeout_ms, true).await?;
    let name = row.filename.clone();
    serve(&app, &file, row.content_type.as_deref(), name).await
}

/// # `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}/{fileName}`
pub async fn download_named(req: Req) -> Result<Response> {
    auth(&req).await?;
    let r: get_content_as_filename::v1::Request =
        ruma_head(&req, &["server_name", "media_id", "file_name"])?;
    let app = req.state().clone();
    let (row, file) = media::get(&app, &r.server_name, &r.media_id, r.timeout_ms, true).await?;
    serve(&app, &file, row.content_type.as_deref(), Some(r.filename)).await
}

/// The thumbnail size a request asks for, snapped to the standard sizes.
fn thumbnail_size(width: u64, height: u64, method: Option<&RumaMethod>) -> Result<thumb::Size> {
    let method = match method.map(RumaMethod::as_str) {
        None | Some("scale") => thumb::Method::Scale,
        Some("crop") => thumb::Method::Crop,
        Some(other) => {
            known_query("method", other, &["crop", "scale"])?;
            thumb::Method::Scale
        }
    };
    if width == 0 || height == 0 {
        return Err(Error::invalid_param("width and height must be positive"));
    }
    let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(thumb::select(clamp(width), clamp(height), method))
}

/// Makes (or finds) the thumbnail and answers with it.
async fn thumbnail_of(
    app: &App,
    server: &ServerName,
    media_id: &str,
    file: &str,
    size: thumb::Size,
) -> Result<Response> {
    let t = media::thumbnail(app, server, media_id, file, size).await?;
    serve(app, &t.file, Some(&t.content_type), None).await
}

/// # `GET /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}`
///
/// `animated` is accepted; the thumbnail is always a still of the first frame (the spec lets
/// a server that cannot animate thumbnails do so).
pub async fn thumbnail(req: Req) -> Result<Response> {
    auth(&req).await?;
    let r: get_content_thumbnail::v1::Request = ruma_head(&req, &["server_name", "media_id"])?;
    let size = thumbnail_size(r.width.into(), r.height.into(), r.method.as_ref())?;
    let app = req.state().clone();
    let (_, file) = media::get(&app, &r.server_name, &r.media_id, r.timeout_ms, true).await?;
    thumbnail_of(&app, &r.server_name, &r.media_id, &file, size).await
}

/// An item for the legacy unauthenticated endpoints: Matrix 1.11 froze them, and Synapse (by
/// default, `enable_authenticated_media: true`) serves there only media stored before the
/// freeze, 404 for the rest. Hearth does the same: only media uploaded while
/// `[media] legacy_unauthenticated_downloads` was on; remote media is never fetched for them.
async fn legacy_get(
    app: &App,
    server: &ServerName,
    media_id: &str,
    timeout: Duration,
) -> Result<(MediaRow, String)> {
    let (row, file) = media::get(app, server, media_id, timeout, false).await?;
    if row.authenticated {
        return Err(Error::not_found("Not found"));
    }
    Ok((row, file))
}

/// # `GET /_matrix/media/v3/download/{serverName}/{mediaId}` (frozen, see [`legacy_get`])
pub async fn legacy_download(req: Req) -> Result<Response> {
    let r: legacy_content::v3::Request = ruma_head(&req, &["server_name", "media_id"])?;
    let app = req.state().clone();
    let (row, file) = legacy_get(&app, &r.server_name, &r.media_id, r.timeout_ms).await?;
    let name = row.filename.clone();
    serve(&app, &file, row.content_type.as_deref(), name).await
}

/// # `GET /_matrix/media/v3/download/{serverName}/{mediaId}/{fileName}` (frozen, see
/// [`legacy_get`])
pub async fn legacy_download_named(req: Req) -> Result<Response> {
    let r: legacy_named::v3::Request = ruma_head(&req, &["server_name", "media_id", "file_name"])?;
    let app = req.state().clone();
    let (row, file) = legacy_get(&app, &r.server_name, &r.media_id, r.timeout_ms).await?;
    serve(&app, &file, row.content_type.as_deref(), Some(r.filename)).await
}

/// # `GET /_matrix/media/v3/thumbnail/{serverName}/{mediaId}` (frozen, see [`legacy_get`])
pub async fn legacy_thumbnail(req: Req) -> Result<Response> {
    let r: legacy_thumbnail::v3::Request = ruma_head(&req, &["server_name", "media_id"])?;
    let size = thumbnail_size(r.width.into(), r.height.into(), r.method.as_ref())?;
    let app = req.state().clone();
    let (_, file) = legacy_get(&app, &r.server_name, &r.media_id, r.timeout_ms).await?;
    thumbnail_of(&app, &r.server_name, &r.media_id, &file, size).await
}

/// `Content-Disposition` for a file of `content_type`: inline only for the safe types.
fn disposition(content_type: &str, filename: Option<String>) -> ContentDisposition {
    let kind = if INLINE_CONTENT_TYPES.contains(&essence(content_type).as_str()) {
        ContentDispositionType::Inline
    } else {
        ContentDispositionType::Attachment
    };
    ContentDisposition::new(kind).with_filename(filename)
}

/// `type/subtype` of a content type, lower-cased, without parameters.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The content type to send: the stored one (`application/octet-stream` if none or unfit
/// for a header), with a UTF-8 charset for text types that name none.
fn served_type(content_type: Option<&str>) -> String {
    let ct = content_type
        .filter(|c| media::header_safe(c) && !c.trim().is_empty())
        .unwrap_or("application/octet-stream");
    if TEXT_CONTENT_TYPES.contains(&essence(ct).as_str())
        && !ct.to_ascii_lowercase().contains("charset")
    {
        format!("{ct}; charset=UTF-8")
    } else {
        ct.to_owned()
    }
}

/// Streams a stored file with the safe-serving headers.
async fn serve(
    app: &App,
    file: &str,
    content_type: Option<&str>,
    filename: Option<String>,
) -> Result<Response> {
    let (reader, len) = app.media.files.open_file(file).await?;
    let ct = served_type(content_type);
    let mut res = Response::new(StatusCode::Ok);
    res.set_body(tide::Body::from_reader(reader, Some(len as usize)));
    let disposition = disposition(&ct, filename.filter(|f| !f.is_empty()));
    res.insert_header("Content-Type", ct.as_str());
    res.insert_header("Content-Disposition", disposition.to_string().as_str());
    res.insert_header("X-Content-Type-Options", "nosniff");
    res.insert_header("Content-Security-Policy", CSP);
    res.insert_header("Cross-Origin-Resource-Policy", "cross-origin");
    res.insert_header("Cache-Control", "public,max-age=86400,s-maxage=86400");
    Ok(res)
}

/// An `http::Response` built by ruma, as tide's.
fn from_http(res: http::Response<Vec<u8>>) -> Result<Response> {
    let (parts, body) = res.into_parts();
    let status = StatusCode::try_from(parts.status.as_u16()).map_err(Error::internal)?;
    let mut out = Response::new(status);
    for (name, value) in &parts.headers {
        let v = value.to_str().map_err(Error::internal)?;
        out.insert_header(name.as_str(), v);
    }
    let ct = out
        .header("Content-Type")
        .map(|h| h.last().as_str().to_owned());
    out.set_body(body);
    if let Some(ct) = ct {
        out.insert_header("Content-Type", ct.as_str());
    }
    Ok(out)
}

/// A local file as the federation's `multipart/mixed` answer (ruma builds it).
async fn federation_file(
    app: &App,
    file: &str,
    content_type: Option<&str>,
    filename: Option<String>,
    build: impl FnOnce(ContentMetadata, FileOrLocation) -> Result<http::Response<Vec<u8>>>,
) -> Result<Response> {
    let bytes = app.media.files.read(file).await?;
    let ct = served_type(content_type);
    let d = disposition(&ct, filename);
    let content = FileOrLocation::File(Content::new(bytes, ct, d));
    from_http(build(ContentMetadata::new(), content)?)
}

fn build_error(e: impl std::fmt::Display) -> Error {
    Error::internal(format_args!("building the media answer: {e}"))
}

/// # `GET /_matrix/federation/v1/media/download/{mediaId}`
///
/// Only media uploaded here: another server's media is fetched from that server.
pub async fn federation_download(mut req: Req) -> Result<Response> {
    let r = origin::<fed_content::v1::Request>(&mut req, &["media_id"])
        .await?
        .req;
    let app = req.state().clone();
    let us = app.server_name.clone();
    let (row, file) = media::get(&app, &us, &r.media_id, r.timeout_ms, false).await?;
    let name = row.filename.clone();
    federation_file(&app, &file, row.content_type.as_deref(), name, |m, c| {
        fed_content::v1::Response::new(m, c)
            .try_into_http_response::<Vec<u8>>()
            .map_err(build_error)
    })
    .await
}

/// # `GET /_matrix/federation/v1/media/thumbnail/{mediaId}`
pub async fn federation_thumbnail(mut req: Req) -> Result<Response> {
    let r = origin::<fed_thumbnail::v1::Request>(&mut req, &["media_id"])
        .await?
        .req;
    let size = thumbnail_size(r.width.into(), r.height.into(), r.method.as_ref())?;
    let app = req.state().clone();
    let us = app.server_name.clone();
    let (_, file) = media::get(&app, &us, &r.media_id, r.timeout_ms, false).await?;
    let t = media::thumbnail(&app, &us, &r.media_id, &file, size).await?;
    federation_file(&app, &t.file, Some(&t.content_type), None, |m, c| {
        fed_thumbnail::v1::Response::new(m, c)
            .try_into_http_response::<Vec<u8>>()
            .map_err(build_error)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_types_are_inline_and_names_are_escaped() {
        let d = disposition("image/png", Some("cat.png".into())).to_string();
        assert_eq!(d, "inline; filename=cat.png");
        let d = disposition("text/html; charset=UTF-8", Some("x.html".into())).to_string();
        assert!(d.starts_with("attachment"), "{d}");
        let d = disposition("image/svg+xml", None).to_string();
        assert_eq!(d, "attachment");
        let d = disposition("IMAGE/PNG", Some("a \"b\";\r\nc.png".into())).to_string();
        assert!(d.starts_with("inline; filename=\"a \\\"b\\\";"), "{d}");
        assert!(!d.contains('\r') && !d.contains('\n'), "{d}");
        let d = disposition("text/plain", Some("naïve.txt".into())).to_string();
        assert_eq!(d, "inline; filename*=utf-8''na%C3%AFve.txt");
        assert_eq!(served_type(Some("text/plain")), "text/plain; charset=UTF-8");
        assert_eq!(served_type(None), "application/octet-stream");
    }
}
