//! `/events`: the change feed as Server-Sent Events.
//!
//! Each change is an event whose `id` is the change's number and whose
//! data is `{"seq", "type", "entity", "id", "op"}`. A client that comes
//! back sends the last id it saw (`Last-Event-ID`, which `EventSource`
//! sends by itself, or `?after=`) and gets every change after it, then the
//! changes as they commit. Without one it starts from now, with a `ready`
//! event that carries the current id. When what it asks for is no longer
//! kept (or was never this database's), it gets a `reload` event: read the
//! tables again, then follow from the id that event carries.
//! `?status=1` adds a `status` event (the `/status` document) whenever the
//! terminal's state or counters change, at most twice a second.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};

use super::accept::Connection;
use super::routes::Endpoint;
use super::snapshot::Snapshot;
use crate::events as telemetry;
use crate::feed::{self, Backlog, Change};

/// The query `/events` takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    /// The last change id the client saw, when it cannot send
    /// `Last-Event-ID` (the header wins).
    after: Option<i64>,
    /// `1` (or `true`) to get `status` events too.
    status: Option<String>,
}

/// How often an idle stream sends a comment, so that proxies and clients
/// keep it open and a client that went away is noticed.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The least time between two `status` events.
const STATUS_EVERY: Duration = Duration::from_millis(500);

/// Events a slow client may have waiting before the stream pauses reading.
const CLIENT_BUFFER: usize = 1024;

/// How long one stream lasts; then it ends, and the client comes back with
/// its last id (`EventSource` by itself). A client gone without a word (a
/// tablet that lost its network) holds its place no longer than this.
const STREAM_LIFETIME: Duration = Duration::from_secs(300);

pub(super) async fn stream(
    State(endpoint): State<Arc<Endpoint>>,
    connection: Option<axum::Extension<Connection>>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "{}: /events takes after=<the last change id seen> and status=1\n",
                    rejection.body_text()
                ),
            )
                .into_response();
        }
    };
    let header = headers.get("last-event-id").map(|value| {
        value
            .to_str()
            .ok()
            .map(str::trim)
            .and_then(|id| id.parse::<i64>().ok())
    });
    let after = match header {
        Some(Some(id)) => Some(id),
        // An id this feed never sent: the client must start over.
        Some(None) => Some(-1),
        None => query.after,
    };
    if !endpoint.view.feed_on {
        return (
            StatusCode::NOT_FOUND,
            "the change feed is off on this terminal (terminal.feed_keep = 0)\n",
        )
            .into_response();
    }
    let Ok(permit) = Arc::clone(&endpoint.streams).try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many change feed subscribers at once ({}): try again later\n",
                endpoint.streams_limit
            ),
        )
            .into_response();
    };
    if let Some(axum::Extension(connection)) = connection {
        connection.become_stream();
    }
    let with_status = matches!(query.status.as_deref(), Some("1" | "true"));
    let (sender, receiver) = mpsc::channel(CLIENT_BUFFER);
    let follower = Follower {
        endpoint: Arc::clone(&endpoint),
        live: endpoint.view.feed.subscribe(),
        sender,
        _permit: permit,
    };
    tokio::spawn(follower.run(after, with_status));
    Sse::new(events_of(receiver)).into_response()
}

fn events_of(
    mut receiver: mpsc::Receiver<Event>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx).map(|event| event.map(Ok)))
}

/// Feeds one client: its backlog from the table, then what commits.
struct Follower {
    endpoint: Arc<Endpoint>,
    live: broadcast::Receiver<Arc<feed::FeedBatch>>,
    sender: mpsc::Sender<Event>,
    /// One of the streams the endpoint serves at once.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// The client went away.
struct Gone;

impl Follower {
    async fn run(mut self, after: Option<i64>, with_status: bool) {
        // Subscribed before the table is read: a batch committed meanwhile
        // comes both ways, and is sent once.
        let _ = self.follow(after, with_status).await;
    }

