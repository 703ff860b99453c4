//! `possync publish bulk`: a whole catalog from a file to many stores, with
//! progress, confirms, and a report of the lines that could not be sent.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use possync_core::{LicenseKey, PublishError, Publisher};
use possync_sdk::Envelope;

use crate::publish::check_price;

/// Payload fields that are numbers on the wire; every other CSV cell is text
/// (so that ids like `007` keep their zeros).
const NUMERIC_FIELDS: &[&str] = &[
    "price",
    "new_price",
    "price_delta",
    "min_select",
    "max_select",
];
/// Payload fields that are prices: finite and 0 or more (see [`check_price`]).
const PRICE_FIELDS: &[&str] = &["price", "new_price"];
/// Messages confirmed between two progress updates.
const CHUNK: usize = 500;

/// A change read from the file: its line number, type and payload.
pub(crate) type Change = (usize, String, serde_json::Value);

/// One line that could not become a message.
#[derive(Debug)]
pub(crate) struct BadLine {
    pub(crate) line: usize,
    pub(crate) reason: String,
}

/// The changes in `file`: JSON lines (`{"type": ..., "payload": {...}}`) or
/// CSV with a `type` column and one column per payload field.
pub(crate) fn read_changes(file: &Path) -> anyhow::Result<(Vec<Change>, Vec<BadLine>)> {
    let extension = file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    match extension.as_deref() {
        Some("jsonl" | "ndjson" | "json") => Ok(read_json_lines(&text)),
        Some("csv") => read_csv(&text),
        _ => anyhow::bail!("{}: name a .jsonl or .csv file", file.display()),
    }
}

fn read_json_lines(text: &str) -> (Vec<Change>, Vec<BadLine>) {
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
                let payload = value.get("payload").cloned().ok_or("no \"payload\"")?;
                if !payload.is_object() {
                    return Err("\"payload\" is not an object".to_owned());
                }
                check_prices(&payload)?;
                Ok((message_type, payload))
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

/// Refuses a payload whose price fields are not prices.
fn check_prices(payload: &serde_json::Value) -> Result<(), String> {
    for field in PRICE_FIELDS {
        if let Some(value) = payload.get(field).and_then(serde_json::Value::as_f64) {
            check_price(value).map_err(|rule| format!("{field} {value}: {rule}"))?;
        }
    }
    Ok(())
}

fn read_csv(text: &str) -> anyhow::Result<(Vec<Change>, Vec<BadLine>)> {
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
        let mut payload = serde_json::Map::new();
        let mut problem = None;
        for (header, cell) in headers.iter().zip(record.iter()) {
            if header == "type" || cell.is_empty() {
                continue;
            }
            let value = if NUMERIC_FIELDS.contains(&header) {
                let parsed = match cell.trim().parse::<f64>() {
                    Ok(number) if PRICE_FIELDS.contains(&header) => {
                        check_price(number).map_err(|rule| format!("{header} {cell:?}: {rule}"))
                    }
                    Ok(number) => Ok(number),
                    Err(_) => Err(format!("{header} {cell:?} is not a number")),
                };
                match parsed.and_then(|number| {
                    serde_json::Number::from_f64(number)
                        .ok_or_else(|| format!("{header} {cell:?} is not a finite number"))
                }) {
                    Ok(number) => serde_json::Value::Number(number),
                    Err(reason) => {
                        problem = Some(reason);
                        break;
                    }
                }
            } else {
                serde_json::Value::String(cell.to_owned())
            };
            payload.insert(header.to_owned(), value);
        }
        match problem {
            Some(reason) => bad.push(BadLine {
                line: number,
                reason,
            }),
            None => changes.push((number, message_type, serde_json::Value::Object(payload))),
        }
    }
    Ok((changes, bad))
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
