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
//! receives it after the changes it covers. A store that changes goes in
//! the round that publishes its changes, right after the last one that
//! ends a submission (its checksums there read from the checksum log); a
//! store that changes nothing gets its checkpoint between rounds, once
//! every change up to its head is confirmed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use possync_core::{CHECKPOINT_TYPE, Checkpoint, ChecksumSpec, PublishError, Publisher};
use possync_sdk::Envelope;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{Marker, Relay, RoundError};
use crate::config::RelayConfig;
use crate::events;
use crate::storage::{OutboxRow, Storage};

/// A checkpoint that could not be read or published is tried again after
/// this.
const RETRY: Duration = Duration::from_secs(30);

/// A store none of whose changes came straight from the exchange for this
/// long: terminals apply such a change on arrival, before the catalog has
/// sequenced its copy, so a checkpoint meanwhile could describe a catalog
/// they are past.
const DIRECT_QUIET: Duration = Duration::from_secs(60);

/// Checksums found stale (another backend process on the database keeps
/// them under other plugins) are computed again at most this often: each
/// time holds every submission back while it reads the whole catalog.
const RECOMPUTE_EVERY: Duration = Duration::from_secs(600);

/// What a store's checkpoint between rounds comes to.
enum Ready {
    /// Goes out.
    Checkpoint(Checkpoint),
    /// Not yet: a change it would cover is unpublished, or one came
    /// straight from the exchange lately.
    Wait,
    /// The stored checksums are kept under other plugins' exports.
    Stale,
}

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
    /// When the stale checksums were last computed again.
    recomputed_at: Option<Instant>,
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
            recomputed_at: None,
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

    /// `store`'s checkpoint was published. Its next by time keeps its
    /// place in the interval, so that stores stay spread; one whose place
    /// went by (the relay stalled) gets a random one in the next interval.
    pub(super) fn done(&mut self, store: &str, now: Instant) {
        let every = self.every.unwrap_or_default();
        if let Some(due) = self.stores.get_mut(store) {
            due.changes = 0;
            due.next += every;
            if due.next <= now {
                let spread = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
                due.next = now + Duration::from_millis(rand::random_range(0..spread));
            }
            due.not_before = None;
        }
    }

    /// Whether stale checksums may be computed again now (see
    /// [`RECOMPUTE_EVERY`]); if so, counts this as the time.
    fn may_recompute(&mut self, now: Instant) -> bool {
        let may = self
            .recomputed_at
            .is_none_or(|at| now.duration_since(at) >= RECOMPUTE_EVERY);
        if may {
            self.recomputed_at = Some(now);
        }
        may
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
                Ok(Ready::Checkpoint(checkpoint)) => ready.push((store, checkpoint)),
                Ok(Ready::Wait) => {}
                Ok(Ready::Stale) => {
                    // Another backend process with other plugins wrote to them.
                    events::checksums_stale();
                    if schedule.may_recompute(now)
                        && let Err(err) = crate::service::sync_checksums(&self.catalog).await
                    {
                        events::checkpoint_failed(&store, &err.to_string(), RETRY.as_secs());
                    }
                    schedule.failed(&store, now);
                }
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

    /// Places the checkpoints due for the stores of a round's `rows`: for
    /// each, the catalog at the last boundary of a submission it publishes
    /// (read from the checksum log), right after that change. A store
    /// whose last boundary was published by an earlier round waits for a
    /// later one.
    pub(super) async fn place_checkpoints(
        &self,
        schedule: &mut Schedule,
        rows: &[OutboxRow],
    ) -> Result<Placed, RoundError> {
        let now = Instant::now();
        let due = schedule.due(now);
        let mut placed = Placed::default();
        if due.is_empty() {
            return Ok(placed);
        }
        let spec = self.catalog.checksums();
        let catalog = self.catalog_id().await?;
        let timestamp = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .map_err(|err| RoundError::Checkpoint(format!("cannot format the time: {err}")))?;
        for store in due {
            if self.catalog.direct_within(&store, DIRECT_QUIET) {
                continue;
            }
            let indices: Vec<usize> = (0..rows.len())
                .filter(|&i| rows[i].store == store)
                .collect();
            let (Some(&first), Some(&last)) = (indices.first(), indices.last()) else {
                continue;
            };
            let at = match self
                .catalog
                .storage()
                .checkpoint_at(&store, rows[last].seq, spec)
                .await
            {
                Ok(Some(at)) => at,
                Ok(None) => continue,
                Err(err) => {
                    events::checkpoint_failed(&store, &err.to_string(), RETRY.as_secs());
                    schedule.failed(&store, now);
                    continue;
                }
            };
            let (seq, checksums) = at;
            let position = if seq == rows[first].seq - 1 {
                Position::Before(first)
            } else if let Some(&index) = indices.iter().find(|&&i| rows[i].seq == seq) {
                Position::After(index)
            } else {
                continue;
            };
            let checkpoint = Checkpoint {
                seq,
                specs: kind_fingerprints(spec, &checksums),
                checksums,
            };
            let envelope = envelope(&store, &checkpoint, &timestamp, &catalog)?;
            let slot = match position {
                Position::Before(index) => placed.before.entry(index).or_default(),
                Position::After(index) => placed.after.entry(index).or_default(),
            };
            slot.push(Item {
                row: None,
                envelope,
                checkpoint: Some(Published {
                    store,
                    seq,
                    kinds: checkpoint.checksums.len(),
                }),
            });
        }
        Ok(placed)
    }

    /// Counts checkpoints the broker confirmed as done, and trims the
    /// checksum log below them.
    pub(super) async fn checkpoints_published(
        &self,
        schedule: &mut Schedule,
        published: &[Published],
    ) {
        let now = Instant::now();
        for checkpoint in published {
            schedule.done(&checkpoint.store, now);
            events::checkpoint_published(&checkpoint.store, checkpoint.seq, checkpoint.kinds);
            if let Err(err) = self
                .catalog
                .storage()
                .prune_checksum_log(&checkpoint.store, checkpoint.seq)
                .await
            {
                events::checkpoint_failed(&checkpoint.store, &err.to_string(), RETRY.as_secs());
            }
        }
    }

    /// `store`'s checkpoint, if every change up to its head was confirmed
    /// by the broker (`held`: per store, the highest seq confirmed and not
    /// yet marked); `None` to try again after a later round.
    async fn ready(&self, store: &str, held: &HashMap<String, i64>) -> Result<Ready, RoundError> {
        if self.catalog.direct_within(store, DIRECT_QUIET) {
            return Ok(Ready::Wait);
        }
        let spec = self.catalog.checksums();
        let state = self.catalog.storage().checkpoint(store, spec).await?;
        if let Some(unpublished) = state.highest_unpublished
            && held.get(store).is_none_or(|&up_to| unpublished > up_to)
        {
            return Ok(Ready::Wait);
        }
        let Some(checksums) = state.checksums else {
            return Ok(Ready::Stale);
        };
        Ok(Ready::Checkpoint(Checkpoint {
            seq: state.head,
            specs: kind_fingerprints(spec, &checksums),
            checksums,
        }))
    }

    /// Publishes checkpoints, confirmed.
    async fn publish_checkpoints(
        &self,
        ready: &[(String, Checkpoint)],
        publisher: &mut Option<Publisher>,
    ) -> Result<(), RoundError> {
        let envelopes = self.checkpoint_envelopes(ready).await?;
        self.connected(publisher)
            .await?
            .publish_envelopes(envelopes)
            .await?;
        Ok(())
    }

    /// The envelopes of checkpoints.
    async fn checkpoint_envelopes(
        &self,
        ready: &[(String, Checkpoint)],
    ) -> Result<Vec<Envelope>, RoundError> {
        let catalog = self.catalog_id().await?;
        let timestamp = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .map_err(|err| RoundError::Checkpoint(format!("cannot format the time: {err}")))?;
        ready
            .iter()
            .map(|(store, checkpoint)| envelope(store, checkpoint, &timestamp, &catalog))
            .collect()
    }
}

