//! SQL for end-to-end encryption: device and one-time keys, fallback keys, cross-signing keys
//! and their signatures, the device-list stream, to-device messages and server-side key backup.
//! The server never sees a private key or a decrypted message: these tables hold what clients
//! publish for each other.

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;

/// The largest stream position these tables have used, so the writer never hands one out again
/// after a restart: to-device rows are deleted once acknowledged, so the largest position ever
/// deleted is kept in `meta` (`e2e_to_device_acked_pos`).
pub fn max_stream_pos(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT max(coalesce((SELECT max(pos) FROM e2e_device_list_changes), 0),
                    coalesce((SELECT max(pos) FROM e2e_to_device), 0),
                    coalesce((SELECT CAST(value AS INTEGER) FROM meta
                              WHERE key = 'e2e_to_device_acked_pos'), 0))",
        [],
        |r| r.get(0),
    )?)
}

// ---------------------------------------------------------------- device keys

/// The device keys a device uploaded, as it signed them.
pub fn get_device_keys(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT keys FROM e2e_device_keys WHERE user_id = ?1 AND device_id = ?2",
            [user_id, device_id],
            |r| r.get(0),
        )
        .optional()?)
}

pub fn upsert_device_keys(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    keys: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO e2e_device_keys (user_id, device_id, keys) VALUES (?1, ?2, ?3)
         ON CONFLICT (user_id, device_id) DO UPDATE SET keys = excluded.keys",
        params![user_id, device_id, keys],
    )?;
    Ok(())
}

/// A device that still exists, with its uploaded keys.
pub struct DeviceKeysRow {
    pub device_id: String,
    pub keys: String,
    pub display_name: Option<String>,
}

/// The keys of a user's existing devices (all, or those in `only`).
pub fn list_device_keys(
    conn: &Connection,
    user_id: &str,
    only: Option<&[String]>,
) -> Result<Vec<DeviceKeysRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT k.device_id, k.keys, d.display_name FROM e2e_device_keys k
         JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id
         WHERE k.user_id = ?1 ORDER BY k.device_id",
    )?;
    let rows = stmt.query_map([user_id], |r| {
        Ok(DeviceKeysRow {
            device_id: r.get(0)?,
            keys: r.get(1)?,
            display_name: r.get(2)?,
        })
    })?;
    let rows: Vec<DeviceKeysRow> = rows.collect::<rusqlite::Result<_>>()?;
    Ok(match only {
        Some(ids) if !ids.is_empty() => rows
            .into_iter()
            .filter(|r| ids.contains(&r.device_id))
            .collect(),
        _ => rows,
    })
}

/// Whether the device exists (keys can be uploaded and claimed only for real devices).
pub fn device_exists(conn: &Connection, user_id: &str, device_id: &str) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM devices WHERE user_id = ?1 AND device_id = ?2)",
        [user_id, device_id],
        |r| r.get(0),
    )?)
}

// ---------------------------------------------------------------- one-time and fallback keys

pub fn get_one_time_key(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    algorithm: &str,
    key_id: &str,
) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT key FROM e2e_one_time_keys
             WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND key_id = ?4",
            [user_id, device_id, algorithm, key_id],
            |r| r.get(0),
        )
        .optional()?)
}

pub fn insert_one_time_key(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    algorithm: &str,
    key_id: &str,
    key: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO e2e_one_time_keys (user_id, device_id, algorithm, key_id, key)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![user_id, device_id, algorithm, key_id, key],
    )?;
    Ok(())
}

