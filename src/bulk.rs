//! `possync publish bulk`: a whole catalog from a file to many stores, with
//! progress, confirms, and a report of the lines that could not be sent.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use possync_core::{LicenseKey, PublishError, Publisher, Registry};
use possync_sdk::Envelope;

use crate::backend_client::{BackendClient, MAX_BATCH, Outgoing};
use crate::fields::{self, Field};

/// Messages confirmed between two progress updates.
const CHUNK: usize = 500;

/// The most bytes of changes one request to the backend carries: three
/// quarters of the API's body limit, leaving room for the request's framing.
const BATCH_BYTES: usize = possync_backend::api::MAX_BODY_BYTES / 4 * 3;

/// A change read from the file: its line number, type and payload.
pub(crate) type Change = (usize, String, serde_json::Value);

/// One line that could not become a message.
#[derive(Debug)]
pub(crate) struct BadLine {
    pub(crate) line: usize,
    pub(crate) reason: String,
}

/// The changes in `file`: JSON lines (`{"type": ..., "payload": {...}}`) or
/// CSV with a `type` column and one column per payload field. Each is
/// checked by the plugin that handles its type, as a terminal would.
pub(crate) fn read_changes(
    registry: &Registry,
    file: &Path,
) -> anyhow::Result<(Vec<Change>, Vec<BadLine>)> {
    let extension = file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    match extension.as_deref() {
        Some("jsonl" | "ndjson" | "json") => Ok(read_json_lines(&mut Types::new(registry), &text)),
        Some("csv") => read_csv(&mut Types::new(registry), &text),
        _ => anyhow::bail!("{}: name a .jsonl or .csv file", file.display()),
    }
}

/// The fields of each message type met so far, from the registry.
struct Types<'r> {
    registry: &'r Registry,
    fields: std::collections::HashMap<String, Vec<Field>>,
}

impl<'r> Types<'r> {
    fn new(registry: &'r Registry) -> Self {
        Self {
            registry,
            fields: std::collections::HashMap::new(),
        }
    }

    /// The fields of `message_type`, or why no plugin here can check it.
    fn fields(&mut self, message_type: &str) -> Result<&[Field], String> {
        if !self.fields.contains_key(message_type) {
            let schema = self.registry.schema(message_type).ok_or_else(|| {
                format!(
                    "no plugin here handles message type {message_type:?}; name its plugin library in [plugins]"
                )
            })?;
            self.fields
                .insert(message_type.to_owned(), fields::of_schema(&schema));
        }
        Ok(self
            .fields
            .get(message_type)
            .map(Vec::as_slice)
            .unwrap_or_default())
    }

    /// Checks `payload` as the plugin of `message_type` would on a terminal.
    fn check(
        &mut self,
        message_type: &str,
        payload: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), String> {
        fields::check_bounds(self.fields(message_type)?, payload)?;
        let text = serde_json::to_string(payload).map_err(|err| err.to_string())?;
        self.registry
            .check(message_type, &text)
            .map_err(|err| err.to_string())
    }
}

fn read_json_lines(types: &mut Types<'_>, text: &str) -> (Vec<Change>, Vec<BadLine>) {
    let (mut changes, mut bad) = (Vec::new(), Vec::new());
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        let change = parsed
            .map_err(|err| format!("not JSON: {err}"))
            .and_then(|value| {
                let message_type = value["type"].as_str().ok_or("no \"type\"")?.to_owned();
                let payload = value.get("payload").ok_or("no \"payload\"")?;
                let Some(object) = payload.as_object() else {
                    return Err("\"payload\" is not an object".to_owned());
                };
                types.check(&message_type, object)?;
                Ok((message_type, payload.clone()))
            });
        match change {
            Ok((message_type, payload)) => changes.push((number, message_type, payload)),
            Err(reason) => bad.push(BadLine {
                line: number,
                reason,
            }),
        }
    }
    (changes, bad)
}