/// Each kind's fingerprint, for terminals to compare only kinds they
/// digest alike.
fn kind_fingerprints(
    spec: &ChecksumSpec,
    checksums: &std::collections::BTreeMap<String, possync_core::Checksum>,
) -> std::collections::BTreeMap<String, String> {
    checksums
        .keys()
        .filter_map(|kind| Some((kind.clone(), spec.kind_fingerprint(kind)?)))
        .collect()
}

/// Where a checkpoint goes among a round's rows.
enum Position {
    Before(usize),
    After(usize),
}

/// A checkpoint that went out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Published {
    pub(super) store: String,
    pub(super) seq: i64,
    pub(super) kinds: usize,
}

/// One message of a round: a row's change (`row`: its index) or a
/// checkpoint.
#[derive(Debug)]
pub(super) struct Item {
    row: Option<usize>,
    envelope: Envelope,
    checkpoint: Option<Published>,
}

/// A round's checkpoints, by the row they go before or after.
#[derive(Debug, Default)]
pub(super) struct Placed {
    before: HashMap<usize, Vec<Item>>,
    after: HashMap<usize, Vec<Item>>,
}

impl Placed {
    /// The round's messages in the order they go out: each row's
    /// envelope, with the checkpoints placed around it.
    pub(super) fn interleave(mut self, envelopes: Vec<Envelope>) -> Vec<Item> {
        let mut items = Vec::with_capacity(envelopes.len());
        for (index, envelope) in envelopes.into_iter().enumerate() {
            items.extend(self.before.remove(&index).unwrap_or_default());
            items.push(Item {
                row: Some(index),
                envelope,
                checkpoint: None,
            });
            items.extend(self.after.remove(&index).unwrap_or_default());
        }
        items
    }
}

