//! A client of `possync backend`'s HTTP API, for `possync publish` when
//! the config has a `[backend]`: changes go to the catalog of record, which
//! sequences them and relays them to the broker.

use std::time::Duration;

use anyhow::Context as _;
use possync_core::{BackendLink, redact_url};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Attempts of one request when the backend cannot be reached or answers
/// that it is unavailable; each retry carries the same idempotency key, so
/// a request that was applied before its answer was lost is not applied
/// again.
const ATTEMPTS: u32 = 5;

/// The wait before the first retry; it doubles each time.
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// The most changes the API takes in one request.
pub(crate) const MAX_BATCH: usize = 1000;

/// One change to submit.
#[derive(Debug, Serialize)]
pub(crate) struct Outgoing {
    /// The store's license key.
    pub(crate) store: String,
    /// The message type.
    #[serde(rename = "type")]
    pub(crate) message_type: String,
    /// The payload, a JSON object.
    pub(crate) payload: Box<RawValue>,
}

#[derive(Debug, Serialize)]
struct Batch<'a> {
    changes: &'a [Outgoing],
}

/// What the backend made of one change.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Answered {
    /// The store.
    pub(crate) store: String,
    /// The change's message id.
    pub(crate) message_id: String,
    /// Its sequence number in the store; `None` when it was stale.
    pub(crate) seq: Option<i64>,
}

impl std::fmt::Display for Answered {
    /// `store S1 seq 12 (message id ...)`, or that it was stale.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(seq) => write!(
                f,
                "store {} seq {seq} (message id {})",
                self.store, self.message_id
            ),
            None => write!(
                f,
                "store {}: stale, the catalog holds a newer change of this entity (message id {})",
                self.store, self.message_id
            ),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Submission {
    changes: Vec<Answered>,
}

#[derive(Debug, Deserialize)]
struct Refusal {
    error: String,
}

/// The backend's API, as `[backend]` names it.
#[derive(Debug)]
pub(crate) struct BackendClient {
    agent: ureq::Agent,
    base: String,
    /// The URL as messages show it (no userinfo).
    shown: String,
    /// `Bearer <token>`: never printed.
    authorization: String,
}

impl BackendClient {
    /// A client for `link`.
    pub(crate) fn new(link: &BackendLink) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        let base = link.url.trim_end_matches('/').to_owned();
        Self {
            agent,
            shown: redact_url(&base),
            base,
            authorization: format!("Bearer {}", link.token.trim()),
        }
    }

    /// The backend's URL, fit to print.
    pub(crate) fn url(&self) -> &str {
        &self.shown
    }

    /// Submits `changes` in one request (one transaction on the backend):
    /// each answered with its store's sequence number once it is durable.
    /// `key` makes the request idempotent, so the retries here, and a retry
    /// by the caller with the same key, apply it once.
    pub(crate) fn submit(&self, changes: &[Outgoing], key: &str) -> anyhow::Result<Vec<Answered>> {
        let body = serde_json::to_vec(&Batch { changes })?;
        let url = format!("{}/v1/changes", self.base);
        let mut wait = FIRST_RETRY;
        let mut attempt = 1;
        loop {
            let sent = self
                .agent
                .post(&url)
                .header("Authorization", &self.authorization)
                .header("Idempotency-Key", key)
                .header("Content-Type", "application/json")
                .send(&body[..]);
            let retry_reason = match sent {
                Ok(mut response) => {
                    let status = response.status().as_u16();
                    let text = response.body_mut().read_to_string().with_context(|| {
                        format!("the backend at {} answered unreadably", self.shown)
                    })?;
                    match status {
                        200 => {
                            let answer: Submission =
                                serde_json::from_str(&text).with_context(|| {
                                    format!(
                                        "the backend at {} answered in an unknown shape",
                                        self.shown
                                    )
                                })?;
                            return Ok(answer.changes);
                        }
                        429 | 502 | 503 | 504 => format!("it answered {status}: {}", reason(&text)),
                        _ => anyhow::bail!(
                            "the backend at {} refused the changes ({status}): {}",
                            self.shown,
                            reason(&text)
                        ),
                    }
                }
                Err(err) => format!("it cannot be reached: {err}"),
            };
            if attempt == ATTEMPTS {
                anyhow::bail!(
                    "the backend at {} confirmed none of these changes after {ATTEMPTS} attempts: {retry_reason}. If an answer was lost it may hold some: a store's head (GET /v1/stores) shows what it has before they are sent again",
                    self.shown
                );
            }
            eprintln!(
                "the backend at {}: {retry_reason}; retrying in {:.1} s with the same idempotency key",
                self.shown,
                wait.as_secs_f64()
            );
            std::thread::sleep(wait);
            wait *= 2;
            attempt += 1;
        }
    }
}

/// One terminal, as `applied` lists it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct AppliedTerminal {
    /// Its id.
    pub(crate) terminal: String,
    /// `live`, `offline` or `stalled`.
    pub(crate) state: String,
    /// Every change up to this seq is applied there.
    pub(crate) applied_up_to: i64,
    /// Offline since (ms since the epoch).
    pub(crate) offline_since_ms: Option<i64>,
}

/// Whether a store's terminals applied a seq.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Applied {
    /// Every known terminal applied it.
    pub(crate) complete: bool,
    /// The store's known terminals.
    pub(crate) terminals: Vec<AppliedTerminal>,
    /// Those that have not applied it.
    pub(crate) pending: Vec<String>,
}

/// The longest wait one request asks the backend for, under this client's
/// 30 s limit per request; longer waits ask again.
const WAIT_PER_REQUEST: Duration = Duration::from_secs(25);

impl BackendClient {
    /// Waits until every known terminal of `store` applied `seq`, or
    /// `timeout` passes; the last answer either way.
    pub(crate) fn wait_applied(
        &self,
        store: &str,
        seq: i64,
        timeout: Duration,
    ) -> anyhow::Result<Applied> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let wait = left.min(WAIT_PER_REQUEST).as_secs();
            let url = format!(
                "{}/v1/stores/{store}/applied?seq={seq}&wait={wait}",
                self.base
            );
            let mut response = self
                .agent
                .get(&url)
                .header("Authorization", &self.authorization)
                .call()
                .with_context(|| format!("the backend at {} cannot be reached", self.shown))?;
            let status = response.status().as_u16();
            let text = response
                .body_mut()
                .read_to_string()
                .with_context(|| format!("the backend at {} answered unreadably", self.shown))?;
            if status != 200 {
                anyhow::bail!(
                    "the backend at {} would not say whether store {store}'s terminals applied seq {seq} ({status}): {}",
                    self.shown,
                    reason(&text)
                );
            }
            let applied: Applied = serde_json::from_str(&text).with_context(|| {
                format!("the backend at {} answered in an unknown shape", self.shown)
            })?;
            if applied.complete || std::time::Instant::now() >= deadline {
                return Ok(applied);
            }
            if wait == 0 {
                // Under a second left: the backend answered at once.
                std::thread::sleep(left.min(Duration::from_millis(200)));
            }
        }
    }
}

/// The backend's `{"error": ...}`, or the text it sent.
fn reason(text: &str) -> String {
    serde_json::from_str::<Refusal>(text)
        .map(|refusal| refusal.error)
        .unwrap_or_else(|_| text.chars().take(500).collect())
}
