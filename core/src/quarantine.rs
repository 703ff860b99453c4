//! The quarantine, as its operator works it (`possync quarantine`): list and
//! show what a terminal could not apply, ask for a message to be applied
//! again (once its plugin is fixed or enabled), or drop it.
//!
//! A requeue is a mark in the table: the running terminal (or the next one
//! to start) takes marked messages within a second and applies them
//! through the same checks and handlers as messages from its queue, in a
//! transaction that also removes them from the table. One that fails again
//! is quarantined again, with its new reason.

use possync_sdk::Migration;
use rusqlite::params;

use crate::store::{Database, DatabaseError, Quarantined, unix_now};

/// Adds the requeue mark.
pub(crate) const MIGRATION: Migration = Migration::new(
    "possync/quarantine-requeue",
    "ALTER TABLE possync_quarantine ADD COLUMN requeued_at INTEGER;
     CREATE INDEX IF NOT EXISTS possync_quarantine_requeued
         ON possync_quarantine (id) WHERE requeued_at IS NOT NULL;",
);

/// Requeued messages a terminal applies at a time.
pub(crate) const REQUEUE_BATCH: usize = 100;

/// One row of the quarantine table.
#[derive(Debug, Clone, PartialEq)]
pub struct QuarantineEntry {
    /// Its id in the table: what `show`, `requeue` and `drop` take.
    pub id: i64,
    /// When it was quarantined (seconds since the epoch).
    pub received_at: i64,
    /// When a requeue was asked for, if one waits to be applied.
    pub requeued_at: Option<i64>,
    /// The message and why it was quarantined.
    pub message: Quarantined,
}

impl QuarantineEntry {
    /// Whether the table holds only the first part of the body (the whole
    /// is in the dead-letter queue).
    pub fn is_cut(&self) -> bool {
        self.message.body_bytes > self.message.body.len() as u64
    }
}

/// Which rows a command acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// The row with this id.
    One(i64),
    /// Every row.
    All,
}

const COLUMNS: &str = "id, received_at, requeued_at, routing_key, message_type, message_id, reason,
    body, coalesce(body_bytes, length(body)), coalesce(body_sha256, '')";

fn entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<QuarantineEntry> {
    Ok(QuarantineEntry {
        id: row.get(0)?,
        received_at: row.get(1)?,
        requeued_at: row.get(2)?,
        message: Quarantined {
            routing_key: row.get(3)?,
            message_type: row.get(4)?,
            message_id: row.get(5)?,
            reason: row.get(6)?,
            body: row.get(7)?,
            body_bytes: row.get::<_, i64>(8)?.try_into().unwrap_or(0),
            body_sha256: row.get(9)?,
        },
    })
}

impl Database {
    /// Quarantined messages, newest first, at most `limit`.
    pub fn quarantine_entries(&self, limit: usize) -> Result<Vec<QuarantineEntry>, DatabaseError> {
        let mut statement = self.connection().prepare(&format!(
            "SELECT {COLUMNS} FROM possync_quarantine ORDER BY id DESC LIMIT ?1"
        ))?;
        let rows = statement.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], entry)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The rows `rows` names, oldest first.
    pub fn quarantine_rows(&self, rows: Rows) -> Result<Vec<QuarantineEntry>, DatabaseError> {
        let (clause, id) = match rows {
            Rows::One(id) => ("WHERE id = ?1", id),
            Rows::All => ("WHERE ?1 IS NOT NULL", 0),
        };
        let mut statement = self.connection().prepare(&format!(
            "SELECT {COLUMNS} FROM possync_quarantine {clause} ORDER BY id"
        ))?;
        let found = statement.query_map([id], entry)?;
        Ok(found.collect::<Result<_, _>>()?)
    }

    /// Marks row `id` to be applied again; with `whole_body`, first puts
    /// back the whole body of a row that kept only its first part. `false`
    /// if there is no such row.
    pub fn mark_requeued(
        &mut self,
        id: i64,
        whole_body: Option<&[u8]>,
    ) -> Result<bool, DatabaseError> {
        let marked = match whole_body {
            Some(body) => self.connection().execute(
                "UPDATE possync_quarantine SET requeued_at = ?2, body = ?3 WHERE id = ?1",
                params![id, unix_now(), body],
            )?,
            None => self.connection().execute(
                "UPDATE possync_quarantine SET requeued_at = ?2 WHERE id = ?1",
                params![id, unix_now()],
            )?,
        };
        Ok(marked == 1)
    }

    /// Removes row `id`; `false` if there was none.
    pub fn drop_quarantined(&mut self, id: i64) -> Result<bool, DatabaseError> {
        Ok(self
            .connection()
            .execute("DELETE FROM possync_quarantine WHERE id = ?1", [id])?
            == 1)
    }

    /// The oldest rows marked to be applied again: (id, routing key, body).
    pub(crate) fn requeued(&self) -> Result<Vec<(i64, String, Vec<u8>)>, rusqlite::Error> {
        let mut statement = self.connection().prepare_cached(
            "SELECT id, routing_key, body FROM possync_quarantine
             WHERE requeued_at IS NOT NULL ORDER BY id LIMIT ?1",
        )?;
        let rows = statement
            .query_map([i64::try_from(REQUEUE_BATCH).unwrap_or(i64::MAX)], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?;
        rows.collect()
    }
}
