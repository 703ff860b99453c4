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

/// The feed's counters, kept apart from the batches so that pruning never
/// loses them: `last_id`, the last id given; `floor`, the id just before
/// the oldest change kept (a client there has missed nothing); `kept`, the
/// changes the table holds.
pub(crate) const MIGRATION_STATE: possync_sdk::Migration = possync_sdk::Migration::new(
    "possync/feed-state",
    "CREATE TABLE possync_feed_state (
         id      INTEGER PRIMARY KEY CHECK (id = 1),
         last_id INTEGER NOT NULL,
         floor   INTEGER NOT NULL,
         kept    INTEGER NOT NULL
     );
     DELETE FROM possync_feed;",
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

    /// The batch these changes make, numbered from `first_id`, written
    /// after the change `follows`.
    fn into_batch(mut self, follows: i64, first_id: i64) -> FeedBatch {
        self.changes.push(']');
        FeedBatch {
            follows,
            first_id,
            count: self.count,
            kinds: self.kinds_text(),
            changes: self.changes,
            events: std::sync::OnceLock::new(),
        }
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
    /// The last change given before it: a subscriber that saw less missed
    /// a batch this process did not send (another process committed it).
    pub(crate) follows: i64,
    pub(crate) first_id: i64,
    count: usize,
    kinds: String,
    changes: String,
    /// Each change's id and JSON, made once for every subscriber.
    events: std::sync::OnceLock<Option<Vec<(i64, String)>>>,
}

impl FeedBatch {
    pub(crate) fn last_id(&self) -> i64 {
        self.first_id + self.count as i64 - 1
    }

    /// Each change's id and JSON, as the feed sends them; `None` if the
    /// batch cannot be read (then the table says why).
    pub(crate) fn events(&self) -> Option<&[(i64, String)]> {
        self.events
            .get_or_init(|| {
                let changes = decode(&self.kinds, &self.changes).ok()?;
                (self.first_id..)
                    .zip(changes)
                    .map(|(id, change)| serde_json::to_string(&change).ok().map(|json| (id, json)))
                    .collect()
            })
            .as_deref()
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
    keep: i64,
    /// The feed is off and this run has not yet said so in the table.
    off_unmarked: bool,
    /// The transaction in progress says so.
    marking_off: bool,
    sender: FeedSender,
}

impl Feed {
    pub(crate) fn new(keep: u32, sender: FeedSender) -> Self {
        Self {
            keep: i64::from(keep),
            off_unmarked: keep == 0,
            marking_off: false,
            sender,
        }
    }

    /// Writes `changes` in `transaction`, and drops the oldest batches
    /// beyond the `keep` changes kept. The batch is sent by
    /// [`Feed::committed`].
    ///
    /// Ids follow the last one given and the clock in microseconds,
    /// whichever is later: they only grow, and a database restored from an
    /// older copy never gives again an id its clients may have seen. A
    /// client's id is good while the batch that holds it is kept.
    pub(crate) fn write(
        &mut self,
        transaction: &mut Transaction<'_>,
        changes: Changes,
    ) -> rusqlite::Result<Option<FeedBatch>> {
        if self.keep == 0 {
            // Until a transaction that said so commits, each one says so.
            if self.off_unmarked {
                self.mark_off(transaction)?;
                self.marking_off = true;
            }
            return Ok(None);
        }
        if changes.count == 0 {
            return Ok(None);
        }
        let read = transaction.query_optional(
            "SELECT last_id, floor, kept FROM possync_feed_state WHERE id = 1",
            [],
            |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            },
        )?;
        // A new feed: a client that saw it empty (id 0) has missed nothing.
        let (last, mut floor, mut kept) = read.unwrap_or((0, 0, 0));
        let first_id = last.saturating_add(1).max(now_micros());
        let batch = changes.into_batch(last, first_id);
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
        kept += batch.count as i64;
        // The oldest batches go while the rest still hold `keep` changes,
        // but never the newest: a client must always be able to follow on
        // from the last change.
        loop {
            let (oldest_first, oldest_last) = transaction
                .query_optional(
                    "SELECT first_id, last_id FROM possync_feed ORDER BY first_id LIMIT 1",
                    [],
                    |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)),
                )?
                .unwrap_or((first_id, first_id));
            let size = oldest_last - oldest_first + 1;
            if oldest_first == first_id || kept - size < self.keep {
                break;
            }
            transaction.execute(
                "DELETE FROM possync_feed WHERE first_id = ?1",
                [oldest_first],
            )?;
            kept -= size;
            floor = oldest_last;
        }
        transaction.execute(
            "INSERT INTO possync_feed_state (id, last_id, floor, kept) VALUES (1, ?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET last_id = ?1, floor = ?2, kept = ?3",
            [batch.last_id(), floor, kept],
        )?;
        Ok(Some(batch))
    }

    /// The feed is off: what it kept says nothing of the changes to come, so
    /// it goes, and its ids with it: a client back after the feed is on
    /// again is told to read everything.
    fn mark_off(&mut self, transaction: &mut Transaction<'_>) -> rusqlite::Result<()> {
        transaction.execute(FORGET_CHANGES, [])?;
        transaction.execute(FORGET_IDS, [now_micros()])?;
        Ok(())
    }

    /// The catalog was replaced whole (a snapshot, committed with
    /// [`forget`]): the subscribers listening now are told to read the
    /// tables again.
    pub(crate) fn replaced(&mut self, last: i64) {
        if self.sender.receiver_count() > 0 {
            let _ = self.sender.send(Arc::new(FeedBatch {
                follows: last,
                first_id: last + 1,
                count: 0,
                kinds: String::new(),
                changes: String::new(),
                events: std::sync::OnceLock::new(),
            }));
        }
    }

    /// A batch's transaction committed.
    pub(crate) fn after_commit(&mut self) {
        if std::mem::take(&mut self.marking_off) {
            self.off_unmarked = false;
        }
    }

    /// The transaction that wrote `batch` committed: the subscribers get it.
    pub(crate) fn committed(&mut self, batch: FeedBatch) {
        if self.sender.receiver_count() > 0 {
            // A subscriber gone meanwhile is no error: the table has it.
            let _ = self.sender.send(Arc::new(batch));
        }
    }
}

