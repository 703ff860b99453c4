//! Checkpoints: now and then the relay publishes a store's checksums at
//! its latest change (`license.<KEY>.possync_checkpoint`), and a terminal
//! standing at that change compares them with its own database.
//!
//! A store's checkpoint is due once `[relay] checkpoint_every_changes` of
//! its changes were published since its last one, and at least every
//! `checkpoint_every_secs` even when nothing changed (a row changed behind
//! possync's back on a till is found so). Stores checkpointed by time are
//! spread over the interval rather than sent all at once.
//!
//! A checkpoint goes out only once the broker confirmed every change up to
//! its `seq`: marked published, or confirmed and waiting for the marker.
//! It is published after them on the store's routing key, so a terminal
//! receives it after the changes it covers. A store with changes still to
//! publish is passed over and tried again after a later round.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use possync_core::{CHECKPOINT_TYPE, Checkpoint, ChecksumSpec, PublishError, Publisher};
use possync_sdk::Envelope;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{Marker, Relay, RoundError};
use crate::config::RelayConfig;
use crate::events;
use crate::storage::Storage;

/// A checkpoint that could not be read or published is tried again after
/// this.
const RETRY: Duration = Duration::from_secs(30);

/// Which stores' checkpoints are due.
#[derive(Debug)]
pub(super) struct Schedule {
    /// Changes published since a store's last checkpoint that make the
    /// next one due; 0: never.
    every_changes: u64,
    /// The longest a store goes without a checkpoint; `None`: forever.
    every: Option<Duration>,
    stores: HashMap<String, Due>,
    /// When to look for the stores to checkpoint by time; `None`: found.
    scan_at: Option<Instant>,
}

#[derive(Debug)]
struct Due {
    /// Changes published since its last checkpoint.
    changes: u64,
    /// Due by time from then (when checkpoints go by time).
    next: Instant,
    /// Not tried before then: its last checkpoint failed.
    not_before: Option<Instant>,
}

impl Schedule {
    /// The schedule `config` sets for a catalog whose checksums `spec`
    /// covers, logged; `None` when no checkpoint is to be published.
    pub(super) fn start(config: &RelayConfig, spec: &ChecksumSpec, now: Instant) -> Option<Self> {
        if spec.is_empty() {
            events::checkpoints_off("no enabled plugin exports its entities");
            return None;
        }
        if config.checkpoint_every_changes == 0 && config.checkpoint_every_secs == 0 {
            events::checkpoints_off(
                "[relay] checkpoint_every_changes and checkpoint_every_secs are both 0",
            );
            return None;
        }
        events::checkpoints_on(
            &spec.kinds().collect::<Vec<_>>().join(", "),
            config.checkpoint_every_changes,
            config.checkpoint_every_secs,
        );
        let every = (config.checkpoint_every_secs > 0)
            .then(|| Duration::from_secs(config.checkpoint_every_secs));
        Some(Self {
            every_changes: config.checkpoint_every_changes,
            every,
            stores: HashMap::new(),
            scan_at: every.map(|_| now),
        })
    }

    /// Whether to look for every store now (checkpoints by time cover
    /// stores that change nothing).
    pub(super) fn scan_due(&self, now: Instant) -> bool {
        self.scan_at.is_some_and(|at| at <= now)
    }

    /// The stores there are: each due by time at a random point of the
    /// interval, so that they do not all go at once.
    pub(super) fn found(&mut self, stores: impl IntoIterator<Item = String>, now: Instant) {
        self.scan_at = None;
        let Some(every) = self.every else { return };
        let spread = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
        for store in stores {
            self.stores.entry(store).or_insert_with(|| Due {
                changes: 0,
                next: now + Duration::from_millis(rand::random_range(0..spread)),
                not_before: None,
            });
        }
    }

    /// The stores could not be listed: tried again later.
    pub(super) fn scan_failed(&mut self, now: Instant) {
        self.scan_at = Some(now + RETRY);
    }

    /// Rows (store, seq) the broker confirmed.
    pub(super) fn published(&mut self, rows: &[(String, i64)], now: Instant) {
        let every = self.every.unwrap_or_default();
        for (store, _) in rows {
            let due = self.stores.entry(store.clone()).or_insert_with(|| Due {
                changes: 0,
                next: now + every,
                not_before: None,
            });
            due.changes = due.changes.saturating_add(1);
        }
    }