/// (algorithm, count) of a device's unclaimed one-time keys.
pub fn count_one_time_keys(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
) -> Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT algorithm, count(*) FROM e2e_one_time_keys
         WHERE user_id = ?1 AND device_id = ?2 GROUP BY algorithm",
    )?;
    let rows = stmt.query_map([user_id, device_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Takes one one-time key of `algorithm` away from the device: the row is deleted in the same
/// statement that returns it, so no key is ever handed out twice. Returns (key ID, key JSON).
pub fn claim_one_time_key(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    algorithm: &str,
) -> Result<Option<(String, String)>> {
    take_key(
        conn,
        "DELETE FROM e2e_one_time_keys WHERE rowid = (
             SELECT rowid FROM e2e_one_time_keys
             WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3
             ORDER BY key_id LIMIT 1)
         RETURNING key_id, key",
        [user_id, device_id, algorithm],
    )
}

/// Runs a claiming statement (`… RETURNING key_id, key`) for one device and algorithm.
fn take_key(conn: &Connection, sql: &str, args: [&str; 3]) -> Result<Option<(String, String)>> {
    Ok(conn
        .query_row(sql, args, |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// Stores a device's fallback key for an algorithm. The same key uploaded again keeps its
/// `used` mark (clients re-upload it); a new key starts unused.
pub fn upsert_fallback_key(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    algorithm: &str,
    key_id: &str,
    key: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO e2e_fallback_keys (user_id, device_id, algorithm, key_id, key, used)
         VALUES (?1, ?2, ?3, ?4, ?5, 0)
         ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET
           used = CASE WHEN key_id = excluded.key_id AND key = excluded.key THEN used ELSE 0 END,
           key_id = excluded.key_id, key = excluded.key",
        params![user_id, device_id, algorithm, key_id, key],
    )?;
    Ok(())
}

/// The fallback key of `algorithm`, marked used (it stays available: a fallback key is handed
/// out as often as needed until the device replaces it). Returns (key ID, key JSON).
pub fn claim_fallback_key(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    algorithm: &str,
) -> Result<Option<(String, String)>> {
    take_key(
        conn,
        "UPDATE e2e_fallback_keys SET used = 1
         WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3
         RETURNING key_id, key",
        [user_id, device_id, algorithm],
    )
}

/// The algorithms for which the device has a fallback key that was not handed out yet.
pub fn list_unused_fallback_algorithms(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT algorithm FROM e2e_fallback_keys
         WHERE user_id = ?1 AND device_id = ?2 AND used = 0 ORDER BY algorithm",
    )?;
    let rows = stmt.query_map([user_id, device_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---------------------------------------------------------------- cross-signing

/// (public key, key JSON) of a user's cross-signing key of `key_type`.
pub fn get_cross_signing_key(
    conn: &Connection,
    user_id: &str,
    key_type: &str,
) -> Result<Option<(String, String)>> {
    Ok(conn
        .query_row(
            "SELECT public_key, keys FROM e2e_cross_signing_keys WHERE user_id = ?1 AND key_type = ?2",
            [user_id, key_type],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

pub fn upsert_cross_signing_key(
    conn: &Connection,
    user_id: &str,
    key_type: &str,
    public_key: &str,
    keys: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO e2e_cross_signing_keys (user_id, key_type, public_key, keys) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (user_id, key_type) DO UPDATE SET public_key = excluded.public_key, keys = excluded.keys",
        params![user_id, key_type, public_key, keys],
    )?;
    Ok(())
}

pub fn upsert_signature(
    conn: &Connection,
    target_user: &str,
    target_key: &str,
    signer_user: &str,
    signer_key_id: &str,
    signature: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO e2e_signatures (target_user, target_key, signer_user, signer_key_id, signature)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (target_user, target_key, signer_user, signer_key_id)
         DO UPDATE SET signature = excluded.signature",
        params![target_user, target_key, signer_user, signer_key_id, signature],
    )?;
    Ok(())
}

/// (signer user, signer key ID, signature) of the signatures uploaded for a key.
pub fn list_signatures(
    conn: &Connection,
    target_user: &str,
    target_key: &str,
) -> Result<Vec<(String, String, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT signer_user, signer_key_id, signature FROM e2e_signatures
         WHERE target_user = ?1 AND target_key = ?2",
    )?;
    let rows = stmt.query_map([target_user, target_key], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Drops the signatures a user's replaced cross-signing key made (`signer_key_id`
/// `ed25519:<old public key>`): they no longer verify against anything the user publishes.
pub fn delete_signatures_by(
    conn: &Connection,
    signer_user: &str,
    signer_key_id: &str,
) -> Result<()> {
    conn.execute(
        "DELETE FROM e2e_signatures WHERE signer_user = ?1 AND signer_key_id = ?2",
        [signer_user, signer_key_id],
    )?;
    Ok(())
}

// ---------------------------------------------------------------- device-list stream

pub fn insert_device_list_change(conn: &Connection, pos: i64, user_id: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO e2e_device_list_changes (pos, user_id) VALUES (?1, ?2)",
        params![pos, user_id],
    )?;
    Ok(())
}

/// Users who share a joined room with `user_id` (or are that user) and whose devices or keys
/// changed with `since < pos <= upto`. Driven from the user's own rooms (one index probe per
/// fellow member), never by scanning the server's changes.
pub fn list_key_changes_sharing(
    conn: &Connection,
    user_id: &str,
    since: i64,
    upto: i64,
) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT m.state_key FROM current_state me
         JOIN current_state m ON m.room_id = me.room_id AND m.type = 'm.room.member'
              AND m.membership = 'join'
         WHERE me.type = 'm.room.member' AND me.state_key = ?1 AND me.membership = 'join'
           AND EXISTS (SELECT 1 FROM e2e_device_list_changes c
                       WHERE c.user_id = m.state_key AND c.pos > ?2 AND c.pos <= ?3)
         UNION
         SELECT ?1 WHERE EXISTS (SELECT 1 FROM e2e_device_list_changes c
                                 WHERE c.user_id = ?1 AND c.pos > ?2 AND c.pos <= ?3)",
    )?;
    let rows = stmt.query_map(params![user_id, since, upto], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// (user, membership) of the member entries of a room's current state that changed with
/// `since < pos <= upto`.
pub fn list_member_changes_between(
    conn: &Connection,
    room_id: &str,
    since: i64,
    upto: i64,
) -> Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT state_key, coalesce(membership, '') FROM current_state
         WHERE room_id = ?1 AND type = 'm.room.member' AND pos > ?2 AND pos <= ?3",
    )?;
    let rows = stmt.query_map(params![room_id, since, upto], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Whether two users are both joined to some room.
pub fn shares_room(conn: &Connection, a: &str, b: &str) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM current_state x JOIN current_state y ON y.room_id = x.room_id
             WHERE x.type = 'm.room.member' AND x.state_key = ?1 AND x.membership = 'join'
               AND y.type = 'm.room.member' AND y.state_key = ?2 AND y.membership = 'join')",
        [a, b],
        |r| r.get(0),
    )?)
}

// ---------------------------------------------------------------- to-device messages

/// Records a `/sendToDevice` transaction ID; false if the device used it before.
pub fn insert_to_device_txn(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    txn_id: &str,
) -> Result<bool> {
    Ok(conn.execute(
        "INSERT OR IGNORE INTO e2e_to_device_txns (user_id, device_id, txn_id) VALUES (?1, ?2, ?3)",
        [user_id, device_id, txn_id],
    )? > 0)
}

/// The device IDs of a user (the `*` of `/sendToDevice`).
pub fn list_device_ids(conn: &Connection, user_id: &str) -> Result<Vec<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT device_id FROM devices WHERE user_id = ?1 ORDER BY device_id")?;
    let rows = stmt.query_map([user_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub struct ToDeviceRow {
    pub pos: i64,
    pub sender: String,
    pub kind: String,
    pub content: String,
}

#[allow(clippy::too_many_arguments)]
pub fn insert_to_device(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    pos: i64,
    sender: &str,
    kind: &str,
    content: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO e2e_to_device (user_id, device_id, pos, sender, type, content)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![user_id, device_id, pos, sender, kind, content],
    )?;
    Ok(())
}

/// A device's messages with `after < pos <= upto`, oldest first, at most `limit`.
pub fn list_to_device(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    after: i64,
    upto: i64,
    limit: usize,
) -> Result<Vec<ToDeviceRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT pos, sender, type, content FROM e2e_to_device
         WHERE user_id = ?1 AND device_id = ?2 AND pos > ?3 AND pos <= ?4 ORDER BY pos LIMIT ?5",
    )?;
    let rows = stmt.query_map(
        params![user_id, device_id, after, upto, limit as i64],
        |r| {
            Ok(ToDeviceRow {
                pos: r.get(0)?,
                sender: r.get(1)?,
                kind: r.get(2)?,
                content: r.get(3)?,
            })
        },
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Whether the device has messages at or below `upto` (acknowledged, waiting for deletion).
pub fn has_to_device_upto(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    upto: i64,
) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM e2e_to_device WHERE user_id = ?1 AND device_id = ?2 AND pos <= ?3)",
        params![user_id, device_id, upto],
        |r| r.get(0),
    )?)
}

