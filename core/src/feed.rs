//! The change feed: what each committed batch changed, per entity, for the
//! POS app to follow instead of polling its tables.
//!
//! Every applied message becomes one change `{seq, type, entity, id, op}`,
//! numbered by a counter of the terminal's own (the feed's event id) that
//! never goes back. A batch's changes are written in the batch's own
//! transaction as one row of `possync_feed`, so a change is in the feed
//! exactly when it is in the catalog, and then sent to the subscribers
//! that are listening. The table keeps the last `terminal.feed_keep`
//! changes: a subscriber that comes back with the id of the last change it
//! saw gets everything after it, or, if that is older than what is kept,
//! is told to read everything again.
//!
//! Which entity a message changed comes from its plugin's entity
//! declaration (see [`EntityRule`]); a type without one still appears, with
//! no entity and the op `change`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::entity::{ChangeKind, EntityRule};
use crate::inbound::Message;
use crate::transaction::Transaction;

/// The feed's table: one row a committed batch.
pub(crate) const MIGRATION: possync_sdk::Migration = possync_sdk::Migration::new(
    "possync/feed",
    "CREATE TABLE possync_feed (
         first_id     INTEGER PRIMARY KEY,
         last_id      INTEGER NOT NULL,
         committed_ms INTEGER NOT NULL,
         changes      TEXT NOT NULL
     );
     CREATE INDEX possync_feed_last ON possync_feed (last_id);",
);

/// One change, as the feed sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The store's sequence number of the message, if it carried one.
    pub seq: Option<i64>,
    /// The message type.
    #[serde(rename = "type")]
    pub message_type: String,
    /// The kind of entity changed (`product`, `category`, ...), when the
    /// type's plugin declares it.
    pub entity: Option<String>,
    /// The entity's id.
    pub id: Option<String>,
    /// `upsert`, `delete`, or `change` for a type that declares no entity.
    pub op: ChangeOp,
}

/// What happened to the entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOp {
    /// Created or changed.
    Upsert,
    /// Deleted.
    Delete,
    /// Something of the type's changed; which entity, the type does not say.
    Change,
}

impl Change {
    /// The change an applied message made, as its type's `rule` reads it.
    pub(crate) fn of(message: &Message<'_>, rule: Option<&EntityRule>) -> Self {
        let (entity, id, op) = match rule {
            Some(rule) => (
                Some(rule.entity.clone()),
                rule.id_in(&message.payload),
                match rule.change {
                    ChangeKind::Delete => ChangeOp::Delete,
                    ChangeKind::Replace | ChangeKind::Merge => ChangeOp::Upsert,
                },
            ),
            None => (None, None, ChangeOp::Change),
        };
        Self {
            seq: message.seq,
            message_type: message.message_type.to_string(),
            entity,
            id,
            op,
        }
    }
}

/// A committed batch's changes: ids `first_id`, `first_id + 1`, ...
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FeedBatch {
    pub(crate) first_id: i64,
    pub(crate) changes: Vec<Change>,
}

impl FeedBatch {
    pub(crate) fn last_id(&self) -> i64 {
        self.first_id + self.changes.len() as i64 - 1
    }

    /// Each change with its id.
    pub(crate) fn numbered(&self) -> impl Iterator<Item = (i64, &Change)> {
        (self.first_id..).zip(&self.changes)
    }
}

/// Where committed batches go to the subscribers listening now.
pub(crate) type FeedSender = broadcast::Sender<Arc<FeedBatch>>;

/// Batches a slow subscriber may fall behind by before it reads the rest
/// from the table instead.
const LIVE_BATCHES: usize = 256;

pub(crate) fn channel() -> FeedSender {
    broadcast::channel(LIVE_BATCHES).0
}

/// The writing side, owned by the applier.
#[derive(Debug)]
pub(crate) struct Feed {
    next_id: Option<i64>,
    keep: i64,
    sender: FeedSender,
}

impl Feed {
    pub(crate) fn new(keep: u32, sender: FeedSender) -> Self {
        Self {
            next_id: None,
            keep: i64::from(keep),
            sender,
        }
    }

    /// Writes `changes` in `transaction`, and drops the batches that fell
    /// out of what is kept. The batch is sent by [`Feed::committed`].
    pub(crate) fn write(
        &mut self,
        transaction: &mut Transaction<'_>,
        changes: Vec<Change>,
    ) -> rusqlite::Result<Option<FeedBatch>> {
        if changes.is_empty() || self.keep == 0 {
            return Ok(None);
        }
        let first_id = match self.next_id {
            Some(id) => id,
            None => {
                let last = transaction.query_optional(
                    "SELECT max(last_id) FROM possync_feed",
                    [],
                    |row| row.get::<_, Option<i64>>(0),
                )?;
                last.flatten().unwrap_or(0) + 1
            }
        };
        let batch = FeedBatch { first_id, changes };
        let text = serde_json::to_string(&batch.changes)
            .map_err(|err| rusqlite::Error::ToSqlConversionFailure(Box::new(err)))?;
        transaction.execute(
            "INSERT INTO possync_feed (first_id, last_id, committed_ms, changes)
             VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![first_id, batch.last_id(), crate::store::unix_now_ms(), text],
        )?;
        transaction.execute(
            "DELETE FROM possync_feed WHERE last_id <= ?1",
            [batch.last_id() - self.keep],
        )?;
        Ok(Some(batch))
    }

    /// The transaction that wrote `batch` committed: the next batch numbers
    /// on from it, and the subscribers get it.
    pub(crate) fn committed(&mut self, batch: FeedBatch) {
        self.next_id = Some(batch.last_id() + 1);
        // No subscriber listening is no error: the table has it.
        let _ = self.sender.send(Arc::new(batch));
    }
}

/// What a subscriber asking for the changes after `after` gets from the
/// table.
#[derive(Debug, PartialEq)]
pub(crate) enum Backlog {
    /// The changes after it, in order (none when it is the last).
    Changes(Vec<(i64, Change)>),
    /// It is older than what the table keeps, or newer than any change of
    /// this database: the subscriber must read everything again. `last` is
    /// the id of the last change.
    Reload { last: i64 },
}

/// The id of the last change in the table, 0 when there is none.
pub(crate) fn last_id(connection: &rusqlite::Connection) -> rusqlite::Result<i64> {
    connection.query_row(
        "SELECT coalesce(max(last_id), 0) FROM possync_feed",
        [],
        |row| row.get(0),
    )
}

/// The changes after `after`, from the table.
pub(crate) fn backlog(connection: &rusqlite::Connection, after: i64) -> rusqlite::Result<Backlog> {
    let (oldest, last): (Option<i64>, i64) = connection.query_row(
        "SELECT min(first_id), coalesce(max(last_id), 0) FROM possync_feed",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    // A client of this terminal has seen at most `last`, and, to have missed
    // nothing, at least the change before the oldest kept.
    let too_old = oldest.is_some_and(|oldest| after < oldest - 1);
    if after > last || too_old || after < 0 {
        return Ok(Backlog::Reload { last });
    }
    let mut statement = connection.prepare(
        "SELECT first_id, changes FROM possync_feed WHERE last_id > ?1 ORDER BY first_id",
    )?;
    let rows = statement.query_map([after], |row| {
        Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
    })?;
    let mut changes = Vec::new();
    for row in rows {
        let (first_id, text) = row?;
        let batch: Vec<Change> = serde_json::from_str(&text).map_err(|err| {
            rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, Box::new(err))
        })?;
        changes.extend((first_id..).zip(batch).filter(|(id, _)| *id > after));
    }
    Ok(Backlog::Changes(changes))
}
