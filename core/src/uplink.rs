//! The terminal's uplink: sends the POS app's outbox rows and delivery
//! receipts to the back office on `up.<KEY>.<TERMINAL>.<type>`.
//!
//! Outbox rows go in id order, persistent, with publisher confirms, and
//! each row is deleted only after its confirm: a row the broker never
//! confirmed (a lost connection, a crash, no backend listening) is sent
//! again later with the same message id, by which the backend records it
//! once. Every message carries the broker user as its `user_id`, which
//! RabbitMQ checks against the connection's user, so the backend knows
//! which terminal sent it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lapin::Confirmation;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection};
use rusqlite::Connection as Sqlite;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::{BrokerConfig, UplinkConfig};
use crate::connection::{self, BrokerError};
use crate::events;
use crate::identity::{LicenseKey, TerminalId};
use crate::redact::redact_url;
use crate::status::Status;
use crate::upstream::{RECEIPT_TYPE, Receipt, upstream_key};

/// The outbox: the POS app inserts `(type, payload)`; possync fills in the
/// rest and deletes the row once the broker confirmed it.
pub(crate) const MIGRATION: possync_sdk::Migration = possync_sdk::Migration::new(
    "possync/outbox",
    "CREATE TABLE possync_outbox (
         id         INTEGER PRIMARY KEY AUTOINCREMENT,
         type       TEXT NOT NULL CHECK (typeof(type) = 'text' AND length(type) BETWEEN 1 AND 64
                        AND type NOT GLOB '*[^a-z0-9_]*' AND type <> 'receipt'),
         payload    TEXT NOT NULL CHECK (typeof(payload) = 'text' AND json_valid(payload)
                        AND json_type(payload) = 'object'),
         created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                        CHECK (typeof(created_at) = 'text'),
         message_id TEXT NOT NULL UNIQUE DEFAULT (lower(hex(randomblob(16))))
                        CHECK (typeof(message_id) = 'text' AND length(message_id) BETWEEN 1 AND 128)
     );",
);

/// Reconnects wait from 500 ms up to 30 s.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// How long a round waits before trying rows again that no queue took.
const UNROUTABLE_WAIT: Duration = Duration::from_secs(5);

/// How long the last receipt (the terminal stopping) may take.
const LAST_RECEIPT: Duration = Duration::from_secs(2);

const PERSISTENT: u8 = 2;

/// One outbox row, as sent.
#[derive(Debug)]
struct Row {
    id: i64,
    message_type: String,
    payload: String,
    body: Vec<u8>,
    message_id: String,
}

/// What the uplink needs to run.
#[derive(Debug)]
pub(crate) struct Uplink {
    pub(crate) broker: BrokerConfig,
    pub(crate) config: UplinkConfig,
    pub(crate) license_key: LicenseKey,
    pub(crate) terminal_id: TerminalId,
    pub(crate) database: PathBuf,
    pub(crate) status: watch::Receiver<Status>,
    /// The largest body sent (`uplink.max_message_bytes`): a larger row
    /// would be refused by the backend, and is kept on the till instead.
    pub(crate) max_message_bytes: usize,
    /// Rows kept in the quarantine (`terminal.quarantine_max_rows`).
    pub(crate) quarantine_max_rows: u32,
    /// The terminal's plugins: a row of a type one of them knows is checked
    /// by it before it is sent, as the backend will check it.
    pub(crate) registry: std::sync::Arc<crate::registry::Registry>,
}

/// Why a session ended.
enum Ended {
    Stopped,
    Lost(BrokerError),
}

/// How far a terminal is, as a receipt says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reach {
    up_to: i64,
    highest: i64,
    verified_seq: Option<i64>,
    gap: Option<&'static str>,
}

/// What the last receipt said of how far the terminal applied, and when,
/// to coalesce the next.
struct Reported {
    at: Instant,
    applied: Reach,
}

