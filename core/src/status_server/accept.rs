//! The accept loop: a bounded number of connections, each with a deadline
//! for its request's headers and one for the whole exchange. A change
//! feed stream (`/events`) is long-lived by design: it gives its slot back
//! and outlives the deadline, counted against `Limits::streams` instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::events;

/// How much the status endpoint lets its clients take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub(crate) connections: usize,
    /// Time a client has to send its request's headers.
    pub(crate) header_read: Duration,
    /// Time one connection may take, request and response (a change feed
    /// stream excepted).
    pub(crate) connection: Duration,
    /// Change feed streams served at once; one more is refused with 503.
    pub(crate) streams: usize,
    /// Pause after a failed accept (out of file descriptors, say), so the
    /// loop does not spin while the cause lasts.
    pub(crate) accept_backoff: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 64,
            header_read: Duration::from_secs(5),
            // Long enough for a page read from a database that is busy for
            // its 5-second busy timeout.
            connection: Duration::from_secs(30),
            streams: 32,
            accept_backoff: Duration::from_millis(500),
        }
    }
}

/// Where connections come from: a TCP listener, or in tests one that fails.
pub(super) trait Incoming: Send {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn accept(&mut self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Incoming for TcpListener {
    type Io = tokio::net::TcpStream;

    async fn accept(&mut self) -> std::io::Result<Self::Io> {
        TcpListener::accept(self).await.map(|(stream, _)| stream)
    }
}

/// Accepts and serves connections for ever. Its connections end with it
/// (a change feed stream included).
pub(super) async fn serve(mut incoming: impl Incoming, router: Router, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    let mut connections = tokio::task::JoinSet::new();
    let mut failing = false;
    loop {
        while connections.try_join_next().is_some() {}
        // A free slot before the accept: connections beyond the bound wait in
        // the kernel's backlog and cost this process nothing.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return; // The semaphore is never closed.
        };
        match incoming.accept().await {
            Ok(io) => {
                failing = false;
                connections.spawn(serve_connection(io, router.clone(), limits, slot));
            }
            Err(err) => {
                events::status_accept_failed(
                    &err.to_string(),
                    limits.accept_backoff.as_millis(),
                    !failing,
                );
                failing = true;
                drop(slot);
                tokio::time::sleep(limits.accept_backoff).await;
            }
        }
    }
}

/// What a request knows of its connection (an extension of every request):
/// a change feed stream turns it into a stream.
#[derive(Debug, Clone)]
pub(super) struct Connection {
    slot: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    streaming: Arc<AtomicBool>,
}

impl Connection {
    /// The connection serves a stream from now on: its slot is free for
    /// other requests, and the deadline no longer ends it.
    pub(super) fn become_stream(&self) {
        self.streaming.store(true, Ordering::Release);
        if let Ok(mut slot) = self.slot.lock() {
            slot.take();
        }
    }

    fn is_stream(&self) -> bool {
        self.streaming.load(Ordering::Acquire)
    }
}

async fn serve_connection(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    router: Router,
    limits: Limits,
    slot: OwnedSemaphorePermit,
) {
    let this = Connection {
        slot: Arc::new(Mutex::new(Some(slot))),
        streaming: Arc::new(AtomicBool::new(false)),
    };
    let router = router.layer(axum::Extension(this.clone()));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        // One request per connection, as a page refresh or a scrape needs:
        // an idle kept-alive connection would hold a slot.
        .keep_alive(false)
        // Requests here are a line and a few headers.
        .max_buf_size(16 * 1024);
    let connection = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(router));
    // A failed connection is the client's doing (reset, too slow, malformed
    // request) and hyper has answered what it could: nothing to report.
    tokio::pin!(connection);
    tokio::select! {
        _ = &mut connection => {}
        () = tokio::time::sleep(limits.connection) => {
            // A stream lasts as long as its client listens.
            if this.is_stream() {
                let _ = connection.await;
            }
        }
    }
}