    /// The stores whose checkpoint is due, by store.
    pub(super) fn due(&self, now: Instant) -> Vec<String> {
        let mut due: Vec<String> = self
            .stores
            .iter()
            .filter(|(_, due)| due.not_before.is_none_or(|at| at <= now))
            .filter(|(_, due)| {
                (self.every_changes > 0 && due.changes >= self.every_changes)
                    || (self.every.is_some() && due.next <= now)
            })
            .map(|(store, _)| store.clone())
            .collect();
        due.sort();
        due
    }

    /// `store`'s checkpoint was published.
    pub(super) fn done(&mut self, store: &str, now: Instant) {
        if let Some(due) = self.stores.get_mut(store) {
            due.changes = 0;
            due.next = now + self.every.unwrap_or_default();
            due.not_before = None;
        }
    }

    /// `store`'s checkpoint failed: tried again after [`RETRY`].
    pub(super) fn failed(&mut self, store: &str, now: Instant) {
        if let Some(due) = self.stores.get_mut(store) {
            due.not_before = Some(now + RETRY);
        }
    }
}

impl<S: Storage> Relay<S> {
    /// Publishes the checkpoints that are due and may go out now. A
    /// failure is logged and tried again later; one of the broker's
    /// connection also drops `publisher`, for the next round to connect
    /// anew.
    pub(super) async fn checkpoints(
        &self,
        schedule: &mut Schedule,
        publisher: &mut Option<Publisher>,
        marker: &Marker,
    ) {
        let now = Instant::now();
        if schedule.scan_due(now) {
            match self.catalog.storage().heads().await {
                Ok(heads) => schedule.found(
                    heads
                        .into_iter()
                        .filter(|head| head.head > 0)
                        .map(|head| head.store),
                    now,
                ),
                Err(err) => {
                    events::checkpoint_failed("(every store)", &err.to_string(), RETRY.as_secs());
                    schedule.scan_failed(now);
                }
            }
        }
        let due = schedule.due(now);
        if due.is_empty() {
            return;
        }
        // Taken before the reads: a row marked meanwhile is only seen
        // published, never missed.
        let (_, held) = marker.held_now();
        let mut ready = Vec::new();
        for store in due {
            match self.ready(&store, &held).await {
                Ok(Some(checkpoint)) => ready.push((store, checkpoint)),
                Ok(None) => {}
                Err(err) => {
                    events::checkpoint_failed(&store, &err.to_string(), RETRY.as_secs());
                    schedule.failed(&store, now);
                }
            }
        }
        if ready.is_empty() {
            return;
        }
        match self.publish_checkpoints(&ready, publisher).await {
            Ok(()) => {
                for (store, checkpoint) in &ready {
                    schedule.done(store, now);
                    events::checkpoint_published(store, checkpoint.seq, checkpoint.checksums.len());
                }
            }
            Err(err) => {
                for (store, _) in &ready {
                    events::checkpoint_failed(store, &err.to_string(), RETRY.as_secs());
                    schedule.failed(store, now);
                }
                if let RoundError::Publish(PublishError::Broker(_)) = err
                    && let Some(old) = publisher.take()
                {
                    old.close().await;
                }
            }
        }
    }

    /// `store`'s checkpoint, if every change up to its head was confirmed
    /// by the broker (`held`: per store, the highest seq confirmed and not
    /// yet marked); `None` to try again after a later round.
    async fn ready(
        &self,
        store: &str,
        held: &HashMap<String, i64>,
    ) -> Result<Option<Checkpoint>, RoundError> {
        let spec = self.catalog.checksums();
        let state = self.catalog.storage().checkpoint(store, spec).await?;
        if let Some(unpublished) = state.highest_unpublished
            && held.get(store).is_none_or(|&up_to| unpublished > up_to)
        {
            return Ok(None);
        }
        let Some(checksums) = state.checksums else {
            // Another backend process with other plugins wrote to them.
            events::checksums_stale();
            crate::service::sync_checksums(&self.catalog).await?;
            return Ok(None);
        };
        Ok(Some(Checkpoint {
            seq: state.head,
            checksums,
        }))
    }

    /// Publishes checkpoints, confirmed.
    async fn publish_checkpoints(
        &self,
        ready: &[(String, Checkpoint)],
        publisher: &mut Option<Publisher>,
    ) -> Result<(), RoundError> {
        let catalog = self.catalog_id().await?;
        let timestamp = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .map_err(|err| RoundError::Checkpoint(format!("cannot format the time: {err}")))?;
        let envelopes = ready
            .iter()
            .map(|(store, checkpoint)| envelope(store, checkpoint, &timestamp, &catalog))
            .collect::<Result<Vec<_>, _>>()?;
        self.connected(publisher)
            .await?
            .publish_envelopes(envelopes)
            .await?;
        Ok(())
    }
}

