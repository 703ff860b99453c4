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

/// The feed's table: one row a committed batch. `kinds` lists the batch's
/// distinct `[type, entity, op]`; `changes` holds `[seq, kind, id]` for
/// each change, `kind` indexing `kinds`.
pub(crate) const MIGRATION: possync_sdk::Migration = possync_sdk::Migration::new(
    "possync/feed",
    "CREATE TABLE possync_feed (
         first_id     INTEGER PRIMARY KEY,
         last_id      INTEGER NOT NULL,
         committed_ms INTEGER NOT NULL,
         kinds        TEXT NOT NULL,
         changes      TEXT NOT NULL
     );",
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

impl ChangeOp {
    fn of(rule: Option<&EntityRule>) -> Self {
        match rule.map(|rule| rule.change) {
            Some(ChangeKind::Delete) => Self::Delete,
            Some(ChangeKind::Replace | ChangeKind::Merge) => Self::Upsert,
            None => Self::Change,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Self::Upsert => "u",
            Self::Delete => "d",
            Self::Change => "c",
        }
    }
}

/// A batch's changes, written as the table keeps them while the batch
/// applies: every applied message passes here, so nothing is allocated
/// per change but the text.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    /// `(type, entity, op)` of each kind, in the order first seen.
    kinds: Vec<(String, Option<String>, ChangeOp)>,
    changes: String,
    count: usize,
}

impl Changes {
    /// The change an applied message made, as its type's `rule` reads it.
    pub(crate) fn push(&mut self, message: &Message<'_>, rule: Option<&EntityRule>) {
        let kind = match self
            .kinds
            .iter()
            .position(|(t, _, _)| *t == *message.message_type)
        {
            Some(kind) => kind,
            None => {
                self.kinds.push((
                    message.message_type.to_string(),
                    rule.map(|rule| rule.entity.clone()),
                    ChangeOp::of(rule),
                ));
                self.kinds.len() - 1
            }
        };
        self.changes
            .push_str(if self.count == 0 { "[[" } else { ",[" });
        match message.seq {
            Some(seq) => push_integer(&mut self.changes, seq),
            None => self.changes.push_str("null"),
        }
        self.changes.push(',');
        push_integer(&mut self.changes, kind as i64);
        self.changes.push(',');
        let id = rule.and_then(|rule| rule.id_in(&message.payload));
        push_string(&mut self.changes, id.as_deref());
        self.changes.push(']');
        self.count += 1;
    }

    fn kinds_text(&self) -> String {
        let mut text = String::from("[");
        for (index, (message_type, entity, op)) in self.kinds.iter().enumerate() {
            if index > 0 {
                text.push(',');
            }
            text.push('[');
            push_string(&mut text, Some(message_type));
            text.push(',');
            push_string(&mut text, entity.as_deref());
            text.push_str(",\"");
            text.push_str(op.code());
            text.push_str("\"]");
        }
        text.push(']');
        text
    }
}

/// `value` in decimal (`core::fmt` costs more than the rest of a change).
fn push_integer(text: &mut String, value: i64) {
    let mut digits = [0_u8; 20];
    let mut at = digits.len();
    let mut rest = value.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if value < 0 {
        text.push('-');
    }
    text.extend(digits[at..].iter().map(|&digit| char::from(digit)));
}

/// `value` as JSON: a string, escaped where it must be, or `null`.
fn push_string(text: &mut String, value: Option<&str>) {
    match value {
        None => text.push_str("null"),
        Some(value) if !value.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') => {
            text.push('"');
            text.push_str(value);
            text.push('"');
        }
        Some(value) => text.push_str(&serde_json::Value::from(value).to_string()),
    }
}

/// A committed batch's changes, ids `first_id`, `first_id + 1`, ..., as
/// the table keeps them: read only where a subscriber wants them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FeedBatch {
    pub(crate) first_id: i64,
    count: usize,
    kinds: String,
    changes: String,
}

impl FeedBatch {
    pub(crate) fn last_id(&self) -> i64 {
        self.first_id + self.count as i64 - 1
    }

    /// Each change with its id.
    pub(crate) fn numbered(&self) -> serde_json::Result<Vec<(i64, Change)>> {
        Ok((self.first_id..)
            .zip(decode(&self.kinds, &self.changes)?)
            .collect())
    }
}