impl Uplink {
    /// Sends until `stop` turns true, reconnecting with backoff; then
    /// sends a last receipt saying the terminal stops.
    pub(crate) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut outbox = match open_outbox(&self.database) {
            Ok(outbox) => outbox,
            Err(err) => {
                events::uplink_off(&format!(
                    "cannot open the outbox in {}: {err}",
                    self.database.display()
                ));
                return;
            }
        };
        // Tells this run's receipts from an earlier run's, which may
        // arrive late: the backend keeps the newest of one run by `n`.
        let run = format!("{:016x}", rand::random::<u64>());
        let mut counter: u64 = 0;
        let mut attempt: u32 = 0;
        let mut offline_since: Option<Instant> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            let url = self.broker.urls[attempt as usize % self.broker.urls.len()].clone();
            let ended = match Session::open(&self.broker, &url).await {
                Ok(mut session) => {
                    attempt = 0;
                    if offline_since.take().is_some() || counter == 0 {
                        events::uplink_live(&redact_url(&url), &session.user);
                    }
                    let ended = self
                        .serve(&mut session, &mut outbox, &run, &mut counter, &mut stop)
                        .await;
                    if matches!(ended, Ended::Stopped) {
                        let said = self.said(counts(&outbox).unwrap_or((0, 0)));
                        let _ = tokio::time::timeout(
                            LAST_RECEIPT,
                            self.send_receipt(&mut session, &run, &mut counter, said, true),
                        )
                        .await;
                        session.close().await;
                        return;
                    }
                    ended
                }
                Err(err) => Ended::Lost(err),
            };
            let Ended::Lost(err) = ended else { return };
            attempt = attempt.saturating_add(1);
            let delay = RECONNECT.delay(attempt);
            let first = offline_since.is_none();
            offline_since.get_or_insert_with(Instant::now);
            events::uplink_offline(&err.to_string(), delay.as_millis(), first);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Sends outbox rounds and receipts on one connection until it is lost
    /// or `stop` turns true.
    async fn serve(
        &mut self,
        session: &mut Session,
        outbox: &mut Sqlite,
        run: &str,
        counter: &mut u64,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        let poll = Duration::from_millis(self.config.poll_ms);
        let interval = Duration::from_millis(self.config.receipt_interval_ms);
        let heartbeat = Duration::from_secs(self.config.heartbeat_secs);
        let mut reported: Option<Reported> = None;
        // When the outbox is read next: at once after a full round (a
        // backlog), else after `poll_ms`.
        let mut next_round = Instant::now();
        // One row a round until the broker took a round whole: while no
        // queue takes the rows (no backend yet) a queue may appear in the
        // middle of a round, and the rows after that point would be
        // routed before the ones returned ahead of them.
        let mut probing = true;
        loop {
            // Seen on every pass, a backlog's included.
            if *stop.borrow() {
                return Ended::Stopped;
            }
            if !session.connection.status().connected() {
                return Ended::Lost(BrokerError::ConnectionLost);
            }
            if Instant::now() >= next_round {
                let limit = if probing { 1 } else { self.config.batch };
                let round = self.send_round(session, outbox, limit).await;
                let now = Instant::now();
                next_round = match round {
                    Ok(Round::Sent { full }) => {
                        let was_probing = std::mem::replace(&mut probing, false);
                        if full || was_probing { now } else { now + poll }
                    }
                    Ok(Round::Refused) => now,
                    // Nothing to send, or the database failed: wait.
                    Ok(Round::Empty | Round::Held) => now + poll,
                    Ok(Round::Unroutable) => {
                        probing = true;
                        now + UNROUTABLE_WAIT
                    }
                    Err(err) => return Ended::Lost(err),
                };
            }
            let applied = self.applied();
            let now = Instant::now();
            let due = match &reported {
                None => now,
                Some(last) if last.applied != applied => last.at + interval,
                Some(last) => last.at + heartbeat,
            };
            if due <= now {
                let said = self.said(counts(outbox).unwrap_or((0, 0)));
                if let Err(err) = self.send_receipt(session, run, counter, said, false).await {
                    return Ended::Lost(err);
                }
                reported = Some(Reported { at: now, applied });
                continue;
            }
            if next_round <= now {
                // A backlog: the next round at once, yet never without
                // letting the runtime run others.
                tokio::task::yield_now().await;
                continue;
            }
            let wake = due.min(next_round).saturating_duration_since(now);
            tokio::select! {
                () = tokio::time::sleep(wake) => {}
                _ = self.status.changed() => {}
                _ = stop.wait_for(|stop| *stop) => return Ended::Stopped,
                () = session.closed() => return Ended::Lost(BrokerError::ConnectionLost),
            }
        }
    }