/// Deletes the messages a device acknowledged, keeping the largest deleted position so it is
/// never handed out again (see [`max_stream_pos`]).
pub fn delete_to_device_upto(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    upto: i64,
) -> Result<()> {
    let top: Option<i64> = conn.query_row(
        "SELECT max(pos) FROM e2e_to_device WHERE user_id = ?1 AND device_id = ?2 AND pos <= ?3",
        params![user_id, device_id, upto],
        |r| r.get(0),
    )?;
    let Some(top) = top else {
        return Ok(());
    };
    conn.execute(
        "DELETE FROM e2e_to_device WHERE user_id = ?1 AND device_id = ?2 AND pos <= ?3",
        params![user_id, device_id, upto],
    )?;
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('e2e_to_device_acked_pos', ?1)
         ON CONFLICT (key) DO UPDATE SET
           value = CAST(max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER)) AS TEXT)",
        [top.to_string()],
    )?;
    Ok(())
}

/// Everything a deleted device leaves behind: its keys, one-time and fallback keys, the
/// signatures of its keys, and its to-device inbox.
pub fn delete_device_e2e(conn: &Connection, user_id: &str, device_id: &str) -> Result<()> {
    let top: Option<i64> = conn.query_row(
        "SELECT max(pos) FROM e2e_to_device WHERE user_id = ?1 AND device_id = ?2",
        [user_id, device_id],
        |r| r.get(0),
    )?;
    if let Some(top) = top {
        delete_to_device_upto(conn, user_id, device_id, top)?;
    }
    for table in [
        "e2e_device_keys",
        "e2e_one_time_keys",
        "e2e_fallback_keys",
        "e2e_to_device_txns",
    ] {
        conn.execute(
            &format!("DELETE FROM {table} WHERE user_id = ?1 AND device_id = ?2"),
            [user_id, device_id],
        )?;
    }
    conn.execute(
        "DELETE FROM e2e_signatures WHERE target_user = ?1 AND target_key = ?2",
        [user_id, device_id],
    )?;
    Ok(())
}