fn read_csv(types: &mut Types<'_>, text: &str) -> anyhow::Result<(Vec<Change>, Vec<BadLine>)> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .context("the CSV file has no header row")?
        .clone();
    let type_column = headers
        .iter()
        .position(|h| h == "type")
        .context("the CSV header has no \"type\" column")?;
    let (mut changes, mut bad) = (Vec::new(), Vec::new());
    for (index, record) in reader.records().enumerate() {
        let number = index + 2;
        let record = match record {
            Ok(record) => record,
            Err(err) => {
                bad.push(BadLine {
                    line: number,
                    reason: format!("not CSV: {err}"),
                });
                continue;
            }
        };
        let message_type = record
            .get(type_column)
            .unwrap_or_default()
            .trim()
            .to_owned();
        if message_type.is_empty() {
            bad.push(BadLine {
                line: number,
                reason: "the type column is empty".into(),
            });
            continue;
        }
        match csv_payload(types, &message_type, &headers, &record) {
            Ok(payload) => changes.push((number, message_type, serde_json::Value::Object(payload))),
            Err(reason) => bad.push(BadLine {
                line: number,
                reason,
            }),
        }
    }
    Ok((changes, bad))
}

/// The payload of one CSV record: each non-empty cell typed by its
/// field's schema (a column the type does not have stays text, for its
/// plugin to refuse), then checked.
fn csv_payload(
    types: &mut Types<'_>,
    message_type: &str,
    headers: &csv::StringRecord,
    record: &csv::StringRecord,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let fields = types.fields(message_type)?;
    let mut payload = serde_json::Map::new();
    for (header, cell) in headers.iter().zip(record.iter()) {
        if header == "type" || cell.is_empty() {
            continue;
        }
        let value = match fields.iter().find(|f| f.name == header) {
            Some(field) => field
                .parse(cell)
                .map_err(|reason| format!("{header} {reason}"))?,
            None => serde_json::Value::String(cell.to_owned()),
        };
        payload.insert(header.to_owned(), value);
    }
    types.check(message_type, &payload)?;
    Ok(payload)
}

