//! SQL of the media repository (`media`, `media_thumbnails`).
//!
//! The rule these serve (see `crate::media`): a row names a file that is already durable on
//! disk. Rows are inserted only after the file's rename and directory fsync; files without a
//! row are what the start-up sweep removes.

use std::collections::HashSet;

use rusqlite::{params, Connection, OptionalExtension};

use super::Tx;
use crate::error::Result;

/// One media item as stored.
#[derive(Clone, Debug)]
pub struct MediaRow {
    /// The file's name in `media/`; `None` while a `/create` reservation awaits its upload.
    pub file: Option<String>,
    pub size: u64,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    pub uploader: Option<String>,
    /// When an unused `/create` reservation lapses.
    pub expires_ts: Option<u64>,
    /// Uploaded while the legacy unauthenticated endpoints were off (see `schema.sql`).
    pub authenticated: bool,
}

/// A new row: a stored file, or (`file` = `None`) a reservation.
pub struct NewMedia<'a> {
    pub origin: &'a str,
    pub media_id: &'a str,
    pub file: Option<&'a str>,
    pub size: u64,
    pub content_type: Option<&'a str>,
    pub filename: Option<&'a str>,
    pub uploader: Option<&'a str>,
    pub created_ts: u64,
    pub expires_ts: Option<u64>,
    pub authenticated: bool,
}

/// A stored thumbnail.
#[derive(Clone, Debug)]
pub struct ThumbnailRow {
    pub file: String,
    pub size: u64,
    pub content_type: String,
}

pub fn get_media(conn: &Connection, origin: &str, media_id: &str) -> Result<Option<MediaRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT file, size, content_type, filename, uploader, expires_ts, authenticated
         FROM media WHERE origin = ?1 AND media_id = ?2",
    )?;
    Ok(stmt
        .query_row(params![origin, media_id], |r| {
            Ok(MediaRow {
                file: r.get(0)?,
                size: r.get::<_, i64>(1)?.max(0) as u64,
                content_type: r.get(2)?,
                filename: r.get(3)?,
                uploader: r.get(4)?,
                expires_ts: r.get::<_, Option<i64>>(5)?.map(|t| t.max(0) as u64),
                authenticated: r.get::<_, i64>(6)? != 0,
            })
        })
        .optional()?)
}

/// Inserts a row; `false` if one with the same origin and ID exists (nothing written).
pub fn insert_media(tx: &Tx, m: &NewMedia) -> Result<bool> {
    let n = tx.execute(
        "INSERT INTO media (origin, media_id, file, size, content_type, filename, uploader,
                            created_ts, expires_ts, authenticated)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (origin, media_id) DO NOTHING",
        params![
            m.origin,
            m.media_id,
            m.file,
            m.size as i64,
            m.content_type,
            m.filename,
            m.uploader,
            m.created_ts as i64,
            m.expires_ts.map(|t| t as i64),
            m.authenticated,
        ],
    )?;
    Ok(n == 1)
}

/// Fills a `/create` reservation with its file; `false` if it is gone or already filled.
pub fn fill_reserved_media(
    tx: &Tx,
    origin: &str,
    media_id: &str,
    file: &str,
    size: u64,
    content_type: Option<&str>,
    filename: Option<&str>,
) -> Result<bool> {
    let n = tx.execute(
        "UPDATE media SET file = ?3, size = ?4, content_type = ?5, filename = ?6,
                          expires_ts = NULL
         WHERE origin = ?1 AND media_id = ?2 AND file IS NULL",
        params![origin, media_id, file, size as i64, content_type, filename],
    )?;
    Ok(n == 1)
}

/// Bytes of media `user` has uploaded (what the quota counts).
pub fn get_uploaded_bytes(conn: &Connection, user: &str) -> Result<u64> {
    let mut stmt =
        conn.prepare_cached("SELECT COALESCE(SUM(size), 0) FROM media WHERE uploader = ?1")?;
    Ok(stmt.query_row([user], |r| r.get::<_, i64>(0))?.max(0) as u64)
}

/// `/create` reservations of `user` not yet uploaded and not expired at `now_ms`.
pub fn count_pending_reservations(conn: &Connection, user: &str, now_ms: u64) -> Result<u64> {
    let mut stmt = conn.prepare_cached(
        "SELECT count(*) FROM media
         WHERE uploader = ?1 AND file IS NULL AND expires_ts > ?2",
    )?;
    Ok(stmt
        .query_row(params![user, now_ms as i64], |r| r.get::<_, i64>(0))?
        .max(0) as u64)
}

pub fn get_thumbnail(
    conn: &Connection,
    origin: &str,
    media_id: &str,
    width: u32,
    height: u32,
    method: &str,
) -> Result<Option<ThumbnailRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT file, size, content_type FROM media_thumbnails
         WHERE origin = ?1 AND media_id = ?2 AND width = ?3 AND height = ?4 AND method = ?5",
    )?;
    Ok(stmt
        .query_row(params![origin, media_id, width, height, method], |r| {
            Ok(ThumbnailRow {
                file: r.get(0)?,
                size: r.get::<_, i64>(1)?.max(0) as u64,
                content_type: r.get(2)?,
            })
        })
        .optional()?)
}

/// Inserts a thumbnail row; `false` if that size exists already (nothing written).
#[allow(clippy::too_many_arguments)]
pub fn insert_thumbnail(
    tx: &Tx,
    origin: &str,
    media_id: &str,
    width: u32,
    height: u32,
    method: &str,
    thumb: &ThumbnailRow,
) -> Result<bool> {
    let n = tx.execute(
        "INSERT INTO media_thumbnails (origin, media_id, width, height, method, file, size,
                                       content_type)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT DO NOTHING",
        params![
            origin,
            media_id,
            width,
            height,
            method,
            thumb.file,
            thumb.size as i64,
            thumb.content_type
        ],
    )?;
    Ok(n == 1)
}

/// Every file name a row refers to (the start-up sweep keeps exactly these).
pub fn list_media_files(conn: &Connection) -> Result<HashSet<String>> {
    let mut stmt = conn.prepare(
        "SELECT file FROM media WHERE file IS NOT NULL
         UNION ALL SELECT file FROM media_thumbnails",
    )?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
