//! The media repository: uploads, downloads, thumbnails and remote media, over the files in
//! `files` and the rows in `store::media`.
//!
//! **A 200 means on disk**: an upload is streamed to a temporary file (the size limit checked
//! while it arrives), made durable (`files::Files::store`), and only then is its row
//! committed, in one write; the answer follows the commit. Once the body is in, the rest
//! runs shielded, so a client that leaves cannot split the file from its row. Thumbnails and
//! fetched remote media follow the same order, each in one shared task per item
//! (`ResponseCache`), so concurrent requests for the same thumbnail or remote file wait for
//! one generation or fetch.

pub mod files;
pub mod thumbnail;

use std::time::Duration;

use ruma::{
    api::federation::authenticated_media::{get_content, FileOrLocation},
    http_headers::ContentDisposition,
    OwnedServerName, ServerName,
};

use crate::{
    cancel::{shield, ResponseCache, Spawner},
    error::{Error, Result},
    store::media::{self as q, MediaRow, NewMedia, ThumbnailRow},
    App,
};
use files::Files;
use thumbnail::Size;

/// How long an unused `/create` reservation lasts (Synapse's `unused_expiration_time`).
pub const RESERVATION_MS: u64 = 24 * 60 * 60 * 1000;
/// Unused reservations a user may hold at once (Synapse's `max_pending_media_uploads`).
pub const MAX_PENDING: u64 = 5;
/// The longest a download waits for a reserved item's upload, whatever `timeout_ms` says.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How often a waiting download looks again.
const WAIT_STEP: Duration = Duration::from_millis(250);

/// The media repository's shared state.
pub struct Media {
    pub files: Files,
    thumbnails: ResponseCache<ThumbKey, Result<ThumbnailRow>>,
    remote: ResponseCache<(OwnedServerName, String), Result<MediaRow>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ThumbKey {
    origin: String,
    media_id: String,
    size: Size,
}

/// A media ID: 24 random letters and digits, as Synapse makes them.
pub fn new_media_id() -> String {
    files::random_name(24)
}

/// Only what the server could have generated: `[A-Za-z0-9_-]`, at most 255 bytes. Anything
/// else (`..`, `/`, `%2F` decoded, NUL) names no media: 404 `M_NOT_FOUND`.
pub fn check_media_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::not_found("Unknown media ID"))
    }
}

/// Where an upload goes.
pub enum Target {
    /// A new media ID.
    New,
    /// A `/create` reservation of the uploader.
    Reserved(String),
}

/// What an upload says about itself.
pub struct Upload {
    pub content_type: Option<String>,
    pub filename: Option<String>,
    /// The `Content-Length`, if given: refused before reading when already too large.
    pub length: Option<u64>,
}

fn quota_error() -> Error {
    // Synapse's answer when `media_upload_limits` is exceeded.
    Error::new(
        400,
        "M_RESOURCE_LIMIT_EXCEEDED",
        "Media upload limit exceeded",
    )
}

fn too_large(max: u64) -> Error {
    Error::too_large(format!("Uploads are limited to {max} bytes"))
}

impl Media {
    /// Opens `media/` and removes what a kill left: temporary files and files no row names.
    pub fn open(
        app_store: &crate::store::Store,
        dir: std::path::PathBuf,
        spawner: &Spawner,
    ) -> Result<Self> {
        let files = Files::open(dir.clone())
            .map_err(|e| Error::internal(format_args!("media directory {}: {e}", dir.display())))?;
        let started = std::time::SystemTime::now();
        let keep = smol::block_on(app_store.read(q::list_media_files))?;
        let removed = files
            .sweep(&keep, started)
            .map_err(|e| Error::internal(format_args!("media sweep: {e}")))?;
        if removed > 0 {
            log::info!("media: removed {removed} orphan file(s)");
        }
        Ok(Self {
            files,
            thumbnails: ResponseCache::new(spawner, "thumbnail", Duration::from_secs(1)),
            remote: ResponseCache::new(spawner, "remote-media", Duration::from_secs(1)),
        })
    }
}