// ---------------------------------------------------------------- key backup

pub struct BackupVersionRow {
    pub version: i64,
    pub algorithm: String,
    pub auth_data: String,
    pub etag: i64,
}

/// A backup version that is not deleted: `version`, or the latest.
pub fn get_backup_version(
    conn: &Connection,
    user_id: &str,
    version: Option<i64>,
) -> Result<Option<BackupVersionRow>> {
    Ok(conn
        .query_row(
            "SELECT version, algorithm, auth_data, etag FROM e2e_backup_versions
             WHERE user_id = ?1 AND deleted = 0 AND (?2 IS NULL OR version = ?2)
             ORDER BY version DESC LIMIT 1",
            params![user_id, version],
            |r| {
                Ok(BackupVersionRow {
                    version: r.get(0)?,
                    algorithm: r.get(1)?,
                    auth_data: r.get(2)?,
                    etag: r.get(3)?,
                })
            },
        )
        .optional()?)
}

/// Creates the next backup version (numbers are never reused, even after a deletion).
pub fn insert_backup_version(
    conn: &Connection,
    user_id: &str,
    algorithm: &str,
    auth_data: &str,
) -> Result<i64> {
    Ok(conn.query_row(
        "INSERT INTO e2e_backup_versions (user_id, version, algorithm, auth_data)
         VALUES (?1, (SELECT coalesce(max(version), 0) + 1 FROM e2e_backup_versions WHERE user_id = ?1), ?2, ?3)
         RETURNING version",
        [user_id, algorithm, auth_data],
        |r| r.get(0),
    )?)
}

