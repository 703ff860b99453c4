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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use possync_catalog as _;
    use possync_sdk::Envelope;

    use super::*;
    use crate::applier::{Applier, Limits};
    use crate::identity::LicenseKey;
    use crate::inbound::Inbound;
    use crate::registry::Registry;

    fn applier(path: &std::path::Path, quarantine_max_rows: u32) -> Applier {
        applier_with(path, quarantine_max_rows, &Default::default())
    }

    /// An applier over `path` with the built-in plugins as `plugins` says.
    fn applier_with(
        path: &std::path::Path,
        quarantine_max_rows: u32,
        plugins: &std::collections::BTreeMap<String, crate::config::PluginSetting>,
    ) -> Applier {
        let mut database = Database::open(path).expect("opens");
        let registry = Registry::from_config(plugins).expect("built-ins");
        database
            .migrate(registry.migrations().iter())
            .expect("migrates");
        Applier::new(
            database,
            Arc::new(registry),
            LicenseKey::new("K").expect("valid"),
            Limits {
                max_message_bytes: 1 << 20,
                max_attempts: 3,
                quarantine_max_rows,
                quarantine_max_age_secs: 3600,
                applied_ids_max_age_secs: 3600,
                collapse_min_batch: 0,
                feed_keep: 0,
            },
            crate::feed::channel(),
        )
    }

    fn price(product: &str, seq: i64) -> Envelope {
        Envelope::new(
            "price_update",
            "K",
            serde_json::json!({"product_id": product, "new_price": 2.5}),
        )
        .with_seq(seq)
        .with_catalog("c")
    }

    fn inbound(envelope: &Envelope) -> Inbound {
        Inbound {
            tag: 1,
            routing_key: format!("license.K.{}", envelope.message_type),
            body: serde_json::to_vec(envelope).expect("encodes"),
            redelivered: false,
            requeued: false,
        }
    }

    fn open(path: &std::path::Path) -> Database {
        Database::open(path).expect("opens")
    }

    #[test]
    fn a_requeued_change_that_applies_leaves_the_table_and_no_longer_holds_synced_up_to_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pos.db");
        let mut applier = applier(&path, 100);
        let batch = [price("P1", 1), price("", 2), price("P3", 3)];
        applier
            .apply(&batch.iter().map(inbound).collect::<Vec<_>>())
            .expect("applies");
        let mut database = open(&path);
        assert_eq!(database.sync_state("K").expect("state").synced_up_to, 1);
        let row = database.quarantine_entries(10).expect("rows").remove(0);
        // The plugin fixed: here, the body it now takes.
        let fixed = serde_json::to_vec(&price("P2", 2)).expect("encodes");
        assert!(database.mark_requeued(row.id, Some(&fixed)).expect("marks"));

        applier.requeue();
        assert!(database.quarantine_entries(10).expect("rows").is_empty());
        assert_eq!(
            database.sync_state("K").expect("state").synced_up_to,
            3,
            "every change up to 3 is applied now"
        );
        let price: f64 = database
            .connection()
            .query_row("SELECT price FROM products WHERE id = 'P2'", [], |row| {
                row.get(0)
            })
            .expect("applied");
        assert_eq!(price, 2.5);
    }

    #[test]
    fn a_requeued_message_that_fails_again_keeps_its_row_whole_with_the_new_reason() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pos.db");
        let mut applier = applier(&path, 100);
        let big = "x".repeat(100 * 1024);
        let envelope = Envelope::new("teleport_update", "K", serde_json::json!({"pad": big}));
        applier.apply(&[inbound(&envelope)]).expect("applies");
        let mut database = open(&path);
        let row = database.quarantine_entries(10).expect("rows").remove(0);
        assert!(row.is_cut());
        let whole = serde_json::to_vec(&envelope).expect("encodes");
        assert!(database.mark_requeued(row.id, Some(&whole)).expect("marks"));

        applier.requeue();
        let again = database.quarantine_entries(10).expect("rows");
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(again[0].id, row.id, "the same row");
        assert_eq!(again[0].requeued_at, None, "no longer waiting");
        assert_eq!(again[0].message.body, whole, "whole, as requeued");
        assert!(
            again[0].message.reason.contains("no plugin"),
            "{:?}",
            again[0].message.reason
        );
    }

    #[test]
    fn rows_waiting_to_be_requeued_are_never_trimmed_to_make_room() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pos.db");
        let mut applier = applier(&path, 2);
        let first = Envelope::new("teleport_update", "K", serde_json::json!({"n": 1}));
        applier.apply(&[inbound(&first)]).expect("applies");
        let mut database = open(&path);
        let waiting = database.quarantine_entries(10).expect("rows").remove(0).id;
        database.mark_requeued(waiting, None).expect("marks");
        for n in 2..6 {
            let more = Envelope::new("teleport_update", "K", serde_json::json!({"n": n}));
            applier.apply(&[inbound(&more)]).expect("applies");
        }
        let ids: Vec<i64> = database
            .quarantine_entries(10)
            .expect("rows")
            .iter()
            .map(|row| row.id)
            .collect();
        assert!(ids.contains(&waiting), "{ids:?}");
    }

    #[test]
    fn a_message_requeued_while_its_plugin_is_off_stays_quarantined_with_what_to_do() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pos.db");
        let mut applier = applier(&path, 100);
        applier.apply(&[inbound(&price("", 1))]).expect("applies");
        drop(applier);
        let plugins = [(
            "price".to_owned(),
            crate::config::PluginSetting::Toggle(false),
        )]
        .into_iter()
        .collect();
        let mut off = applier_with(&path, 100, &plugins);
        let mut database = open(&path);
        let row = database.quarantine_entries(10).expect("rows").remove(0);
        database.mark_requeued(row.id, None).expect("marks");
        off.requeue();
        let kept = database.quarantine_entries(10).expect("rows");
        assert_eq!(kept.len(), 1);
        assert!(
            kept[0].message.reason.contains("switched off"),
            "{:?}",
            kept[0].message.reason
        );
        assert_eq!(kept[0].requeued_at, None);
    }
}