const FORGET_CHANGES: &str = "DELETE FROM possync_feed";
const FORGET_IDS: &str =
    "INSERT INTO possync_feed_state (id, last_id, floor, kept) VALUES (1, ?1, ?1, 0)
     ON CONFLICT (id) DO UPDATE SET last_id = max(last_id + 1, ?1), floor = max(last_id + 1, ?1), kept = 0";

/// Forgets every change kept and the ids given, in the transaction that
/// replaces the catalog whole: a client holding an earlier id is told to
/// read everything again (`reload`). Returns the last id now.
pub(crate) fn forget(connection: &rusqlite::Connection) -> rusqlite::Result<i64> {
    connection.execute(FORGET_CHANGES, [])?;
    connection.execute(FORGET_IDS, [now_micros()])?;
    last_id(connection)
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// What a subscriber asking for the changes after `after` gets from the
/// table.
#[derive(Debug, PartialEq)]
pub(crate) enum Backlog {
    /// The changes after it, in order (none when it is the last).
    Changes(Vec<(i64, Change)>),
    /// It is older than what the table keeps, or not an id this database
    /// gave: the subscriber must read everything again. `last` is the id of
    /// the last change.
    Reload { last: i64 },
}

/// The feed's counters: the last id given, and the floor, the id just
/// before the oldest change kept. `(0, 0)` for a feed that never wrote.
fn state(connection: &rusqlite::Connection) -> rusqlite::Result<(i64, i64)> {
    use rusqlite::OptionalExtension;
    Ok(connection
        .query_row(
            "SELECT last_id, floor FROM possync_feed_state WHERE id = 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?
        .unwrap_or((0, 0)))
}

/// The id of the last change given, 0 when there is none.
pub(crate) fn last_id(connection: &rusqlite::Connection) -> rusqlite::Result<i64> {
    state(connection).map(|(last, _)| last)
}

/// The changes after `after`, from the table, read in one transaction (a
/// commit pruning meanwhile cannot make a gap).
pub(crate) fn backlog(connection: &rusqlite::Connection, after: i64) -> rusqlite::Result<Backlog> {
    use rusqlite::OptionalExtension;
    let read = connection.unchecked_transaction()?;
    let (last, floor) = state(&read)?;
    if after == last {
        return Ok(Backlog::Changes(Vec::new()));
    }
    // Where the client's change is: the floor, or a batch still kept.
    let from = if after == floor {
        Some(i64::MIN)
    } else {
        read.query_row(
            "SELECT first_id, last_id FROM possync_feed WHERE first_id <= ?1
             ORDER BY first_id DESC LIMIT 1",
            [after],
            |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)),
        )
        .optional()?
        .filter(|&(_, batch_last)| after <= batch_last)
        .map(|(first, _)| first)
    };
    let Some(from) = from else {
        return Ok(Backlog::Reload { last });
    };
    let mut changes = Vec::new();
    for (first_id, batch) in batches(
        &read,
        "SELECT first_id, kinds, changes FROM possync_feed WHERE first_id >= ?1 ORDER BY first_id",
        from,
    )? {
        changes.extend((first_id..).zip(batch?).filter(|(id, _)| *id > after));
    }
    Ok(Backlog::Changes(changes))
}

