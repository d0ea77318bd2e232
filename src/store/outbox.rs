//! SQL of the federation sender (`workers::federation`): the `outbox` rows (queued by the
//! event's own write, see `queries::insert_outbox_pdu`) and the per-destination retry state in
//! `destinations`.
//!
//! The one rule: an outbox row is deleted only by [`delete_sent`], after the destination
//! answered 200 to the transaction that carried it.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::value::RawValue;

use super::Tx;
use crate::error::Result;

/// What one transaction to a destination carries, read in `id` order.
#[derive(Default)]
pub struct Batch {
    /// Every row this batch covers (PDU rows whose event no longer exists included, so
    /// they are dropped with the rest).
    pub ids: Vec<i64>,
    /// The stored PDU JSON (as signed) of each PDU row whose event exists.
    pub pdus: Vec<Box<RawValue>>,
    /// The event ID of each PDU in `pdus`, in the same order (PDUs of room versions 3 and
    /// later do not carry their ID).
    pub pdu_ids: Vec<String>,
    /// The `attempts` of each PDU in `pdus` (sends the destination did not process).
    pub pdu_attempts: Vec<i64>,
    /// The EDU JSON of each EDU row.
    pub edus: Vec<Box<RawValue>>,
}

/// Destinations with pending rows whose `retry_at` has passed at `now_ms` (a destination
/// without a `destinations` row is due), and the earliest `retry_at` still in the future among
/// destinations with pending rows.
pub fn due_destinations(conn: &Connection, now_ms: u64) -> Result<(Vec<String>, Option<u64>)> {
    let mut stmt = conn.prepare_cached(
        "SELECT o.destination, COALESCE(d.retry_at, 0)
         FROM (SELECT DISTINCT destination FROM outbox) o
         LEFT JOIN destinations d ON d.name = o.destination",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut due = Vec::new();
    let mut next: Option<u64> = None;
    for row in rows {
        let (dest, retry_at) = row?;
        let retry_at = retry_at.max(0) as u64;
        if retry_at <= now_ms {
            due.push(dest);
        } else {
            next = Some(next.map_or(retry_at, |n| n.min(retry_at)));
        }
    }
    Ok((due, next))
}

/// Up to `max_pdus` PDU rows and `max_edus` EDU rows for `dest`, each kind in `id` order.
pub fn next_batch(
    conn: &Connection,
    dest: &str,
    max_pdus: usize,
    max_edus: usize,
) -> Result<Batch> {
    let mut batch = Batch::default();
    let mut stmt = conn.prepare_cached(
        "SELECT o.id, e.json, o.event_id, o.attempts FROM outbox o
         LEFT JOIN events e ON e.event_id = o.event_id
         WHERE o.destination = ?1 AND o.kind = 'pdu' ORDER BY o.id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![dest, max_pdus as i64], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    for row in rows {
        let (id, json, event_id, attempts) = row?;
        batch.ids.push(id);
        match json {
            Some(j) => {
                batch.pdus.push(RawValue::from_string(j)?);
                batch.pdu_ids.push(event_id.unwrap_or_default());
                batch.pdu_attempts.push(attempts);
            }
            None => log::warn!("outbox row {id} for {dest}: its event no longer exists; dropped"),
        }
    }
    let mut stmt = conn.prepare_cached(
        "SELECT id, payload FROM outbox WHERE destination = ?1 AND kind = 'edu'
         ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![dest, max_edus as i64], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?))
    })?;
    for row in rows {
        let (id, payload) = row?;
        batch.ids.push(id);
        match payload.map(RawValue::from_string) {
            Some(Ok(edu)) => batch.edus.push(edu),
            _ => log::warn!("outbox row {id} for {dest}: EDU payload is not JSON; dropped"),
        }
    }
    Ok(batch)
}

/// After the destination's 200: deletes exactly the rows the transaction carried and resets
/// the destination's backoff, in the caller's one write.
pub fn delete_sent(tx: &Tx<'_>, dest: &str, ids: &[i64]) -> Result<()> {
    {
        let mut stmt =
            tx.prepare_cached("DELETE FROM outbox WHERE id = ?1 AND destination = ?2")?;
        for id in ids {
            stmt.execute(params![id, dest])?;
        }
    }
    reset_backoff(tx, dest)?;
    Ok(())
}

/// PDUs the destination took without processing, to go again (each `(event_id, attempts)`,
/// `attempts` counting this send) as new rows at the end of its queue, not before `retry_at`:
/// the destination waits until then, without a failure being counted (a signed request from
/// it clears the wait, as it clears a backoff). In the caller's write, after [`delete_sent`].
pub fn requeue(tx: &Tx<'_>, dest: &str, rows: &[(String, i64)], retry_at: u64) -> Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO outbox (destination, kind, event_id, attempts) VALUES (?1, 'pdu', ?2, ?3)",
    )?;
    for (event_id, attempts) in rows {
        insert.execute(params![dest, event_id, attempts])?;
    }
    tx.prepare_cached(
        "INSERT INTO destinations (name, retry_at) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET retry_at = MAX(retry_at, ?2)",
    )?
    .execute(params![dest, retry_at as i64])?;
    Ok(())
}