    /// How far the terminal has applied, and whether it is verified or has
    /// a gap: a receipt follows when any of it moves.
    fn applied(&self) -> Reach {
        let status = self.status.borrow();
        Reach {
            up_to: status.sync.synced_up_to,
            highest: status.sync.highest_applied,
            verified_seq: status.sync.verified.map(|verified| verified.seq),
            gap: status.sync.gap.map(|gap| gap.cause.name()),
        }
    }

    /// What a receipt says now, with the outbox and quarantine rows
    /// counted (counted only when a receipt goes: counting a long outbox
    /// after every round would cost a backlog's drain).
    fn said(&self, (outbox_rows, quarantined): (u64, u64)) -> (Reach, u64, u64) {
        (self.applied(), quarantined, outbox_rows)
    }

    /// Sends the rows of the outbox (up to `limit`) and deletes them once
    /// the broker confirmed them all.
    async fn send_round(
        &self,
        session: &mut Session,
        outbox: &mut Sqlite,
        limit: usize,
    ) -> Result<Round, BrokerError> {
        let mut rows = match read_rows(outbox, limit, &self.license_key, &self.terminal_id) {
            Ok(rows) => rows,
            Err(err) => {
                events::uplink_outbox_failed(&err.to_string());
                return Ok(Round::Held);
            }
        };
        // The round stops before a row that can never be taken; such a
        // row, first, is moved to the quarantine, and the rest go next round.
        if let Some((index, reason)) = rows
            .iter()
            .enumerate()
            .find_map(|(index, row)| self.refusal(row).map(|reason| (index, reason)))
        {
            if index == 0 {
                let row = &rows[0];
                let routing_key =
                    upstream_key(&self.license_key, &self.terminal_id, &row.message_type);
                return Ok(
                    match quarantine(
                        outbox,
                        row,
                        &routing_key,
                        reason.clone(),
                        self.quarantine_max_rows,
                    ) {
                        Ok(()) => {
                            events::uplink_row_quarantined(row.id, &reason);
                            Round::Refused
                        }
                        Err(err) => {
                            events::uplink_outbox_failed(&err.to_string());
                            Round::Held
                        }
                    },
                );
            }
            rows.truncate(index);
        }
        if rows.is_empty() {
            return Ok(Round::Empty);
        }
        let full = rows.len() == limit;
        let mut confirms = Vec::with_capacity(rows.len());
        for row in &rows {
            let key = upstream_key(&self.license_key, &self.terminal_id, &row.message_type);
            let confirm = session
                .publish(&key, &row.body, Some(&row.message_id), true)
                .await?;
            confirms.push(confirm);
        }
        // Every confirm of the round, before anything is deleted. lapin may
        // attach a returned message (no queue took it) to another confirm of
        // the same multiple-ack than its own, so one return or refusal in
        // the round keeps the whole round: rows the broker did route are
        // sent again, and the backend records each id once.
        let mut kept = None;
        for (row, confirm) in rows.iter().zip(confirms) {
            match session.wait(confirm).await? {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(message)) => {
                    kept.get_or_insert_with(|| message.delivery.routing_key.to_string());
                }
                Confirmation::Nack(_) | Confirmation::NotRequested => {
                    kept.get_or_insert_with(|| {
                        format!("{} (refused by the broker)", row.message_id)
                    });
                }
            }
        }
        if let Some(routing_key) = kept {
            events::uplink_unroutable(&routing_key, UNROUTABLE_WAIT.as_secs());
            return Ok(Round::Unroutable);
        }
        crate::failpoint::after_uplink_confirm().await;
        if let Err(err) = delete_sent(outbox, &rows) {
            // Sent again after a wait; the backend records each id once.
            events::uplink_outbox_failed(&err.to_string());
            return Ok(Round::Held);
        }
        events::uplink_sent(rows.len());
        Ok(Round::Sent { full })
    }

    /// Why `row` can never be taken, if it cannot: too large, not a JSON
    /// object, or refused by the terminal's plugin of its type (a type no
    /// plugin here knows goes up: the backend may know it).
    fn refusal(&self, row: &Row) -> Option<String> {
        let type_ok = crate::topology::is_message_type(&row.message_type)
            && row.message_type != crate::upstream::RECEIPT_TYPE;
        if !type_ok {
            return Some(format!(
                "outbox row {}: type {:?} is not 1 to 64 of a-z, 0-9 and _, or is reserved: it was not sent",
                row.id, row.message_type
            ));
        }
        if !(1..=128).contains(&row.message_id.len()) {
            return Some(format!(
                "outbox row {}: its message_id must have 1 to 128 bytes: it was not sent",
                row.id
            ));
        }
        if row.body.len() > self.max_message_bytes {
            return Some(format!(
                "outbox row {} is {} bytes, over uplink.max_message_bytes ({}): it was not sent",
                row.id,
                row.body.len(),
                self.max_message_bytes
            ));
        }
        if let Err(err) =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&row.payload)
        {
            return Some(format!(
                "outbox row {}: the payload is not a JSON object ({err}): it was not sent",
                row.id
            ));
        }
        match self.registry.check(&row.message_type, &row.payload) {
            Err(crate::registry::CheckError::Invalid(reason)) => Some(format!(
                "outbox row {}: {}: {reason}: it was not sent",
                row.id, row.message_type
            )),
            _ => None,
        }
    }

    async fn send_receipt(
        &self,
        session: &mut Session,
        run: &str,
        counter: &mut u64,
        (reach, quarantined, pending): (Reach, u64, u64),
        stopping: bool,
    ) -> Result<(), BrokerError> {
        *counter += 1;
        let receipt = Receipt {
            applied_up_to: reach.up_to,
            highest_applied: reach.highest,
            quarantined,
            outbox: pending,
            stopping,
            verified_seq: reach.verified_seq,
            gap: reach.gap.map(str::to_owned),
            run: run.to_owned(),
            n: *counter,
        };
        let payload = serde_json::to_string(&receipt).unwrap_or_else(|_| "{}".into());
        let message_id = format!("{run}-{counter}");
        let body = upstream_body(
            RECEIPT_TYPE,
            &self.license_key,
            &self.terminal_id,
            &message_id,
            &crate::publisher::now_rfc3339().unwrap_or_default(),
            &payload,
        );
        let key = upstream_key(&self.license_key, &self.terminal_id, RECEIPT_TYPE);
        // Not mandatory: without a backend listening, a receipt has no reader.
        let confirm = session
            .publish(&key, &body, Some(&message_id), false)
            .await?;
        session.wait(confirm).await.map(drop)
    }
}