/// Messages published and confirmed together.
#[derive(Debug, Default)]
pub(super) struct Chunk {
    /// The indices of the rows among them.
    pub(super) rows: Vec<usize>,
    pub(super) envelopes: Vec<Envelope>,
    pub(super) checkpoints: Vec<Published>,
}

/// `items` in chunks of at most `rows` rows each (and the checkpoints
/// among them).
pub(super) fn chunks(items: Vec<Item>, rows: usize) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut chunk = Chunk::default();
    for item in items {
        if let Some(row) = item.row {
            if chunk.rows.len() == rows {
                chunks.push(std::mem::take(&mut chunk));
            }
            chunk.rows.push(row);
        }
        chunk.envelopes.push(item.envelope);
        chunk.checkpoints.extend(item.checkpoint);
    }
    if !chunk.envelopes.is_empty() {
        chunks.push(chunk);
    }
    chunks
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

    fn change(seq: i64) -> Envelope {
        Envelope::new("price_update", "S", serde_json::json!({"product_id": "P"})).with_seq(seq)
    }

    fn checkpoint_item(seq: i64) -> Item {
        Item {
            row: None,
            envelope: Envelope::new(CHECKPOINT_TYPE, "S", serde_json::json!({})),
            checkpoint: Some(Published {
                store: "S".into(),
                seq,
                kinds: 1,
            }),
        }
    }

    #[test]
    fn a_checkpoint_goes_out_right_after_the_change_it_states_the_catalog_at() {
        let mut placed = Placed::default();
        placed.after.insert(1, vec![checkpoint_item(2)]);
        placed.before.insert(0, vec![checkpoint_item(0)]);
        let items = placed.interleave((1..=4).map(change).collect());
        let order: Vec<String> = items
            .iter()
            .map(|item| match (&item.row, &item.checkpoint) {
                (Some(row), _) => format!("row {row}"),
                (None, Some(checkpoint)) => format!("checkpoint at {}", checkpoint.seq),
                (None, None) => "nothing".into(),
            })
            .collect();
        assert_eq!(
            order,
            [
                "checkpoint at 0",
                "row 0",
                "row 1",
                "checkpoint at 2",
                "row 2",
                "row 3"
            ]
        );
        let chunks = chunks(items, 2);
        assert_eq!(
            chunks.iter().map(|c| c.rows.clone()).collect::<Vec<_>>(),
            [vec![0, 1], vec![2, 3]],
            "chunks count rows"
        );
        assert_eq!(
            chunks[0].envelopes.len(),
            4,
            "with the checkpoints among them"
        );
        assert_eq!(
            chunks[0]
                .checkpoints
                .iter()
                .map(|c| c.seq)
                .collect::<Vec<_>>(),
            [0, 2]
        );
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
    fn stores_that_all_came_due_in_a_stall_are_spread_again_over_the_next_interval() {
        let now = Instant::now();
        let every = Duration::from_secs(300);
        let mut schedule = Schedule::start(&config(0, 300), &spec(), now).expect("on");
        let stores: Vec<String> = (0..50).map(|i| format!("S{i:02}")).collect();
        schedule.found(stores.clone(), now);
        // The relay stalls for three intervals; then every store goes at once.
        let back = now + every * 3;
        assert_eq!(schedule.due(back).len(), 50);
        for store in &stores {
            schedule.done(store, back);
        }
        let halfway = schedule.due(back + every / 2).len();
        assert!(
            (5..45).contains(&halfway),
            "{halfway} of 50 due halfway through the next interval"
        );
        assert_eq!(schedule.due(back + every).len(), 50);
    }

    #[test]
    fn stale_checksums_are_computed_again_at_most_every_ten_minutes() {
        let now = Instant::now();
        let mut schedule = Schedule::start(&config(1, 0), &spec(), now).expect("on");
        assert!(schedule.may_recompute(now));
        assert!(!schedule.may_recompute(now + Duration::from_secs(30)));
        assert!(schedule.may_recompute(now + RECOMPUTE_EVERY));
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
            specs: BTreeMap::from([("product".to_owned(), "f00d".to_owned())]),
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
