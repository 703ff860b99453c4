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
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
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
         type       TEXT NOT NULL CHECK (length(type) BETWEEN 1 AND 64 AND type NOT GLOB '*[^a-z0-9_]*'),
         payload    TEXT NOT NULL CHECK (json_valid(payload)),
         created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
         message_id TEXT NOT NULL UNIQUE DEFAULT (lower(hex(randomblob(16))))
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
    /// The largest body sent (`terminal.max_message_bytes`): a larger row
    /// could never be taken and would hold every row behind it.
    pub(crate) max_message_bytes: usize,
    /// Rows kept in the quarantine (`terminal.quarantine_max_rows`).
    pub(crate) quarantine_max_rows: u32,
}

/// Why a session ended.
enum Ended {
    Stopped,
    Lost(BrokerError),
}

/// What a receipt last said, and when, to coalesce the next.
struct Reported {
    at: Instant,
    said: (i64, i64, u64, u64),
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
                        let _ = tokio::time::timeout(
                            LAST_RECEIPT,
                            self.send_receipt(&mut session, &mut outbox, &run, &mut counter, true),
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
        let mut unroutable_until: Option<Instant> = None;
        loop {
            if unroutable_until.is_none_or(|until| Instant::now() >= until) {
                unroutable_until = None;
                match self.send_round(session, outbox).await {
                    Ok(Round::Sent | Round::Empty) => {}
                    Ok(Round::Unroutable) => {
                        unroutable_until = Some(Instant::now() + UNROUTABLE_WAIT);
                    }
                    Err(err) => return Ended::Lost(err),
                }
            }
            let said = self.said(outbox);
            let now = Instant::now();
            let due = match &reported {
                None => Some(now),
                Some(last) if last.said != said => Some(last.at + interval),
                Some(last) => Some(last.at + heartbeat),
            };
            if let Some(due) = due
                && due <= now
            {
                if let Err(err) = self
                    .send_receipt(session, outbox, run, counter, false)
                    .await
                {
                    return Ended::Lost(err);
                }
                reported = Some(Reported { at: now, said });
                continue;
            }
            let wake = due.map_or(poll, |due| due.saturating_duration_since(now).min(poll));
            tokio::select! {
                () = tokio::time::sleep(wake) => {}
                _ = self.status.changed() => {}
                _ = stop.wait_for(|stop| *stop) => return Ended::Stopped,
                () = session.closed() => return Ended::Lost(BrokerError::ConnectionLost),
            }
        }
    }

    /// What a receipt would say now.
    fn said(&self, outbox: &Sqlite) -> (i64, i64, u64, u64) {
        let (outbox_rows, quarantined) = counts(outbox).unwrap_or((0, 0));
        let status = self.status.borrow();
        (
            status.sync.synced_up_to,
            status.sync.highest_applied,
            quarantined,
            outbox_rows,
        )
    }

    /// Sends the rows of the outbox (up to a batch) and deletes those the
    /// broker confirmed.
    async fn send_round(
        &self,
        session: &mut Session,
        outbox: &mut Sqlite,
    ) -> Result<Round, BrokerError> {
        let rows = match read_rows(
            outbox,
            self.config.batch,
            &self.license_key,
            &self.terminal_id,
        ) {
            Ok(rows) => rows,
            Err(err) => {
                events::uplink_outbox_failed(&err.to_string());
                return Ok(Round::Empty);
            }
        };
        // The round stops before a row too large to send; such a row,
        // first, is moved to the quarantine, and the rest go next round.
        let mut rows = rows;
        if let Some(too_large) = rows
            .iter()
            .position(|row| row.body.len() > self.max_message_bytes)
        {
            if too_large == 0 {
                let row = &rows[0];
                let routing_key =
                    upstream_key(&self.license_key, &self.terminal_id, &row.message_type);
                let reason = format!(
                    "outbox row {} is {} bytes, over terminal.max_message_bytes ({}): it was not sent",
                    row.id,
                    row.body.len(),
                    self.max_message_bytes
                );
                events::uplink_row_quarantined(row.id, &reason);
                if let Err(err) =
                    quarantine(outbox, row, &routing_key, reason, self.quarantine_max_rows)
                {
                    events::uplink_outbox_failed(&err.to_string());
                }
                return Ok(Round::Sent);
            }
            rows.truncate(too_large);
        }
        if rows.is_empty() {
            return Ok(Round::Empty);
        }
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
        let last = rows.last().map_or(0, |row| row.id);
        if let Err(err) = delete_through(outbox, last) {
            // Sent again later; the backend records each id once.
            events::uplink_outbox_failed(&err.to_string());
        }
        events::uplink_sent(rows.len());
        Ok(Round::Sent)
    }

    async fn send_receipt(
        &self,
        session: &mut Session,
        outbox: &mut Sqlite,
        run: &str,
        counter: &mut u64,
        stopping: bool,
    ) -> Result<(), BrokerError> {
        *counter += 1;
        let (applied_up_to, highest_applied, quarantined, pending) = self.said(outbox);
        let receipt = Receipt {
            applied_up_to,
            highest_applied,
            quarantined,
            outbox: pending,
            stopping,
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
    Empty,
    Sent,
    Unroutable,
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
    outbox.query_row(
        "SELECT (SELECT count(*) FROM possync_outbox), (SELECT count(*) FROM possync_quarantine)",
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
            let (id, message_type, payload, created_at, message_id): (
                i64,
                String,
                String,
                String,
                String,
            ) = (
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            );
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
                message_id,
            })
        })?
        .collect()
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

fn delete_through(outbox: &Sqlite, last: i64) -> rusqlite::Result<()> {
    outbox.execute("DELETE FROM possync_outbox WHERE id <= ?1", [last])?;
    Ok(())
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
        let connection = connection::connect(broker, url, "possync terminal uplink").await?;
        let channel = connection::within(
            timeout,
            "opening a channel",
            url,
            connection.create_channel(),
        )
        .await?;
        connection::within(
            timeout,
            "enabling publisher confirms",
            url,
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
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
fn broker_user(url: &str) -> String {
    url.parse::<lapin::uri::AMQPUri>()
        .map(|uri| uri.authority.userinfo.username)
        .unwrap_or_else(|_| "guest".into())
}