    async fn follow(&mut self, after: Option<i64>, with_status: bool) -> Result<(), Gone> {
        let mut seen = match after {
            None => {
                let last = self.read(feed::last_id).await?;
                self.send(
                    Event::default()
                        .event("ready")
                        .id(last.to_string())
                        .data(format!("{{\"last\":{last}}}")),
                )
                .await?;
                last
            }
            Some(after) => self.catch_up(after).await?,
        };
        let mut status = self.endpoint.view.status.clone();
        // One status at once, then at most one each STATUS_EVERY.
        let mut status_pending = with_status;
        let mut status_at = tokio::time::Instant::now();
        let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
        keep_alive.reset();
        let ends = tokio::time::sleep(STREAM_LIFETIME);
        tokio::pin!(ends);
        loop {
            tokio::select! {
                () = &mut ends => return Ok(()),
                batch = self.live.recv() => match batch {
                    // Batches between (another process committed them) are
                    // in the table, with this one.
                    Ok(batch) if batch.follows > seen => seen = self.catch_up(seen).await?,
                    Ok(batch) => match batch.events() {
                        Some(events) => {
                            for (id, json) in events {
                                if *id > seen {
                                    let event = Event::default().id(id.to_string()).data(json);
                                    self.send(event).await?;
                                    seen = *id;
                                }
                            }
                        }
                        // Read as the table holds it: a fault there is told.
                        None => seen = self.catch_up(seen).await?,
                    },
                    // Too slow for the live channel: the table has the rest.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        seen = self.catch_up(seen).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                changed = status.changed(), if with_status && !status_pending => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    status_pending = true;
                }
                () = tokio::time::sleep_until(status_at), if status_pending => {
                    let document = self.status_document().await?;
                    self.send(Event::default().event("status").data(document)).await?;
                    status_pending = false;
                    status_at = tokio::time::Instant::now() + STATUS_EVERY;
                }
                _ = keep_alive.tick() => {
                    self.send(Event::default().comment("")).await?;
                }
                () = self.sender.closed() => return Err(Gone),
            }
        }
    }

    /// Sends what the table holds after `after`, or a `reload`; returns the
    /// id the client stands at now.
    async fn catch_up(&mut self, after: i64) -> Result<i64, Gone> {
        match self
            .read(move |connection| feed::backlog(connection, after))
            .await?
        {
            Backlog::Changes(changes) => {
                let mut seen = after;
                for (id, change) in &changes {
                    self.send(change_event(*id, change)).await?;
                    seen = *id;
                }
                Ok(seen)
            }
            Backlog::Reload { last } => {
                telemetry::feed_reload(after, last);
                self.send(
                    Event::default()
                        .event("reload")
                        .id(last.to_string())
                        .data(format!(
                            "{{\"last\":{last},\"reason\":\"change {after} is not kept: read the tables again, then follow from change {last}\"}}"
                        )),
                )
                .await?;
                Ok(last)
            }
        }
    }

    /// Reads the terminal's database on a blocking thread.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, Gone> {
        let path: PathBuf = self.endpoint.view.database.clone();
        let result = tokio::task::spawn_blocking(move || {
            let database = crate::store::Database::open_read_only(&path)?;
            read(database.connection()).map_err(crate::store::DatabaseError::from)
        })
        .await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                telemetry::feed_unreadable(&err.to_string());
                let reason = serde_json::json!({
                    "reason": format!("the terminal's database cannot be read: {err}"),
                });
                let _ = self
                    .sender
                    .send(Event::default().event("error").data(reason.to_string()))
                    .await;
                Err(Gone)
            }
            Err(_) => Err(Gone),
        }
    }

    async fn status_document(&self) -> Result<String, Gone> {
        let endpoint = Arc::clone(&self.endpoint);
        let snapshot = tokio::task::spawn_blocking(move || {
            let snapshot = Snapshot::take(&endpoint.view);
            super::json::render(&endpoint.view, &snapshot)
        })
        .await;
        snapshot.map_err(|_| Gone)
    }

    async fn send(&self, event: Event) -> Result<(), Gone> {
        self.sender.send(event).await.map_err(|_| Gone)
    }
}

fn change_event(id: i64, change: &Change) -> Event {
    // A change always encodes: it holds only strings, numbers and nulls.
    let data = serde_json::to_string(change).unwrap_or_default();
    Event::default().id(id.to_string()).data(data)
}
