//! `/metrics`: the terminal's status in the Prometheus text format, read
//! from the status at each scrape.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::StatusView;
use crate::status::{State, Status};

/// The `Content-Type` of [`Metrics::render`]'s text.
pub(super) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every series carries the store and the terminal, so that one Prometheus
/// can scrape a fleet.
#[derive(Debug)]
pub(super) struct Metrics(Registry);

impl Metrics {
    pub(super) fn new(view: &StatusView) -> Self {
        let labels = [
            ("license_key", &view.license_key),
            ("terminal_id", &view.terminal_id),
        ]
        .map(|(key, value)| (Cow::Borrowed(key), Cow::Owned(value.clone())));
        let mut registry = Registry::with_labels(labels.into_iter());
        registry.register_collector(Box::new(StatusMetrics(view.status.clone())));
        Self(registry)
    }

    pub(super) fn render(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.0)?;
        Ok(text)
    }
}

#[derive(Debug)]
struct StatusMetrics(watch::Receiver<Status>);

impl Collector for StatusMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        // A copy, so the terminal never waits for a scrape to update it.
        let status = self.0.borrow().clone();
        let state = &status.state;
        gauge(
            &mut encoder,
            "possync_live",
            "1 when the terminal is connected and consuming.",
            i64::from(status.is_live()),
        )?;
        gauge(
            &mut encoder,
            "possync_stalled",
            "1 while the database refuses the batch in hand: the terminal is connected but takes no new messages.",
            i64::from(matches!(state, State::Stalled { .. })),
        )?;
        let mut states = encoder.encode_descriptor(
            "possync_state",
            "1 for the terminal's current state, 0 for the others.",
            None,
            MetricType::Gauge,
        )?;
        for name in State::names() {
            ConstGauge::new(i64::from(name == state.name()))
                .encode(states.encode_family(&[("state", name)])?)?;
        }
        gauge(
            &mut encoder,
            "possync_state_since_seconds",
            "When the current state began (Unix time).",
            state.since().map_or(0.0, seconds),
        )?;
        counters_by_type(
            &mut encoder,
            "possync_messages_applied",
            "Messages applied since start, by type.",
            &status.applied_by_type,
        )?;
        counters_by_type(
            &mut encoder,
            "possync_messages_stale",
            "Messages since start that changed nothing because the database held a newer change of their entity, by type.",
            &status.stale_by_type,
        )?;
        counter(
            &mut encoder,
            "possync_messages_quarantined",
            "Messages dead-lettered since start.",
            status.quarantined,
        )?;
        counter(
            &mut encoder,
            "possync_messages_duplicate",
            "Redelivered messages skipped since start.",
            status.duplicates,
        )?;
        counter(
            &mut encoder,
            "possync_messages_collapsed",
            "Messages since start settled without being applied because a later change of the same batch overwrote them (backlog collapse); counted as applied too.",
            status.collapsed,
        )?;
        let sync = &status.sync;
        gauge(
            &mut encoder,
            "possync_synced_up_to_seq",
            "Every change of the store up to this seq is applied here (0: no sequenced change yet).",
            sync.synced_up_to,
        )?;
        gauge(
            &mut encoder,
            "possync_highest_applied_seq",
            "The highest seq applied; above possync_synced_up_to_seq when a change before it never arrived or could not apply.",
            sync.highest_applied,
        )?;
        gauge(
            &mut encoder,
            "possync_sync_gap",
            "1 while the terminal may lack some of its store's changes (a jump in seq, a queue made again, a database restored from an older copy, a checksum that differed; the status says which), else 0.",
            i64::from(sync.gap.is_some()),
        )?;
        if let Some(verified) = &sync.verified {
            gauge(
                &mut encoder,
                "possync_verified_seq",
                "The seq at which the terminal's catalog last matched the backend's checksums (absent until it has, and after one differed).",
                verified.seq,
            )?;
        }
        if let Some(head) = sync.head {
            gauge(
                &mut encoder,
                "possync_head_seq",
                "The highest seq the terminal knows the backend gave the store (the seqs received and the head the relay names): a lower bound of the backend's head.",
                head,
            )?;
        }
        gauge(
            &mut encoder,
            "possync_last_change_seconds",
            "When the last sequenced change was applied (Unix time; 0: never).",
            sync.last_change_ms.map_or(0.0, |ms| ms as f64 / 1000.0),
        )?;
        if let Some(depth) = status.queue_depth {
            gauge(
                &mut encoder,
                "possync_queue_depth",
                "Messages waiting in the terminal's queue, not yet delivered.",
                depth,
            )?;
        }
        gauge(
            &mut encoder,
            "possync_last_applied_seconds",
            "When the last message was applied (Unix time).",
            status.last_applied_at.map_or(0.0, seconds),
        )
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: impl EncodeGaugeValue,
) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// `name` without `_total`: the encoder adds it to a counter.
fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn counters_by_type(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    counts: &BTreeMap<String, u64>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (message_type, count) in counts {
        ConstCounter::new(*count)
            .encode(family.encode_family(&[("type", message_type.as_str())])?)?;
    }
    Ok(())
}

fn seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
