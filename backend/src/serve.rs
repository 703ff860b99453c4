//! The HTTP server's accept loop: a deadline for each request's headers and
//! one for each request as a whole (its body included), and a bounded
//! graceful stop, so that no client, slow or gone quiet halfway through a
//! request, keeps the backend from stopping.

use std::pin::pin;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::events;
use crate::service::stopped;

/// How long clients may take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Time a client has to send a request's headers.
    pub(crate) header_read: Duration,
    /// Time a request may take from its headers to its answer, its body
    /// read and its submission stored included.
    pub(crate) request: Duration,
    /// Time the requests in progress get to finish once the backend is
    /// asked to stop; then their connections are dropped.
    pub(crate) stop_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            request: Duration::from_secs(60),
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` until `stop` turns true, then lets the
/// requests in progress finish for at most `limits.stop_grace`.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let request_limit = limits.request;
    let router = router.layer(axum::middleware::from_fn(move |request, next| {
        deadline(request, next, request_limit)
    }));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(&mut stop) => break,
        };
        // Reap finished connections as new ones come.
        while connections.try_join_next().is_some() {}
        match accepted {
            Ok((io, _)) => {
                connections.spawn(connection(io, router.clone(), limits, stop.clone()));
            }
            Err(err) => {
                // Out of file descriptors, say: the cause may pass.
                events::accept_failed(&err.to_string());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    drop(listener);
    let finished = tokio::time::timeout(limits.stop_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        events::connections_dropped(connections.len(), limits.stop_grace.as_secs());
        connections.abort_all();
    }
    Ok(())
}

/// Serves one connection; once `stop` turns true, it ends after the request
/// in progress.
async fn connection(
    io: tokio::net::TcpStream,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    let mut served =
        pin!(http.serve_connection(TokioIo::new(io), TowerToHyperService::new(router)));
    // A failed connection is the client's doing (reset, too slow, malformed
    // request) and hyper has answered what it could: nothing to report.
    tokio::select! {
        _ = served.as_mut() => return,
        () = stopped(&mut stop) => served.as_mut().graceful_shutdown(),
    }
    let _ = served.await;
}

/// Answers 408 to a request not answered within `limit`.
async fn deadline(request: Request, next: Next, limit: Duration) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => crate::api::request_timeout(limit).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::routing::post;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    const SHORT: Limits = Limits {
        header_read: Duration::from_millis(500),
        request: Duration::from_millis(800),
        stop_grace: Duration::from_millis(500),
    };

    async fn server(
        limits: Limits,
    ) -> (
        std::net::SocketAddr,
        watch::Sender<bool>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let address = listener.local_addr().expect("its address");
        let router = Router::new().route("/echo", post(|body: String| async move { body }));
        let (stop, stopped) = watch::channel(false);
        let served = tokio::spawn(serve(listener, router, limits, stopped));
        (address, stop, served)
    }

    /// Reads what the server says until it closes the connection.
    async fn answer(client: &mut TcpStream) -> String {
        let mut text = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut text)).await;
        String::from_utf8_lossy(&text).into_owned()
    }

    #[tokio::test]
    async fn a_client_holding_half_a_request_does_not_keep_a_stopping_server_past_its_grace() {
        let limits = Limits {
            request: Duration::from_secs(60),
            header_read: Duration::from_secs(60),
            ..SHORT
        };
        let (address, stop, served) = server(limits).await;
        let mut client = TcpStream::connect(address).await.expect("connects");
        client
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
            .await
            .expect("sends half");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let asked = Instant::now();
        stop.send(true).expect("the server listens");
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the server stops within its grace")
            .expect("joins")
            .expect("serves");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
    }

    #[tokio::test]
    async fn a_request_in_progress_when_asked_to_stop_is_answered() {
        let (address, stop, served) = server(SHORT).await;
        let mut client = TcpStream::connect(address).await.expect("connects");
        client
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nha")
            .await
            .expect("sends half");
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(true).expect("the server listens");
        client.write_all(b"lf").await.expect("sends the rest");
        let text = answer(&mut client).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("half"), "{text}");
        served.await.expect("joins").expect("serves");
    }

    #[tokio::test]
    async fn headers_sent_too_slowly_end_the_connection() {
        let (address, _stop, _served) = server(SHORT).await;
        let mut client = TcpStream::connect(address).await.expect("connects");
        client
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("sends some headers");
        let started = Instant::now();
        let text = answer(&mut client).await;
        assert!(started.elapsed() < Duration::from_secs(3), "closed: {text}");
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_body_sent_too_slowly_is_answered_408() {
        let (address, _stop, _served) = server(SHORT).await;
        let mut client = TcpStream::connect(address).await.expect("connects");
        client
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nslow")
            .await
            .expect("sends part of the body");
        let text = answer(&mut client).await;
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("Idempotency-Key"), "{text}");
    }
}
