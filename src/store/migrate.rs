//! The migration runner. A fresh database gets `schema.sql` whole and is stamped with
//! `SCHEMA_VERSION`; an older one runs the numbered `STEPS` after its recorded version, each
//! step and its stamp in one transaction.

use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result};

/// The whole schema, compiled into the binary.
pub const SCHEMA: &str = include_str!("../../schema.sql");

/// The version `SCHEMA` describes.
pub const SCHEMA_VERSION: i64 = 1;

/// Upgrades from version `n` to `n + 1` are `STEPS[n - 1]`. (Empty while only version 1 exists.)
const STEPS: &[&str] = &[];

pub fn migrate(conn: &mut Connection) -> Result<()> {
    let has_meta: bool = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
            [],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false);
    let current: i64 = if has_meta {
        conn.query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
    } else {
        0
    };
    if current > SCHEMA_VERSION {
        return Err(Error::internal(format_args!(
            "database schema version {current} is newer than this binary's {SCHEMA_VERSION}"
        )));
    }
    if current == 0 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA)?;
        set_version(&tx, SCHEMA_VERSION)?;
        tx.commit()?;
        log::info!("created database schema version {SCHEMA_VERSION}");
        return Ok(());
    }
    for v in current..SCHEMA_VERSION {
        let tx = conn.transaction()?;
        let step = STEPS
            .get((v - 1) as usize)
            .ok_or_else(|| Error::internal("missing migration step"))?;
        tx.execute_batch(step)?;
        set_version(&tx, v + 1)?;
        tx.commit()?;
        log::info!("migrated database schema to version {}", v + 1);
    }
    Ok(())
}

fn set_version(conn: &Connection, v: i64) -> Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [v.to_string()],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_database_is_stamped_and_rerun_is_a_no_op() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: String = conn
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION.to_string());
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name='events'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn newer_database_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        conn.execute(
            "UPDATE meta SET value = '999' WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
        assert!(migrate(&mut conn).is_err());
    }
}