/// The last `count` changes in the table, oldest first.
pub(crate) fn recent(
    connection: &rusqlite::Connection,
    count: usize,
) -> rusqlite::Result<Vec<(i64, Change)>> {
    let mut changes = Vec::new();
    for (first_id, batch) in batches(
        connection,
        "SELECT first_id, kinds, changes FROM possync_feed ORDER BY first_id DESC LIMIT ?1",
        count as i64,
    )? {
        let mut numbered: Vec<(i64, Change)> = (first_id..).zip(batch?).collect();
        numbered.append(&mut changes);
        changes = numbered;
        if changes.len() >= count {
            break;
        }
    }
    let skip = changes.len().saturating_sub(count);
    Ok(changes.split_off(skip))
}

/// The batches `sql` selects (`first_id, kinds, changes`, one parameter),
/// each read back into its changes.
fn batches(
    connection: &rusqlite::Connection,
    sql: &str,
    parameter: i64,
) -> rusqlite::Result<Vec<(i64, rusqlite::Result<Vec<Change>>)>> {
    let mut statement = connection.prepare(sql)?;
    let rows = statement.query_map([parameter], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
        ))
    })?;
    rows.map(|row| {
        row.map(|(first_id, kinds, text)| {
            let batch = decode(&kinds, &text).map_err(|err| {
                rusqlite::Error::FromSqlConversionFailure(
                    2,
                    rusqlite::types::Type::Text,
                    Box::new(err),
                )
            });
            (first_id, batch)
        })
    })
    .collect()
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
            let mut envelope = possync_sdk::Envelope::new(
                change.message_type.as_str(),
                "S",
                serde_json::json!({ "the_id": change.id }),
            );
            envelope.seq = change.seq;
            written.push(&Message::from(envelope), rule.as_ref());
        }
        let batch = written.into_batch(0, 1);
        (batch.kinds, batch.changes)
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

    /// A feed holding `batches` (first id, size), with its counters.
    fn table(batches: &[(i64, usize)], floor: i64) -> rusqlite::Connection {
        let connection = rusqlite::Connection::open_in_memory().expect("opens");
        connection.execute_batch(MIGRATION.sql).expect("creates");
        connection
            .execute_batch(MIGRATION_STATE.sql)
            .expect("creates");
        let mut last = floor;
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
            last = first_id + len as i64 - 1;
            connection
                .execute(
                    "INSERT INTO possync_feed VALUES (?1, ?2, 0, ?3, ?4)",
                    rusqlite::params![first_id, last, kinds, text],
                )
                .expect("inserts");
        }
        connection
            .execute(
                "INSERT INTO possync_feed_state VALUES (1, ?1, ?2, 0)",
                [last, floor],
            )
            .expect("inserts");
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
        // Changes up to 2 were pruned; 3-5 and 6 are kept, and after a
        // restart 100-103 (ids jump to the clock at a start).
        let connection = table(&[(3, 3), (6, 1), (100, 4)], 2);
        let backlog = |after| ids(backlog(&connection, after).expect("reads"));
        assert_eq!(backlog(2), vec![3, 4, 5, 6, 100, 101, 102, 103]);
        assert_eq!(backlog(4), vec![5, 6, 100, 101, 102, 103]);
        assert_eq!(backlog(6), vec![100, 101, 102, 103]);
        assert_eq!(backlog(101), vec![102, 103]);
        assert_eq!(backlog(103), Vec::<i64>::new());
        // Older than kept, newer than any, never given (in the jump: a
        // database restored from an older copy gave it, or the feed was
        // off), negative: reload, and follow on from the last change.
        for after in [1, 0, 104, 50, 7, 99, -1] {
            assert_eq!(backlog(after), vec![-103], "after {after}");
        }
        assert_eq!(last_id(&connection).expect("reads"), 103);
        assert_eq!(
            recent(&connection, 3)
                .expect("reads")
                .iter()
                .map(|c| c.0)
                .collect::<Vec<_>>(),
            vec![101, 102, 103]
        );
        let empty = table(&[], 0);
        assert_eq!(
            ids(super::backlog(&empty, 0).expect("reads")),
            Vec::<i64>::new()
        );
        assert_eq!(ids(super::backlog(&empty, 3).expect("reads")), vec![0]);
    }
}