/// What [`Changes`] wrote.
fn decode(kinds: &str, changes: &str) -> serde_json::Result<Vec<Change>> {
    let kinds: Vec<(String, Option<String>, String)> = serde_json::from_str(kinds)?;
    let changes: Vec<(Option<i64>, usize, Option<String>)> = serde_json::from_str(changes)?;
    changes
        .into_iter()
        .map(|(seq, kind, id)| {
            let (message_type, entity, op) = kinds.get(kind).ok_or_else(|| {
                serde::de::Error::custom(format!("change of kind {kind}, which the batch lacks"))
            })?;
            Ok(Change {
                seq,
                message_type: message_type.clone(),
                entity: entity.clone(),
                id,
                op: match op.as_str() {
                    "u" => ChangeOp::Upsert,
                    "d" => ChangeOp::Delete,
                    _ => ChangeOp::Change,
                },
            })
        })
        .collect()
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
        mut changes: Changes,
    ) -> rusqlite::Result<Option<FeedBatch>> {
        if changes.count == 0 || self.keep == 0 {
            return Ok(None);
        }
        let first_id = match self.next_id {
            Some(id) => id,
            None => {
                let last = transaction.query_optional(LAST_ID, [], |row| row.get::<_, i64>(0))?;
                last.unwrap_or(0) + 1
            }
        };
        changes.changes.push(']');
        let batch = FeedBatch {
            first_id,
            count: changes.count,
            kinds: changes.kinds_text(),
            changes: changes.changes,
        };
        transaction.execute(
            "INSERT INTO possync_feed (first_id, last_id, committed_ms, kinds, changes)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![
                first_id,
                batch.last_id(),
                crate::store::unix_now_ms(),
                batch.kinds,
                batch.changes
            ],
        )?;
        // Whole batches go: those that start `keep` changes or more back.
        transaction.execute(
            "DELETE FROM possync_feed WHERE first_id <= ?1",
            [batch.last_id() - self.keep],
        )?;
        Ok(Some(batch))
    }

    /// The transaction that wrote `batch` committed: the next batch numbers
    /// on from it, and the subscribers get it.
    pub(crate) fn committed(&mut self, batch: FeedBatch) {
        self.next_id = Some(batch.last_id() + 1);
        if self.sender.receiver_count() > 0 {
            // A subscriber gone meanwhile is no error: the table has it.
            let _ = self.sender.send(Arc::new(batch));
        }
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

/// The last change's id: the last batch's (batches never overlap).
const LAST_ID: &str = "SELECT last_id FROM possync_feed ORDER BY first_id DESC LIMIT 1";

/// The id of the last change in the table, 0 when there is none.
pub(crate) fn last_id(connection: &rusqlite::Connection) -> rusqlite::Result<i64> {
    use rusqlite::OptionalExtension;
    Ok(connection
        .query_row(LAST_ID, [], |row| row.get(0))
        .optional()?
        .unwrap_or(0))
}

/// The last `count` changes in the table, oldest first.
pub(crate) fn recent(
    connection: &rusqlite::Connection,
    count: usize,
) -> rusqlite::Result<Vec<(i64, Change)>> {
    let after = last_id(connection)? - count as i64;
    let oldest: Option<i64> =
        connection.query_row("SELECT min(first_id) FROM possync_feed", [], |row| {
            row.get(0)
        })?;
    match backlog(connection, after.max(oldest.unwrap_or(1) - 1))? {
        Backlog::Changes(changes) => Ok(changes),
        Backlog::Reload { .. } => Ok(Vec::new()),
    }
}

/// The changes after `after`, from the table.
pub(crate) fn backlog(connection: &rusqlite::Connection, after: i64) -> rusqlite::Result<Backlog> {
    let oldest: Option<i64> =
        connection.query_row("SELECT min(first_id) FROM possync_feed", [], |row| {
            row.get(0)
        })?;
    let last = last_id(connection)?;
    // A client of this terminal has seen at most `last`, and, to have missed
    // nothing, at least the change before the oldest kept.
    let too_old = oldest.is_some_and(|oldest| after < oldest - 1);
    if after > last || too_old || after < 0 {
        return Ok(Backlog::Reload { last });
    }
    let mut statement = connection.prepare(
        // From the batch holding `after + 1`: the last to start at or before it.
        "SELECT first_id, kinds, changes FROM possync_feed
         WHERE first_id >= coalesce(
             (SELECT max(first_id) FROM possync_feed WHERE first_id <= ?1 + 1), 0)
         ORDER BY first_id",
    )?;
    let rows = statement.query_map([after], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
        ))
    })?;
    let mut changes = Vec::new();
    for row in rows {
        let (first_id, kinds, text) = row?;
        let batch = decode(&kinds, &text).map_err(|err| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(err))
        })?;
        changes.extend((first_id..).zip(batch).filter(|(id, _)| *id > after));
    }
    Ok(Backlog::Changes(changes))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn op() -> impl Strategy<Value = ChangeOp> {
        prop_oneof![
            Just(ChangeOp::Upsert),
            Just(ChangeOp::Delete),
            Just(ChangeOp::Change)
        ]
    }

    fn change() -> impl Strategy<Value = Change> {
        (
            any::<Option<i64>>(),
            "[a-z_]{1,12}",
            proptest::option::of("\\PC{1,8}"),
            proptest::option::of(prop_oneof![
                "[A-Z0-9-]{1,8}",
                ".{0,8}",
                Just("a\"b\\c\n".to_owned())
            ]),
            op(),
        )
            .prop_map(|(seq, message_type, entity, id, op)| Change {
                seq,
                message_type,
                entity,
                id,
                op,
            })
    }

    /// What [`Changes`] writes for `changes`, and its table row's text.
    fn encoded(changes: &[Change]) -> (String, String) {
        let mut written = Changes::default();
        for change in changes {
            let schema = change.entity.as_ref().map(|entity| {
                let kind = match change.op {
                    ChangeOp::Delete => "delete",
                    _ => "merge",
                };
                serde_json::json!({ crate::entity::ENTITY_KEYWORD: {
                    "entity": entity, "id": "the_id", "change": kind,
                }})
            });
            let rule = schema.map(|schema| {
                EntityRule::from_schema(&change.message_type, &schema)
                    .expect("valid")
                    .expect("declared")
            });
            let payload = serde_json::json!({ "the_id": change.id }).to_string();
            let message = Message {
                message_type: change.message_type.as_str().into(),
                license_key: "S".into(),
                payload: payload.as_str().into(),
                timestamp: None,
                message_id: None,
                version: None,
                seq: change.seq,
                catalog: None,
                head: None,
                publisher_id: None,
                publisher_seq: None,
            };
            written.push(&message, rule.as_ref());
        }
        written.changes.push(']');
        (written.kinds_text(), written.changes)
    }

    proptest! {
        /// Whatever the types, entities and ids, a batch reads back as the
        /// changes that were written (a type's entity and op are its
        /// kind's, so each type here keeps one).
        #[test]
        fn a_batch_reads_back_as_written(changes in prop::collection::vec(change(), 1..6)) {
            let mut changes = changes;
            for index in 0..changes.len() {
                if let Some(first) = changes[..index].iter().find(|c| c.message_type == changes[index].message_type).cloned() {
                    changes[index].entity = first.entity;
                    changes[index].op = first.op;
                }
                if changes[index].entity.is_none() {
                    changes[index].op = ChangeOp::Change;
                    changes[index].id = None;
                } else if changes[index].op == ChangeOp::Change {
                    changes[index].op = ChangeOp::Upsert;
                }
                if changes[index].id.as_deref() == Some("") {
                    changes[index].id = None;
                }
            }
            let (kinds, text) = encoded(&changes);
            prop_assert_eq!(decode(&kinds, &text).expect("decodes"), changes);
        }
    }

    fn table(batches: &[(i64, usize)]) -> rusqlite::Connection {
        let connection = rusqlite::Connection::open_in_memory().expect("opens");
        connection.execute_batch(MIGRATION.sql).expect("creates");
        for &(first_id, len) in batches {
            let changes: Vec<Change> = (0..len)
                .map(|n| Change {
                    seq: None,
                    message_type: "price_update".into(),
                    entity: Some("product".into()),
                    id: Some(format!("P{}", first_id + n as i64)),
                    op: ChangeOp::Upsert,
                })
                .collect();
            let (kinds, text) = encoded(&changes);
            connection
                .execute(
                    "INSERT INTO possync_feed VALUES (?1, ?2, 0, ?3, ?4)",
                    rusqlite::params![first_id, first_id + len as i64 - 1, kinds, text],
                )
                .expect("inserts");
        }
        connection
    }

    fn ids(backlog: Backlog) -> Vec<i64> {
        match backlog {
            Backlog::Changes(changes) => changes.into_iter().map(|(id, _)| id).collect(),
            Backlog::Reload { last } => vec![-last],
        }
    }

    #[test]
    fn a_backlog_starts_right_after_the_id_asked_for_even_mid_batch() {
        // Changes 1-2 were pruned; 3-5, 6, 7-10 are kept.
        let connection = table(&[(3, 3), (6, 1), (7, 4)]);
        let backlog = |after| ids(backlog(&connection, after).expect("reads"));
        assert_eq!(backlog(2), (3..=10).collect::<Vec<_>>());
        assert_eq!(backlog(4), vec![5, 6, 7, 8, 9, 10]);
        assert_eq!(backlog(7), vec![8, 9, 10]);
        assert_eq!(backlog(10), Vec::<i64>::new());
        // Older than kept, newer than any, never sent: reload, and follow
        // on from the last change.
        for after in [1, 0, 11, -1] {
            assert_eq!(backlog(after), vec![-10], "after {after}");
        }
        assert_eq!(last_id(&connection).expect("reads"), 10);
        let empty = table(&[]);
        assert_eq!(
            ids(super::backlog(&empty, 0).expect("reads")),
            Vec::<i64>::new()
        );
        assert_eq!(ids(super::backlog(&empty, 3).expect("reads")), vec![0]);
    }
}
