//! The full-text index of `/search` (`event_search`, SQLite FTS5; rowid = the event's stream
//! position). Rows are written in the event's own transaction and deleted with its redaction
//! (`room::search`); the queries here take the rooms a user may search with the part of each
//! room's history they may see, so visibility, filters, order and pagination are one
//! statement.

use rusqlite::{params, OptionalExtension};
use serde_json::json;

use super::{queries::IN_ROOM, Connection};
use crate::error::Result;

/// Indexes the text of the event at stream position `pos` under `key` (`content.body`, …).
pub fn insert_search(conn: &Connection, pos: i64, key: &str, value: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO event_search (rowid, value, key) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![pos, value, key])?;
    Ok(())
}

/// Removes an event's text (its redaction).
pub fn delete_search(conn: &Connection, event_id: &str) -> Result<()> {
    conn.prepare_cached(
        "DELETE FROM event_search WHERE rowid = (SELECT pos FROM events WHERE event_id = ?1)",
    )?
    .execute([event_id])?;
    Ok(())
}

/// A room the user may search, with the part of its history they may see: events whose
/// topological key `(depth, pos)` is in `(lo, hi]`.
#[derive(Clone, Debug)]
pub struct SearchRoom {
    pub room_id: String,
    pub lo: (i64, i64),
    pub hi: (i64, i64),
}

/// The order of the results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchOrder {
    /// Best match first (FTS5's bm25), then newest.
    Rank,
    /// Newest first by `origin_server_ts`, then stream position (as Synapse).
    Recent,
}

/// Where a page starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchFrom {
    Start,
    /// `Rank`: how many results earlier pages held.
    Offset(i64),
    /// `Recent`: after the result with this `(origin_server_ts, pos)`.
    Before(i64, i64),
}

/// What one search asks.
pub struct SearchQuery<'a> {
    /// An FTS5 query expression (built by `room::search::fts_query`).
    pub fts: &'a str,
    pub rooms: &'a [SearchRoom],
    pub keys: &'a [&'a str],
    pub senders: Option<&'a [String]>,
    pub not_senders: &'a [String],
    pub order: SearchOrder,
    pub from: SearchFrom,
    pub limit: usize,
}

/// One result: the event's stream position, its rank (higher is better), the ordering key of
/// `Recent` and the text with each matched token wrapped in `\u{1}`…`\u{2}`.
#[derive(Clone, Debug)]
pub struct SearchHit {
    pub pos: i64,
    pub depth: i64,
    pub event_id: String,
    pub rank: f64,
    pub origin_server_ts: i64,
    pub marked: String,
}

/// The shared FROM/WHERE of a search and its count: `?1` the FTS query, `?2` the rooms whose
/// whole history the user may see (a JSON array of IDs: an IN list, built once and probed per
/// match), `?10` the others as `[room_id, lo_depth, lo_pos, hi_depth, hi_pos]` (few: rooms left,
/// `joined`/`invited` visibility), `?3` the keys, `?4` the senders (NULL: any), `?5` the senders
/// left out.
fn body() -> String {
    format!(
        "FROM event_search s
         JOIN events e ON e.pos = s.rowid
         WHERE event_search MATCH ?1
           AND (e.room_id IN (SELECT value FROM json_each(?2))
                OR EXISTS (SELECT 1 FROM json_each(?10) b
                           WHERE b.value ->> 0 = e.room_id
                             AND (e.depth, e.pos) > (b.value ->> 1, b.value ->> 2)
                             AND (e.depth, e.pos) <= (b.value ->> 3, b.value ->> 4)))
           AND s.key IN (SELECT value FROM json_each(?3))
           AND (?4 IS NULL OR e.sender IN (SELECT value FROM json_each(?4)))
           AND e.sender NOT IN (SELECT value FROM json_each(?5))
           AND {IN_ROOM}"
    )
}

