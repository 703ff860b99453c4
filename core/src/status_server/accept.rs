//! The accept loop: a bounded number of connections, each with a deadline
//! for its request's headers and one for the whole exchange.

use std::sync::Arc;
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
    /// Time one connection may take, request and response.
    pub(crate) connection: Duration,
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

/// Accepts and serves connections for ever.
pub(super) async fn serve(mut incoming: impl Incoming, router: Router, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    let mut failing = false;
    loop {
        // A free slot before the accept: connections beyond the bound wait in
        // the kernel's backlog and cost this process nothing.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return; // The semaphore is never closed.
        };
        match incoming.accept().await {
            Ok(io) => {
                failing = false;
                tokio::spawn(serve_connection(io, router.clone(), limits, slot));
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

async fn serve_connection(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    router: Router,
    limits: Limits,
    _slot: OwnedSemaphorePermit,
) {
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
    let _ = tokio::time::timeout(limits.connection, connection).await;
}