/// Receives an upload from `user` and stores it (file durable, then its row, one write).
/// Returns the media ID.
pub async fn upload(
    app: &App,
    user: &str,
    target: Target,
    meta: Upload,
    body: impl futures_lite::AsyncRead + Unpin,
) -> Result<String> {
    let config = &app.config.media;
    let max = config.max_upload_bytes;
    if meta.length.is_some_and(|l| l > max) {
        return Err(too_large(max));
    }
    if let Target::Reserved(id) = &target {
        let (u, id, now) = (user.to_owned(), id.clone(), app.clock.now_ms());
        let origin = app.server_name.to_string();
        app.store
            .read(move |c| check_reservation(q::get_media(c, &origin, &id)?, &u, now))
            .await?;
    }
    // The quota: refused before reading when the length is known, and while reading.
    let mut limit = max;
    let mut over_quota = false;
    if config.user_quota_bytes > 0 {
        let u = user.to_owned();
        let used = app
            .store
            .read(move |c| q::get_uploaded_bytes(c, &u))
            .await?;
        let left = config.user_quota_bytes.saturating_sub(used);
        if meta.length.is_some_and(|l| l > left) {
            return Err(quota_error());
        }
        if left < limit {
            (limit, over_quota) = (left, true);
        }
    }
    let received = app
        .media
        .files
        .receive(body, meta.length, limit, || {
            if over_quota {
                quota_error()
            } else {
                too_large(max)
            }
        })
        .await?;
    // The body is in: from here the work finishes even if the client leaves.
    let app2 = app.clone();
    let user = user.to_owned();
    shield(&app.spawner, "media-upload", async move {
        let app = app2;
        let stored = app.media.files.store(received).await?;
        let (name, size) = (stored.name.clone(), stored.size);
        let origin = app.server_name.to_string();
        let quota = app.config.media.user_quota_bytes;
        let authenticated = !app.config.media.legacy_unauthenticated_downloads;
        let now = app.clock.now_ms();
        let media_id = app
            .store
            .write(move |tx| {
                if quota > 0 && q::get_uploaded_bytes(tx, &user)?.saturating_add(size) > quota {
                    return Err(quota_error());
                }
                let ct = meta.content_type.as_deref();
                let fname = meta.filename.as_deref();
                match target {
                    Target::New => {
                        let media_id = new_media_id();
                        let row = NewMedia {
                            origin: &origin,
                            media_id: &media_id,
                            file: Some(&name),
                            size,
                            content_type: ct,
                            filename: fname,
                            uploader: Some(&user),
                            created_ts: now,
                            expires_ts: None,
                            authenticated,
                        };
                        if !q::insert_media(tx, &row)? {
                            return Err(Error::internal("media ID collision"));
                        }
                        Ok(media_id)
                    }
                    Target::Reserved(id) => {
                        check_reservation(q::get_media(tx, &origin, &id)?, &user, now)?;
                        if !q::fill_reserved_media(tx, &origin, &id, &name, size, ct, fname)? {
                            return Err(cannot_overwrite());
                        }
                        Ok(id)
                    }
                }
            })
            .await?;
        stored.keep();
        Ok(media_id)
    })
    .await
}

fn cannot_overwrite() -> Error {
    Error::new(409, "M_CANNOT_OVERWRITE_MEDIA", "Media already uploaded")
}

/// A reservation `user` may upload to now: theirs, unfilled, unexpired.
fn check_reservation(row: Option<MediaRow>, user: &str, now: u64) -> Result<()> {
    let row = row.ok_or_else(|| Error::not_found("Unknown media ID"))?;
    if row.uploader.as_deref() != Some(user) {
        return Err(Error::forbidden("You did not create this media ID"));
    }
    if row.file.is_some() {
        return Err(cannot_overwrite());
    }
    if row.expires_ts.is_some_and(|t| t <= now) {
        return Err(Error::not_found("This media ID has expired"));
    }
    Ok(())
}

/// `POST /create`: reserves a media ID for a later upload by `user`. Returns the ID and when
/// the reservation lapses.
pub async fn reserve(app: &App, user: &str) -> Result<(String, u64)> {
    let origin = app.server_name.to_string();
    let user = user.to_owned();
    let now = app.clock.now_ms();
    app.store
        .write(move |tx| {
            if q::count_pending_reservations(tx, &user, now)? >= MAX_PENDING {
                return Err(Error::limit_exceeded(60_000));
            }
            let media_id = new_media_id();
            let expires = now + RESERVATION_MS;
            let row = NewMedia {
                origin: &origin,
                media_id: &media_id,
                file: None,
                size: 0,
                content_type: None,
                filename: None,
                uploader: Some(&user),
                created_ts: now,
                expires_ts: Some(expires),
                authenticated: true,
            };
            if !q::insert_media(tx, &row)? {
                return Err(Error::internal("media ID collision"));
            }
            Ok((media_id, expires))
        })
        .await
}