/// Records a failed transaction: `failures += 1`, the backoff doubles (from `min_ms`, capped
/// at `max_ms`) and `retry_at = now + backoff`. Returns the new backoff.
pub fn record_failure(tx: &Tx<'_>, dest: &str, min_ms: u64, max_ms: u64) -> Result<u64> {
    let now = tx.now_ms as i64;
    let backoff: i64 = tx
        .prepare_cached(
            "INSERT INTO destinations (name, retry_at, backoff_ms, failures)
             VALUES (?1, ?2 + ?3, ?3, 1)
             ON CONFLICT (name) DO UPDATE SET
                 backoff_ms = MIN(MAX(backoff_ms * 2, ?3), ?4),
                 retry_at = ?2 + MIN(MAX(backoff_ms * 2, ?3), ?4),
                 failures = failures + 1
             RETURNING backoff_ms",
        )?
        .query_row(params![dest, now, min_ms as i64, max_ms as i64], |r| {
            r.get(0)
        })?;
    Ok(backoff.max(0) as u64)
}

/// Clears the destination's backoff if it has one. Returns whether anything changed.
pub fn reset_backoff(tx: &Tx<'_>, dest: &str) -> Result<bool> {
    let n = tx
        .prepare_cached(
            "UPDATE destinations SET retry_at = 0, backoff_ms = 0, failures = 0
             WHERE name = ?1 AND (retry_at > 0 OR backoff_ms > 0 OR failures > 0)",
        )?
        .execute([dest])?;
    Ok(n > 0)
}

/// Destinations currently in backoff (loaded by the sender at start-up).
pub fn list_backed_off(conn: &Connection) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name FROM destinations WHERE retry_at > 0 OR backoff_ms > 0 OR failures > 0",
    )?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Pending rows per destination (for `/_hearth/metrics`).
pub fn queue_depths(conn: &Connection) -> Result<Vec<(String, u64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT destination, COUNT(*) FROM outbox GROUP BY destination ORDER BY destination",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (d, n) = row?;
        out.push((d, n.max(0) as u64));
    }
    Ok(out)
}

/// A destination's retry state: `(retry_at, backoff_ms, failures)`.
pub fn destination_state(conn: &Connection, dest: &str) -> Result<Option<(u64, u64, u64)>> {
    Ok(conn
        .prepare_cached("SELECT retry_at, backoff_ms, failures FROM destinations WHERE name = ?1")?
        .query_row([dest], |r| {
            Ok((
                r.get::<_, i64>(0)?.max(0) as u64,
                r.get::<_, i64>(1)?.max(0) as u64,
                r.get::<_, i64>(2)?.max(0) as u64,
            ))
        })
        .optional()?)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{notify::Notifier, store::Store, Clock};

    struct Fixed;
    impl Clock for Fixed {
        fn now_ms(&self) -> u64 {
            1_000_000
        }
    }

    #[test]
    fn backoff_doubles_from_5s_is_capped_at_an_hour_and_resets() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &dir.path().join("h.db"),
            1,
            Arc::new(Fixed),
            Notifier::default(),
        )
        .unwrap();
        let fail = || {
            smol::block_on(store.write(|tx| record_failure(tx, "d.example", 5_000, 3_600_000)))
                .unwrap()
        };
        let seen: Vec<u64> = (0..12).map(|_| fail()).collect();
        assert_eq!(
            seen,
            vec![
                5_000, 10_000, 20_000, 40_000, 80_000, 160_000, 320_000, 640_000, 1_280_000,
                2_560_000, 3_600_000, 3_600_000
            ]
        );
        let state =
            |s: &Store| smol::block_on(s.read(|c| destination_state(c, "d.example"))).unwrap();
        assert_eq!(state(&store), Some((1_000_000 + 3_600_000, 3_600_000, 12)));
        let due = smol::block_on(store.read(|c| due_destinations(c, 1_000_000))).unwrap();
        assert_eq!(
            due,
            (vec![], None),
            "no rows queued: nothing is due or pending"
        );
        assert!(smol::block_on(store.write(|tx| reset_backoff(tx, "d.example"))).unwrap());
        assert!(!smol::block_on(store.write(|tx| reset_backoff(tx, "d.example"))).unwrap());
        assert_eq!(state(&store), Some((0, 0, 0)));
        store.close().unwrap();
    }
}