/// `?2` and `?10` of [`body`].
fn room_params(rooms: &[SearchRoom]) -> (String, String) {
    let open = (i64::MIN, i64::MIN);
    let end = (i64::MAX, i64::MAX);
    let (whole, bounded): (Vec<&SearchRoom>, Vec<&SearchRoom>) =
        rooms.iter().partition(|r| r.lo == open && r.hi == end);
    // The open ends are brought inside what every JSON reader keeps exact.
    let c = |v: i64| v.clamp(-(1 << 62), 1 << 62);
    (
        json!(whole.iter().map(|r| &r.room_id).collect::<Vec<_>>()).to_string(),
        json!(bounded
            .iter()
            .map(|r| json!([r.room_id, c(r.lo.0), c(r.lo.1), c(r.hi.0), c(r.hi.1)]))
            .collect::<Vec<_>>())
        .to_string(),
    )
}

/// One page of results (at most `limit + 1`, so the caller knows whether more follow) and
/// the number of results in all (from the start, whatever page this is).
pub fn search_events(conn: &Connection, q: &SearchQuery<'_>) -> Result<(Vec<SearchHit>, u64)> {
    let (rooms, bounded) = room_params(q.rooms);
    let keys = json!(q.keys).to_string();
    let senders = q.senders.map(|s| json!(s).to_string());
    let not_senders = json!(q.not_senders).to_string();
    let body = body();
    let (order, page, offset, ts, pos) = match (q.order, q.from) {
        (SearchOrder::Rank, from) => (
            "rank ASC, e.pos DESC",
            "",
            match from {
                SearchFrom::Offset(o) => o,
                _ => 0,
            },
            0,
            0,
        ),
        (SearchOrder::Recent, SearchFrom::Before(ts, pos)) => (
            "e.origin_server_ts DESC, e.pos DESC",
            "AND (e.origin_server_ts, e.pos) < (?7, ?8)",
            0,
            ts,
            pos,
        ),
        (SearchOrder::Recent, _) => ("e.origin_server_ts DESC, e.pos DESC", "", 0, 0, 0),
    };
    // `rank` is FTS5's bm25: smaller is better (it is negative), so it is negated for the
    // answer, where higher ranks are better.
    let sql = format!(
        "SELECT e.pos, e.event_id, s.rank, e.origin_server_ts, e.depth, count(*) OVER ()
         {body} {page}
         ORDER BY {order} LIMIT ?6 OFFSET ?9"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    // The window count is of every row the WHERE keeps: all results, unless a `recent` page
    // starts after a cursor.
    let mut total = None;
    let rows = stmt.query_map(
        params![
            q.fts,
            rooms,
            keys,
            senders,
            not_senders,
            (q.limit + 1) as i64,
            ts,
            pos,
            offset,
            bounded
        ],
        |r| {
            total = Some(r.get::<_, i64>(5)?);
            Ok(SearchHit {
                pos: r.get(0)?,
                event_id: r.get(1)?,
                rank: -r.get::<_, f64>(2)?,
                origin_server_ts: r.get(3)?,
                depth: r.get(4)?,
                marked: String::new(),
            })
        },
    )?;
    let mut hits = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    // Marked only for the rows returned: highlight() tokenizes the text again, and in the
    // query above SQLite would compute it for every match before sorting.
    let mut mark = conn.prepare_cached(
        "SELECT highlight(event_search, 0, char(1), char(2)) FROM event_search
         WHERE event_search MATCH ?1 AND rowid = ?2",
    )?;
    for h in &mut hits {
        h.marked = mark
            .query_row(params![q.fts, h.pos], |r| r.get(0))
            .optional()?
            .unwrap_or_default();
    }
    // One pass over the matches when the page query counted them all (every first page, and
    // every `rank` page that has rows); otherwise a count of its own.
    let count: i64 = match total {
        Some(n) if page.is_empty() => n,
        _ => conn
            .prepare_cached(&format!("SELECT count(*) {body}"))?
            .query_row(
                params![
                    q.fts,
                    rooms,
                    keys,
                    senders,
                    not_senders,
                    0,
                    0,
                    0,
                    0,
                    bounded
                ],
                |r| r.get(0),
            )?,
    };
    Ok((hits, count as u64))
}