pub fn update_backup_auth_data(
    conn: &Connection,
    user_id: &str,
    version: i64,
    auth_data: &str,
) -> Result<()> {
    conn.execute(
        "UPDATE e2e_backup_versions SET auth_data = ?3 WHERE user_id = ?1 AND version = ?2",
        params![user_id, version, auth_data],
    )?;
    Ok(())
}

pub fn set_backup_etag(conn: &Connection, user_id: &str, version: i64, etag: i64) -> Result<()> {
    conn.execute(
        "UPDATE e2e_backup_versions SET etag = ?3 WHERE user_id = ?1 AND version = ?2",
        params![user_id, version, etag],
    )?;
    Ok(())
}

/// Marks a version deleted and drops its keys; false if there was no such live version.
pub fn delete_backup_version(conn: &Connection, user_id: &str, version: i64) -> Result<bool> {
    let n = conn.execute(
        "UPDATE e2e_backup_versions SET deleted = 1 WHERE user_id = ?1 AND version = ?2 AND deleted = 0",
        params![user_id, version],
    )?;
    conn.execute(
        "DELETE FROM e2e_backup_keys WHERE user_id = ?1 AND version = ?2",
        params![user_id, version],
    )?;
    Ok(n > 0)
}

#[derive(Clone, Debug)]
pub struct BackupKeyRow {
    pub room_id: String,
    pub session_id: String,
    pub first_message_index: i64,
    pub forwarded_count: i64,
    pub is_verified: bool,
    pub session_data: String,
}

pub fn upsert_backup_key(
    conn: &Connection,
    user_id: &str,
    version: i64,
    k: &BackupKeyRow,
) -> Result<()> {
    conn.execute(
        "INSERT INTO e2e_backup_keys (user_id, version, room_id, session_id, first_message_index,
             forwarded_count, is_verified, session_data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE SET
           first_message_index = excluded.first_message_index,
           forwarded_count = excluded.forwarded_count, is_verified = excluded.is_verified,
           session_data = excluded.session_data",
        params![
            user_id,
            version,
            k.room_id,
            k.session_id,
            k.first_message_index,
            k.forwarded_count,
            k.is_verified,
            k.session_data
        ],
    )?;
    Ok(())
}

/// The keys of a version: all, one room's, or one session's.
pub fn list_backup_keys(
    conn: &Connection,
    user_id: &str,
    version: i64,
    room_id: Option<&str>,
    session_id: Option<&str>,
) -> Result<Vec<BackupKeyRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, session_data
         FROM e2e_backup_keys WHERE user_id = ?1 AND version = ?2
           AND (?3 IS NULL OR room_id = ?3) AND (?4 IS NULL OR session_id = ?4)
         ORDER BY room_id, session_id",
    )?;
    let rows = stmt.query_map(params![user_id, version, room_id, session_id], |r| {
        Ok(BackupKeyRow {
            room_id: r.get(0)?,
            session_id: r.get(1)?,
            first_message_index: r.get(2)?,
            forwarded_count: r.get(3)?,
            is_verified: r.get(4)?,
            session_data: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Deletes a version's keys: all, one room's, or one session's. Returns how many went.
pub fn delete_backup_keys(
    conn: &Connection,
    user_id: &str,
    version: i64,
    room_id: Option<&str>,
    session_id: Option<&str>,
) -> Result<usize> {
    Ok(conn.execute(
        "DELETE FROM e2e_backup_keys WHERE user_id = ?1 AND version = ?2
           AND (?3 IS NULL OR room_id = ?3) AND (?4 IS NULL OR session_id = ?4)",
        params![user_id, version, room_id, session_id],
    )?)
}

pub fn count_backup_keys(conn: &Connection, user_id: &str, version: i64) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT count(*) FROM e2e_backup_keys WHERE user_id = ?1 AND version = ?2",
        params![user_id, version],
        |r| r.get(0),
    )?)
}

/// The position of a user's latest device-list change, if any.
pub fn latest_device_list_change(conn: &Connection, user_id: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT max(pos) FROM e2e_device_list_changes WHERE user_id = ?1")?
        .query_row([user_id], |r| r.get::<_, Option<i64>>(0))?)
}
