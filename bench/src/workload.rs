//! The messages both sides apply, and the broker chores around a run.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use possync_core::LicenseKey;

pub(crate) const EXCHANGE: &str = "pos_license_events";
/// Products the changes cycle over: updates hit existing rows, as in a store.
const PRODUCTS: usize = 1000;

pub(crate) fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// A `price_update` in the original wire format, with the time it was made.
/// Each change sets a price no earlier change set: SQLite skips writing a
/// row that an update leaves as it was, so repeated prices would spare the
/// baseline its commits' disk writes and fsyncs.
pub(crate) fn price_update(license: &LicenseKey, i: usize, message_type: &str) -> Vec<u8> {
    format!(
        r#"{{"type":"{message_type}","license_key":"{license}","payload":{},"timestamp":"2025-11-27T10:30:00Z"}}"#,
        price_payload(i, i % PRODUCTS)
    )
    .into_bytes()
}

/// The payload of change `i`, a price no earlier change set, for product `product`.
pub(crate) fn price_payload(i: usize, product: usize) -> String {
    format!(
        r#"{{"product_id":"P{product:04}","new_price":{}.{:02},"sent_at_us":{}}}"#,
        i / 100,
        i % 100,
        now_micros()
    )
}

/// What a backlog's messages carry besides the original four fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// `type`, `license_key`, `payload`, `timestamp`: the original back office.
    Original,
    /// What possync's publisher sends (`possync publish bulk`): also
    /// `message_id`, `version`, `publisher_id` and `publisher_seq`.
    Publisher,
    /// What the backend's relay sends (`message_id`, its clock's
    /// `timestamp`, `version`, `seq`, `catalog`, `head`): submitted to a
    /// real `possync backend` and published by its relay.
    Sequenced,
}

impl Format {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Original => "original format",
            Self::Publisher => "possync publisher format",
            Self::Sequenced => "sequenced format",
        }
    }
}

/// Publishes `count` price changes to `license` in `format`, each for the
/// product `product(i)`: with possync's own publisher for its format,
/// through a real backend and its relay for the sequenced one, else with
/// the raw publisher, bodies as the original back office writes them.
pub(crate) async fn publish_backlog(
    connection: &Connection,
    broker: &possync_core::BrokerConfig,
    license: &LicenseKey,
    count: usize,
    format: Format,
    product: impl Fn(usize) -> usize,
) -> anyhow::Result<()> {
    let routing_key = format!("license.{license}.price_update");
    match format {
        Format::Original => {
            let bodies = (0..count).map(|i| {
                format!(
                    r#"{{"type":"price_update","license_key":"{license}","payload":{},"timestamp":"2025-11-27T10:30:00Z"}}"#,
                    price_payload(i, product(i))
                )
                .into_bytes()
            });
            publish_raw(connection, &routing_key, bodies, 1000).await?;
        }
        Format::Sequenced => {
            let url = broker
                .urls
                .first()
                .ok_or_else(|| anyhow::anyhow!("the benchmark names no broker"))?;
            crate::backend::relay_backlog(url, license, count, |i| price_payload(i, product(i)))
                .await?;
        }
        Format::Publisher => {
            let publisher = possync_core::Publisher::connect(broker).await?;
            let mut envelopes = Vec::with_capacity(count);
            for i in 0..count {
                let payload =
                    serde_json::value::RawValue::from_string(price_payload(i, product(i)))?;
                envelopes.push(possync_sdk::Envelope::with_raw_payload(
                    "price_update",
                    license.as_str(),
                    payload,
                ));
            }
            publisher.publish_envelopes(envelopes).await?;
            publisher.close().await;
        }
    }
    Ok(())
}

/// Products in the order a busy back office changes them: each change
/// picks one of `products` at random (a fixed sequence, the same every run).
pub(crate) fn shuffled(products: usize) -> impl Fn(usize) -> usize {
    move |i| {
        // SplitMix64 of the change's index.
        let mut x = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        (x % products as u64) as usize
    }
}

/// Products in turn, `0, 1, ..., PRODUCTS - 1, 0, ...`: no product changes
/// twice within a thousand changes, so nothing collapses.
pub(crate) fn in_turn(i: usize) -> usize {
    i % PRODUCTS
}

/// A license key no earlier run used.
pub(crate) fn license(label: &str) -> LicenseKey {
    let id = uuid::Uuid::now_v7().simple().to_string();
    LicenseKey::new(format!("BENCH-{label}-{}", &id[20..])).expect("valid license key")
}

pub(crate) async fn connect(url: &str) -> anyhow::Result<Connection> {
    Ok(Connection::connect(url, ConnectionProperties::default()).await?)
}

/// Publishes `count` price changes to the store `license` with the raw
/// publisher: the workload every throughput scenario feeds its consumers.
pub(crate) async fn publish_price_updates(
    connection: &Connection,
    license: &LicenseKey,
    count: usize,
    window: usize,
) -> anyhow::Result<usize> {
    let bodies = (0..count).map(|i| price_update(license, i, "price_update"));
    publish_raw(
        connection,
        &format!("license.{license}.price_update"),
        bodies,
        window,
    )
    .await
}

/// Publishes `bodies` with confirms, keeping `window` in flight: the raw
/// lapin publisher both sides' backlogs are filled with.
pub(crate) async fn publish_raw(
    connection: &Connection,
    routing_key: &str,
    bodies: impl Iterator<Item = Vec<u8>>,
    window: usize,
) -> anyhow::Result<usize> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut pending = std::collections::VecDeque::new();
    let mut sent = 0;
    for body in bodies {
        if pending.len() >= window {
            let confirm: lapin::PublisherConfirm = pending.pop_front().expect("non-empty");
            anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a message");
        }
        let confirm = channel
            .basic_publish(
                EXCHANGE.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await?;
        pending.push_back(confirm);
        sent += 1;
    }
    for confirm in pending {
        anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a message");
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(sent)
}

pub(crate) async fn delete_queues(connection: &Connection, queues: &[String]) {
    if let Ok(channel) = connection.create_channel().await {
        for queue in queues {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = channel.close(200, "done".into()).await;
    }
}

/// Resident memory of this process, in KiB (Linux).
pub(crate) fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) this process has used, in microseconds.
pub(crate) fn cpu_micros() -> u64 {
    process_cpu_micros(std::path::Path::new("/proc/self/stat")).unwrap_or(0)
}

/// CPU time the broker's Erlang VM on this machine has used, in
/// microseconds (0 if it is elsewhere): it shares the cores with the
/// benchmark, so a cost moved onto it is still a cost.
pub(crate) fn broker_cpu_micros() -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|entry| {
            std::fs::read_to_string(entry.path().join("comm"))
                .is_ok_and(|comm| comm.trim() == "beam.smp")
        })
        .filter_map(|entry| process_cpu_micros(&entry.path().join("stat")))
        .sum()
}

fn process_cpu_micros(stat: &std::path::Path) -> Option<u64> {
    let stat = std::fs::read_to_string(stat).ok()?;
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'; 100 ticks a second on Linux.
    Some((ticks(11) + ticks(12)) * 10_000)
}

/// Closes connections the benchmark opened: a dropped lapin connection
/// keeps its I/O thread and buffers, and 1,000 of them per round add up.
pub(crate) async fn close(connections: impl IntoIterator<Item = Connection>) {
    for connection in connections {
        // Already closed by the broker is as good as closed.
        let _ = connection.close(200, "benchmark done".into()).await;
    }
}
