//! What `/` and `/status` show, read once per request: the terminal's
//! status, and the messages that could not apply, from its database.

use std::time::{SystemTime, UNIX_EPOCH};

use super::StatusView;
use crate::feed::{self, Change};
use crate::status::Status;
use crate::store::{Database, Quarantined};

/// How many of the latest messages that could not apply are shown.
const LATEST: usize = 10;

#[derive(Debug)]
pub(super) struct Snapshot {
    pub(super) status: Status,
    /// Rows in the quarantine table.
    pub(super) quarantine_total: usize,
    /// The latest of them.
    pub(super) latest: Vec<Quarantined>,
    /// The latest changes of the change feed, oldest first.
    pub(super) recent: Vec<(i64, Change)>,
    /// The notices showing on this terminal, if the notices plugin keeps
    /// them (its view `notices_active`).
    pub(super) notices: Vec<Notice>,
}

/// A notice for the staff, as the page shows it.
#[derive(Debug)]
pub(super) struct Notice {
    pub(super) text: String,
    pub(super) severity: String,
    /// UTC, RFC 3339, to the second.
    pub(super) expires_at: Option<String>,
}

/// The notices the notices plugin's view shows on this terminal; none when
/// the plugin is off (no view).
fn notices(connection: &rusqlite::Connection) -> rusqlite::Result<Vec<Notice>> {
    let mut statement = connection.prepare(
        "SELECT text, severity, expires_at FROM notices_active
         ORDER BY CASE severity WHEN 'critical' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END, created_at",
    )?;
    let rows = statement.query_map([], |row| {
        Ok(Notice {
            text: row.get(0)?,
            severity: row.get(1)?,
            expires_at: row.get(2)?,
        })
    })?;
    rows.collect()
}

impl Snapshot {
    /// Reads the database, so it blocks: call it off the async runtime.
    pub(super) fn take(view: &StatusView) -> Self {
        let status = view.status.borrow().clone();
        // The terminal writes the database; a read-only look does not disturb it.
        let Ok(database) = Database::open_read_only(&view.database) else {
            return Self {
                status,
                quarantine_total: 0,
                latest: Vec::new(),
                recent: Vec::new(),
                notices: Vec::new(),
            };
        };
        let quarantine_total = database
            .status_record()
            .ok()
            .flatten()
            .map_or(0, |s| usize::try_from(s.quarantine_rows).unwrap_or(0));
        Self {
            status,
            quarantine_total,
            latest: database.quarantined(LATEST).unwrap_or_default(),
            // A database from before the feed has no table for it yet.
            recent: feed::recent(database.connection(), LATEST).unwrap_or_default(),
            notices: notices(database.connection()).unwrap_or_default(),
        }
    }
}

/// `time` as RFC 3339 in UTC, to the second.
pub(super) fn rfc3339(time: SystemTime) -> String {
    let nanos = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::try_from(nanos).unwrap_or(0))
        .ok()
        .and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// `ms` milliseconds after the epoch as RFC 3339 in UTC, to the second.
pub(super) fn ms_rfc3339(ms: i64) -> String {
    rfc3339(UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}