/// A checkpoint's envelope: it changes nothing, so it has no `seq`; its
/// payload names the seq it states the catalog at.
fn envelope(
    store: &str,
    checkpoint: &Checkpoint,
    timestamp: &str,
    catalog: &str,
) -> Result<Envelope, RoundError> {
    let payload = serde_json::value::to_raw_value(checkpoint)
        .map_err(|err| RoundError::Checkpoint(format!("cannot encode it: {err}")))?;
    Ok(Envelope::with_raw_payload(CHECKPOINT_TYPE, store, payload)
        .with_timestamp(timestamp)
        .with_message_id(uuid::Uuid::now_v7().to_string())
        .with_catalog(catalog))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use possync_core::Checksum;

    use super::*;

    fn spec() -> ChecksumSpec {
        let fields = vec!["price".to_owned()];
        ChecksumSpec::new([("product", fields.as_slice())])
    }

    fn config(every_changes: u64, every_secs: u64) -> RelayConfig {
        RelayConfig {
            checkpoint_every_changes: every_changes,
            checkpoint_every_secs: every_secs,
            ..RelayConfig::default()
        }
    }

    fn rows(store: &str, count: i64) -> Vec<(String, i64)> {
        (1..=count).map(|seq| (store.to_owned(), seq)).collect()
    }

    #[test]
    fn a_store_is_due_once_enough_of_its_changes_were_published_since_its_last() {
        let now = Instant::now();
        let mut schedule = Schedule::start(&config(3, 0), &spec(), now).expect("on");
        assert!(
            !schedule.scan_due(now),
            "no need to list stores without time"
        );
        schedule.published(&rows("A", 2), now);
        schedule.published(&rows("B", 3), now);
        assert_eq!(schedule.due(now), ["B"]);
        schedule.done("B", now);
        schedule.published(&rows("A", 1), now);
        assert_eq!(schedule.due(now), ["A"]);
        assert_eq!(schedule.due(now + Duration::from_secs(3600)), ["A"]);
    }

    #[test]
    fn every_store_is_due_within_the_interval_even_when_nothing_changed() {
        let now = Instant::now();
        let every = Duration::from_secs(60);
        let mut schedule = Schedule::start(&config(0, 60), &spec(), now).expect("on");
        assert!(schedule.scan_due(now));
        schedule.found(["A".to_owned(), "B".to_owned()], now);
        assert!(!schedule.scan_due(now));
        assert_eq!(schedule.due(now + every), ["A", "B"]);
        schedule.done("A", now + every);
        assert_eq!(schedule.due(now + every), ["B"]);
        assert_eq!(schedule.due(now + every * 2), ["A", "B"]);
        schedule.published(&rows("A", 10_000), now);
        assert_eq!(
            schedule.due(now + every),
            ["B"],
            "changes alone never make it due"
        );
    }

    #[test]
    fn a_failed_checkpoint_waits_before_it_is_tried_again() {
        let now = Instant::now();
        let mut schedule = Schedule::start(&config(1, 0), &spec(), now).expect("on");
        schedule.published(&rows("A", 1), now);
        schedule.failed("A", now);
        assert!(schedule.due(now).is_empty());
        assert_eq!(schedule.due(now + RETRY), ["A"]);
    }

    #[test]
    fn no_checkpoint_without_a_kind_to_check_or_a_trigger() {
        let now = Instant::now();
        assert!(Schedule::start(&config(0, 0), &spec(), now).is_none());
        assert!(Schedule::start(&config(1000, 300), &ChecksumSpec::default(), now).is_none());
    }

    #[test]
    fn a_checkpoint_goes_to_its_store_with_no_seq_and_names_its_catalog() {
        let checkpoint = Checkpoint {
            seq: 7,
            checksums: BTreeMap::from([("product".to_owned(), Checksum { sum: 255, count: 2 })]),
        };
        let envelope =
            envelope("STORE-1", &checkpoint, "2025-11-27T10:30:00Z", "c0ffee").expect("encodes");
        assert_eq!(envelope.message_type, CHECKPOINT_TYPE);
        assert_eq!(envelope.license_key, "STORE-1");
        assert_eq!(envelope.seq, None);
        assert_eq!(envelope.catalog.as_deref(), Some("c0ffee"));
        assert!(envelope.message_id.is_some());
        assert_eq!(
            serde_json::from_str::<Checkpoint>(envelope.payload.get()).expect("a checkpoint"),
            checkpoint
        );
    }
}