/// What a round did.
enum Round {
    /// Nothing to send.
    Empty,
    /// Rows sent, confirmed and deleted; `full` when the round took as
    /// many as it could, so more may wait.
    Sent { full: bool },
    /// A row that can never be taken was moved to the quarantine.
    Refused,
    /// The broker returned or refused a row: the round stays.
    Unroutable,
    /// The database failed (reading, deleting, quarantining): try again
    /// after a wait.
    Held,
}

/// The body of an upstream message, written by hand around the payload
/// text as stored (it is JSON, checked when the row was written).
fn upstream_body(
    message_type: &str,
    license_key: &LicenseKey,
    terminal_id: &TerminalId,
    message_id: &str,
    created_at: &str,
    payload: &str,
) -> Vec<u8> {
    let text = |value: &str| serde_json::to_string(value).unwrap_or_else(|_| "\"\"".into());
    format!(
        "{{\"type\":{},\"license_key\":{},\"terminal_id\":{},\"message_id\":{},\"created_at\":{},\"payload\":{payload}}}",
        text(message_type),
        text(license_key.as_str()),
        text(terminal_id.as_str()),
        text(message_id),
        text(created_at),
    )
    .into_bytes()
}

fn open_outbox(path: &std::path::Path) -> rusqlite::Result<Sqlite> {
    let connection = Sqlite::open(path)?;
    connection.busy_timeout(Duration::from_secs(3))?;
    Ok(connection)
}

/// Rows waiting in the outbox, and messages in the quarantine.
fn counts(outbox: &Sqlite) -> rusqlite::Result<(u64, u64)> {
    outbox.prepare_cached(
        "SELECT (SELECT count(*) FROM possync_outbox), (SELECT count(*) FROM possync_quarantine)",
    )?.query_row(
        [],
        |row| {
            let count = |n: i64| u64::try_from(n).unwrap_or(0);
            Ok((count(row.get(0)?), count(row.get(1)?)))
        },
    )
}