/// The stored item `origin`/`media_id` with its file: a local one (waiting up to `timeout`
/// for a reserved one's upload), or a remote one, fetched over federation and cached on first
/// use when `fetch_remote`.
pub async fn get(
    app: &App,
    origin: &ServerName,
    media_id: &str,
    timeout: Duration,
    fetch_remote: bool,
) -> Result<(MediaRow, String)> {
    check_media_id(media_id)?;
    if origin != app.server_name {
        let row = match read_row(app, origin, media_id).await? {
            Some(row) => row,
            None if fetch_remote => {
                let key = (origin.to_owned(), media_id.to_owned());
                let app2 = app.clone();
                app.media
                    .remote
                    .get_or_compute(key, move || {
                        fetch(app2, origin.to_owned(), media_id.to_owned(), timeout)
                    })
                    .await?
            }
            None => return Err(Error::not_found("Unknown media")),
        };
        let file = row
            .file
            .clone()
            .ok_or_else(|| Error::not_found("Unknown media"))?;
        return Ok((row, file));
    }
    let deadline = std::time::Instant::now() + timeout.min(MAX_WAIT);
    loop {
        let row = read_row(app, origin, media_id)
            .await?
            .ok_or_else(|| Error::not_found("Unknown media"))?;
        if let Some(file) = row.file.clone() {
            return Ok((row, file));
        }
        if row.expires_ts.is_some_and(|t| t <= app.clock.now_ms()) {
            return Err(Error::not_found("Unknown media"));
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::new(
                504,
                "M_NOT_YET_UPLOADED",
                "The media has not been uploaded yet",
            ));
        }
        smol::Timer::after(WAIT_STEP).await;
    }
}

async fn read_row(app: &App, origin: &ServerName, media_id: &str) -> Result<Option<MediaRow>> {
    let (o, id) = (origin.to_string(), media_id.to_owned());
    app.store.read(move |c| q::get_media(c, &o, &id)).await
}

/// Room for the JSON part and part headers of a federation download's `multipart/mixed`
/// answer, above the file itself.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;

/// Follows the `Location` a remote server answered a download with (the spec allows it:
/// servers that keep media elsewhere, behind a CDN or in object storage, redirect there). One
/// hop: an answer that redirects again is refused, so a loop cannot keep us busy.
async fn follow_location(
    app: &App,
    location: &str,
    max: u64,
) -> Result<(Vec<u8>, Option<String>, Option<ContentDisposition>)> {
    let res = app.fed.client.get_url(location, max).await?;
    if !res.status().is_success() {
        let status = res.status().as_u16();
        return Err(if status == 404 {
            Error::not_found("Unknown media")
        } else {
            Error::new(
                502,
                "M_UNKNOWN",
                format!("The remote media's location answered {status}"),
            )
        });
    }
    let header = |name: http::header::HeaderName| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(http::header::CONTENT_TYPE);
    let disposition = header(http::header::CONTENT_DISPOSITION)
        .and_then(|d| d.parse::<ContentDisposition>().ok());
    Ok((res.into_body(), content_type, disposition))
}