/// Progress on a terminal as a bar, elsewhere as a plain line now and then.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
    last_line: Instant,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} confirmed ({per_sec}, {eta} left)",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Self {
            bar,
            total,
            done: 0,
            last_line: Instant::now(),
        }
    }

    fn advance(&mut self, count: u64) {
        self.done += count;
        match &self.bar {
            Some(bar) => bar.inc(count),
            None if self.last_line.elapsed() >= Duration::from_secs(2)
                || self.done == self.total =>
            {
                eprintln!("progress: {}/{} confirmed", self.done, self.total);
                self.last_line = Instant::now();
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// What `possync publish bulk` did through the backend.
#[derive(Debug, Default)]
pub(crate) struct Submitted {
    /// Changes given a sequence number.
    pub(crate) sequenced: usize,
    /// Changes older than what the catalog held: nothing changed.
    pub(crate) stale: usize,
    /// Each store's last sequence number given to these changes.
    pub(crate) heads: Vec<(LicenseKey, i64)>,
    /// The stores that failed, and why; their earlier batches stay applied.
    pub(crate) failed: Vec<(LicenseKey, anyhow::Error)>,
}

/// Submits every good change for every store through the backend, in
/// batches of at most [`CHUNK`] changes and [`BATCH_BYTES`] bytes (one
/// transaction each) with an idempotency key per batch, so that the client's
/// retries never apply a batch twice.
pub(crate) fn submit(
    client: &BackendClient,
    changes: &[Change],
    stores: &[LicenseKey],
) -> Submitted {
    let mut progress = Progress::new((changes.len() * stores.len()) as u64);
    let run = uuid::Uuid::now_v7();
    let mut submitted = Submitted::default();
    let payloads: Result<Vec<_>, _> = changes
        .iter()
        .map(|(_, _, payload)| serde_json::value::to_raw_value(payload))
        .collect();
    let payloads = match payloads {
        Ok(payloads) => payloads,
        Err(err) => {
            let err = anyhow::Error::from(err);
            for store in stores {
                submitted
                    .failed
                    .push((store.clone(), anyhow::anyhow!("{err:#}")));
            }
            return submitted;
        }
    };
    for store in stores {
        let outgoing: Vec<Outgoing> = changes
            .iter()
            .zip(&payloads)
            .map(|((_, message_type, _), payload)| Outgoing {
                store: store.as_str().to_owned(),
                message_type: message_type.clone(),
                payload: payload.clone(),
            })
            .collect();
        let sizes = outgoing.iter().map(encoded_size);
        let mut head = None;
        for (index, range) in batches(sizes, CHUNK.min(MAX_BATCH), BATCH_BYTES)
            .into_iter()
            .enumerate()
        {
            let key = format!("bulk-{run}-{store}-{index}");
            match client.submit(&outgoing[range], &key) {
                Ok(answered) => {
                    for change in &answered {
                        match change.seq {
                            Some(seq) => {
                                submitted.sequenced += 1;
                                head = Some(seq);
                            }
                            None => submitted.stale += 1,
                        }
                    }
                    progress.advance(answered.len() as u64);
                }
                Err(err) => {
                    submitted.failed.push((store.clone(), err));
                    break;
                }
            }
        }
        if let Some(head) = head {
            submitted.heads.push((store.clone(), head));
        }
    }
    progress.finish();
    submitted
}

/// A change's size in a request's body, with the comma after it.
fn encoded_size(change: &Outgoing) -> usize {
    // Serializing strings and JSON text already checked does not fail.
    serde_json::to_vec(change).map_or(0, |body| body.len()) + 1
}

/// Consecutive batches of the changes of `sizes`, each of at most `count`
/// changes and `bytes` bytes; a change larger than `bytes` goes alone (and
/// the backend says what to do about it).
fn batches(
    sizes: impl Iterator<Item = usize>,
    count: usize,
    bytes: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut batches = Vec::new();
    let (mut start, mut end, mut filled) = (0, 0, 0);
    for size in sizes {
        if end > start && (end - start == count || filled + size > bytes) {
            batches.push(start..end);
            (start, filled) = (end, 0);
        }
        filled += size;
        end += 1;
    }
    if end > start {
        batches.push(start..end);
    }
    batches
}

/// Publishes every good change to every store; returns how many were
/// confirmed and the stores that failed.
pub(crate) async fn publish(
    publisher: &Publisher,
    changes: &[Change],
    stores: &[LicenseKey],
) -> (usize, Vec<(LicenseKey, PublishError)>) {
    let mut progress = Progress::new((changes.len() * stores.len()) as u64);
    let (mut confirmed, mut failed) = (0, Vec::new());
    for store in stores {
        for chunk in changes.chunks(CHUNK) {
            let envelopes = chunk.iter().map(|(_, message_type, payload)| {
                Envelope::new(message_type.clone(), store.as_str(), payload.clone())
            });
            match publisher.publish_envelopes(envelopes).await {
                Ok(published) => {
                    confirmed += published.len();
                    progress.advance(published.len() as u64);
                }
                Err(err) => {
                    failed.push((store.clone(), err));
                    break;
                }
            }
        }
    }
    progress.finish();
    (confirmed, failed)
}

#[cfg(test)]
mod tests {
    use super::batches;

    #[test]
    fn batches_end_at_the_count_or_the_bytes_whichever_comes_first() {
        assert_eq!(batches([10; 5].into_iter(), 2, 100), [0..2, 2..4, 4..5]);
        assert_eq!(batches([40, 40, 40, 10].into_iter(), 10, 100), [0..2, 2..4]);
        assert_eq!(
            batches([150, 10, 150].into_iter(), 10, 100),
            [0..1, 1..2, 2..3],
            "a change larger than the bytes goes alone"
        );
        assert!(batches(std::iter::empty(), 10, 100).is_empty());
    }
}