fn read_rows(
    outbox: &Sqlite,
    limit: usize,
    license_key: &LicenseKey,
    terminal_id: &TerminalId,
) -> rusqlite::Result<Vec<Row>> {
    let mut statement = outbox.prepare_cached(
        "SELECT id, type, payload, created_at, message_id FROM possync_outbox ORDER BY id LIMIT ?1",
    )?;
    statement
        .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
            let id: i64 = row.get(0)?;
            // Read as text whatever the app stored, so that one odd value
            // makes one refused row, never a stuck outbox.
            let (message_type, payload, created_at, message_id) =
                (text(row, 1)?, text(row, 2)?, text(row, 3)?, text(row, 4)?);
            Ok(Row {
                id,
                body: upstream_body(
                    &message_type,
                    license_key,
                    terminal_id,
                    &message_id,
                    &created_at,
                    &payload,
                ),
                message_type,
                payload,
                message_id,
            })
        })?
        .collect()
}

/// Column `index` as text, whatever SQLite holds there.
fn text(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<String> {
    use rusqlite::types::ValueRef;
    Ok(match row.get_ref(index)? {
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
            String::from_utf8_lossy(bytes).into_owned()
        }
        ValueRef::Integer(n) => n.to_string(),
        ValueRef::Real(x) => x.to_string(),
        ValueRef::Null => String::new(),
    })
}

/// Moves `row` from the outbox to the quarantine, in one transaction.
fn quarantine(
    outbox: &mut Sqlite,
    row: &Row,
    routing_key: &str,
    reason: String,
    keep_rows: u32,
) -> rusqlite::Result<()> {
    let kept = crate::store::Quarantined::new(
        routing_key,
        Some(&row.message_type),
        Some(&row.message_id),
        reason,
        &row.body,
    );
    let mut transaction = crate::transaction::Transaction::begin(outbox)?;
    transaction.record_quarantined(&kept, keep_rows)?;
    transaction.execute("DELETE FROM possync_outbox WHERE id = ?1", [row.id])?;
    transaction.commit()
}

/// Deletes exactly the rows sent: a row the app wrote meanwhile stays,
/// whatever its id.
fn delete_sent(outbox: &mut Sqlite, rows: &[Row]) -> rusqlite::Result<()> {
    let transaction = outbox.transaction()?;
    {
        let mut delete = transaction
            .prepare_cached("DELETE FROM possync_outbox WHERE id = ?1 AND message_id = ?2")?;
        for row in rows {
            delete.execute(rusqlite::params![row.id, row.message_id])?;
        }
    }
    transaction.commit()
}

/// One connection with a confirming channel.
struct Session {
    connection: Connection,
    channel: Channel,
    exchange: String,
    url: String,
    /// The broker user, set as each message's `user_id`.
    user: String,
    timeout_secs: u64,
}

impl Session {
    async fn open(broker: &BrokerConfig, url: &str) -> Result<Self, BrokerError> {
        let timeout = broker.confirm_timeout_secs;
        let connection = connection::connect_framed(
            broker,
            url,
            "possync terminal uplink",
            Some(connection::TERMINAL_FRAME_MAX),
        )
        .await?;
        let channel = connection::confirming_channel(&connection, timeout, url).await?;
        Ok(Self {
            connection,
            channel,
            exchange: broker.exchange.clone(),
            user: broker_user(url),
            url: url.to_owned(),
            timeout_secs: timeout,
        })
    }

    async fn publish(
        &self,
        routing_key: &str,
        body: &[u8],
        message_id: Option<&str>,
        mandatory: bool,
    ) -> Result<lapin::PublisherConfirm, BrokerError> {
        let mut properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_user_id(self.user.as_str().into());
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        connection::within(
            self.timeout_secs,
            "publishing upstream",
            &self.url,
            self.channel.basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            ),
        )
        .await
    }

    async fn wait(&self, confirm: lapin::PublisherConfirm) -> Result<Confirmation, BrokerError> {
        connection::within(
            self.timeout_secs,
            "waiting for the broker's confirm",
            &self.url,
            confirm,
        )
        .await
    }

    /// Completes when the connection is gone.
    async fn closed(&self) {
        while self.connection.status().connected() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn close(self) {
        let _ = connection::within(
            self.timeout_secs,
            "closing",
            &self.url,
            self.connection.close(200, "done".into()),
        )
        .await;
    }
}

/// The user name of an AMQP URL (`guest` when it names none, as RabbitMQ
/// takes it).
pub(crate) fn broker_user(url: &str) -> String {
    url.parse::<lapin::uri::AMQPUri>()
        .map(|uri| uri.authority.userinfo.username)
        .unwrap_or_else(|_| "guest".into())
}