/// Fetches a remote item over federation and caches it (file durable, then its row).
async fn fetch(
    app: App,
    origin: OwnedServerName,
    media_id: String,
    timeout: Duration,
) -> Result<MediaRow> {
    let mut req = get_content::v1::Request::new(media_id.clone());
    req.timeout_ms = timeout.min(MAX_WAIT);
    let max = app.config.media.max_upload_bytes;
    // The multipart answer carries a JSON part and headers besides the file.
    let res = app
        .fed
        .client
        .send_limited(&origin, req, max.saturating_add(MULTIPART_OVERHEAD))
        .await?;
    let (file, content_type, disposition) = match res.content {
        FileOrLocation::File(c) => (c.file, c.content_type, c.content_disposition),
        FileOrLocation::Location(location) => follow_location(&app, &location, max).await?,
        _ => {
            return Err(Error::new(
                502,
                "M_UNKNOWN",
                "Unexpected remote media answer",
            ))
        }
    };
    if file.len() as u64 > max {
        // The spec's answer for remote content too large to serve.
        return Err(Error::new(
            502,
            "M_TOO_LARGE",
            "The remote content is too large",
        ));
    }
    let content_type = content_type.filter(|c| header_safe(c));
    let filename = disposition.and_then(|d| d.filename);
    let received = app.media.files.receive_bytes(file).await?;
    let stored = app.media.files.store(received).await?;
    let row = MediaRow {
        file: Some(stored.name.clone()),
        size: stored.size,
        content_type,
        filename,
        uploader: None,
        expires_ts: None,
        authenticated: true,
    };
    let media_id2 = media_id.clone();
    let (r, o, id, now) = (
        row.clone(),
        origin.to_string(),
        media_id,
        app.clock.now_ms(),
    );
    let inserted = app
        .store
        .write(move |tx| {
            q::insert_media(
                tx,
                &NewMedia {
                    origin: &o,
                    media_id: &id,
                    file: r.file.as_deref(),
                    size: r.size,
                    content_type: r.content_type.as_deref(),
                    filename: r.filename.as_deref(),
                    uploader: None,
                    created_ts: now,
                    expires_ts: None,
                    authenticated: true,
                },
            )
        })
        .await?;
    if !inserted {
        // Cached meanwhile by another path: that row stays, this file goes (dropped).
        return read_row(&app, &origin, &media_id2)
            .await?
            .ok_or_else(|| Error::internal("remote media row vanished"));
    }
    stored.keep();
    Ok(row)
}

/// Whether a string can be sent as a header value (visible ASCII and spaces, not too long).
pub fn header_safe(s: &str) -> bool {
    s.len() <= 255 && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// The thumbnail of `size` for a stored item, made and kept on first request; concurrent
/// requests for the same one share one generation.
pub async fn thumbnail(
    app: &App,
    origin: &ServerName,
    media_id: &str,
    source_file: &str,
    size: Size,
) -> Result<ThumbnailRow> {
    let method = size.method.as_str();
    let (o, id) = (origin.to_string(), media_id.to_owned());
    let found = app
        .store
        .read(move |c| q::get_thumbnail(c, &o, &id, size.width, size.height, method))
        .await?;
    if let Some(t) = found {
        return Ok(t);
    }
    let key = ThumbKey {
        origin: origin.to_string(),
        media_id: media_id.to_owned(),
        size,
    };
    let app2 = app.clone();
    let path = app.media.files.path(source_file);
    app.media
        .thumbnails
        .get_or_compute(key.clone(), move || make_thumbnail(app2, key, path))
        .await
}

async fn make_thumbnail(
    app: App,
    key: ThumbKey,
    source: std::path::PathBuf,
) -> Result<ThumbnailRow> {
    let size = key.size;
    let method = size.method.as_str();
    let (o, id) = (key.origin.clone(), key.media_id.clone());
    if let Some(t) = app
        .store
        .read(move |c| q::get_thumbnail(c, &o, &id, size.width, size.height, method))
        .await?
    {
        return Ok(t);
    }
    let max_pixels = app.config.media.max_image_pixels;
    let made = smol::unblock(move || thumbnail::make(&source, size, max_pixels))
        .await
        .map_err(|refused| match refused {
            thumbnail::Refused::NotAnImage(why) => Error::new(
                400,
                "M_UNKNOWN",
                format!("Cannot generate a thumbnail for this media: {why}"),
            ),
            thumbnail::Refused::TooLarge { width, height } => Error::too_large(format!(
                "The image ({width}x{height}) is too large to thumbnail"
            )),
        })?;
    let content_type = made.content_type.to_owned();
    let received = app.media.files.receive_bytes(made.bytes).await?;
    let stored = app.media.files.store(received).await?;
    let row = ThumbnailRow {
        file: stored.name.clone(),
        size: stored.size,
        content_type,
    };
    let r = row.clone();
    let (key_origin, key_id) = (key.origin.clone(), key.media_id.clone());
    let inserted = app
        .store
        .write(move |tx| {
            q::insert_thumbnail(
                tx,
                &key.origin,
                &key.media_id,
                size.width,
                size.height,
                method,
                &r,
            )
        })
        .await?;
    if !inserted {
        // Made meanwhile by an earlier task: that one stays, this file goes (dropped).
        let (o, id) = (key_origin, key_id);
        return app
            .store
            .read(move |c| q::get_thumbnail(c, &o, &id, size.width, size.height, method))
            .await?
            .ok_or_else(|| Error::internal("thumbnail row vanished"));
    }
    stored.keep();
    Ok(row)
}
