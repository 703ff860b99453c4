//! The status endpoint over real sockets: who it answers, what it answers,
//! and that no client can make it stop answering.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::accept::{self, Incoming};
use super::allowed_hosts::AllowedHosts;
use super::{Limits, StatusServer, StatusView, routes};
use crate::progress::Tally;
use crate::status::{State, StatusSender};

/// Longest any exchange in these tests may take before it counts as hung.
const DEADLINE: Duration = Duration::from_secs(10);

/// Every series carries these.
const LABELS: &str = r#"license_key="STORE-1",terminal_id="till-1""#;

/// A status endpoint on a free loopback port, and the sender that sets what
/// it shows.
struct Running {
    address: SocketAddr,
    status: StatusSender,
    server: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn view(dir: &tempfile::TempDir) -> (StatusView, StatusSender) {
    let (status, receiver) = StatusSender::new(crate::sequence::SyncState::default());
    let view = StatusView {
        status: receiver,
        license_key: "STORE-1".into(),
        terminal_id: "till-1".into(),
        // Never created: the endpoint shows no quarantined messages then.
        database: dir.path().join("terminal.db"),
        plugins: Vec::new(),
        feed: crate::feed::channel(),
        feed_on: true,
    };
    (view, status)
}

async fn start(limits: Limits, allowed_hosts: &[&str]) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (view, status) = view(&dir);
    let allowed_hosts: Vec<String> = allowed_hosts.iter().map(|h| (*h).to_owned()).collect();
    let server = StatusServer::new(listener, view, &allowed_hosts, limits).expect("server");
    Running {
        address,
        status,
        server: tokio::spawn(server.run()),
        _dir: dir,
    }
}

#[derive(Debug)]
struct Answer {
    code: u16,
    /// Status line and headers; header names in lowercase, as hyper sends them.
    head: String,
    body: String,
}

/// Sends `request` as it is and reads the answer to its end.
async fn exchange(address: SocketAddr, request: &str) -> Answer {
    let exchange = async {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("answer");
        String::from_utf8(answer).expect("UTF-8 answer")
    };
    let answer = tokio::time::timeout(DEADLINE, exchange)
        .await
        .expect("an answer within the deadline");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    Answer {
        code: head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

async fn get(address: SocketAddr, path: &str, host: &str) -> Answer {
    exchange(
        address,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    )
    .await
}

fn stalled(reason: &str) -> State {
    State::Stalled {
        since: SystemTime::now(),
        reason: reason.into(),
    }
}

#[tokio::test]
async fn a_request_that_names_another_host_is_refused_and_says_why() {
    // A web page on evil.example whose name resolves to 127.0.0.1 reaches
    // the endpoint with `Host: evil.example`: it must learn nothing.
    let server = start(Limits::default(), &[]).await;
    let port = server.address.port();
    for host in ["evil.example".to_owned(), format!("evil.example:{port}")] {
        let answer = get(server.address, "/status", &host).await;
        assert_eq!(answer.code, 421, "{answer:?}");
        assert!(answer.body.contains("allowed_hosts"), "{answer:?}");
        assert!(!answer.body.contains("STORE-1"), "{answer:?}");
    }
    let absolute = "GET http://evil.example/status HTTP/1.1\r\nHost: localhost\r\n\r\n";
    assert_eq!(exchange(server.address, absolute).await.code, 421);
    let no_host = "GET /status HTTP/1.0\r\n\r\n";
    assert_eq!(exchange(server.address, no_host).await.code, 421);

    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "localhost".to_owned(),
    ] {
        let answer = get(server.address, "/status", &host).await;
        assert_eq!(answer.code, 200, "{host}: {answer:?}");
        assert!(answer.body.contains("STORE-1"), "{answer:?}");
    }
}

#[tokio::test]
async fn a_name_in_allowed_hosts_is_answered() {
    let server = start(Limits::default(), &["till-3.store.lan"]).await;
    let host = format!("till-3.store.lan:{}", server.address.port());
    assert_eq!(get(server.address, "/status", &host).await.code, 200);
    let other = format!("till-4.store.lan:{}", server.address.port());
    assert_eq!(get(server.address, "/status", &other).await.code, 421);
}

#[tokio::test]
async fn other_paths_are_404_other_methods_405_and_no_answer_is_cached() {
    let server = start(Limits::default(), &[]).await;
    let not_found = get(server.address, "/nope", "localhost").await;
    assert_eq!(not_found.code, 404);
    assert!(not_found.body.contains("try /, /status"), "{not_found:?}");
    for request in [
        "POST /status HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
        "DELETE /nope HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ] {
        let answer = exchange(server.address, request).await;
        assert_eq!(answer.code, 405, "{request}: {answer:?}");
        assert_eq!(answer.body, "only GET\n");
    }
    for (path, host) in [
        ("/", "localhost"),
        ("/status", "localhost"),
        ("/healthz", "localhost"),
        ("/metrics", "localhost"),
        ("/nope", "localhost"),
        ("/status", "evil.example"),
    ] {
        let answer = get(server.address, path, host).await;
        assert!(
            answer.head.contains("cache-control: no-store"),
            "{path} for {host}: {answer:?}"
        );
    }
}

#[tokio::test]
async fn healthz_is_200_only_while_live_and_503_with_the_reason_while_stalled() {
    let server = start(Limits::default(), &[]).await;
    let answer = get(server.address, "/healthz", "localhost").await;
    assert_eq!(
        (answer.code, answer.body.as_str()),
        (503, "not live: connecting\n")
    );

    server.status.set_state(State::Live {
        since: SystemTime::now(),
    });
    let answer = get(server.address, "/healthz", "localhost").await;
    assert_eq!((answer.code, answer.body.as_str()), (200, "live\n"));

    server.status.set_state(stalled("database is locked"));
    let answer = get(server.address, "/healthz", "localhost").await;
    assert_eq!(
        (answer.code, answer.body.as_str()),
        (503, "not live: stalled: database is locked\n")
    );
}

#[tokio::test]
async fn status_json_shows_stale_changes_by_type_and_why_the_terminal_is_stalled() {
    let server = start(Limits::default(), &[]).await;
    server.status.count(
        &Tally {
            stale_by_type: vec![("price_update".into(), 3)],
            ..Tally::default()
        },
        None,
    );
    server.status.set_state(stalled("disk full"));
    let answer = get(server.address, "/status", "localhost").await;
    assert!(
        answer.head.contains("content-type: application/json"),
        "{answer:?}"
    );
    let status: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
    assert_eq!(status["state"], "stalled");
    assert_eq!(status["reason"], "disk full");
    assert_eq!(status["stale_by_type"]["price_update"], 3);
}

/// A terminal that applied up to seq 42 but missed seq 41.
const SYNCED: crate::sequence::SyncState = crate::sequence::SyncState {
    synced_up_to: 40,
    highest_applied: 42,
    last_change_ms: Some(1_764_239_400_000),
    head: Some(45),
    catalog: None,
    gap: Some(crate::gap::Gap {
        cause: crate::gap::GapCause::Jump {
            expected: 41,
            received: 42,
        },
        since_ms: 1_764_239_400_000,
    }),
    verified: Some(crate::verify::Verified {
        seq: 38,
        at_ms: 1_764_239_300_000,
    }),
};

/// [`SYNCED`], following a catalog.
fn synced() -> crate::sequence::SyncState {
    crate::sequence::SyncState {
        catalog: Some("c0ffee".into()),
        ..SYNCED
    }
}

#[tokio::test]
async fn status_json_and_the_page_say_how_far_the_terminal_is_synced() {
    let server = start(Limits::default(), &[]).await;
    server.status.count(
        &Tally {
            applied: 3,
            collapsed: 2,
            ..Tally::default()
        },
        Some(synced()),
    );
    let answer = get(server.address, "/status", "localhost").await;
    let status: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
    assert_eq!(
        status["sync"],
        serde_json::json!({"synced_up_to": 40, "highest_applied": 42,
            "last_change_at": "2025-11-27T10:30:00Z", "head": 45, "catalog": "c0ffee",
            "gap": {"cause": "jump", "since": "2025-11-27T10:30:00Z",
                "detail": "change 41 never arrived: 42 came after 40"},
            "verified": {"seq": 38, "at": "2025-11-27T10:28:20Z"}})
    );
    assert_eq!(status["collapsed"], 2);
    let page = get(server.address, "/", "localhost").await.body;
    assert!(
        page.contains("Synced up to seq 40 of at least 45")
            && page.contains("change 41 never arrived or could not apply")
            && page.contains("last change 2025-11-27T10:30:00Z")
            && page.contains("gap since 2025-11-27T10:30:00Z: change 41 never arrived")
            && page.contains("verified at seq 38 (2025-11-27T10:28:20Z)")
            && page.contains("2 changes collapsed"),
        "{page}"
    );
}

#[tokio::test]
async fn the_page_shows_a_stalled_terminal_and_why() {
    let server = start(Limits::default(), &[]).await;
    server.status.set_state(stalled("disk <full>"));
    let answer = get(server.address, "/", "localhost").await;
    assert_eq!(answer.code, 200);
    assert!(
        answer.body.contains(r#"id="badge">Stalled since "#)
            && answer.body.contains("disk &lt;full&gt;")
            && answer.body.contains(r#"http-equiv="refresh""#),
        "{}",
        answer.body
    );
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_show_stale_changes_and_a_stall() {
    let server = start(Limits::default(), &[]).await;
    server.status.count(
        &Tally {
            applied: 5,
            by_type: vec![("price_update".into(), 5)],
            stale_by_type: vec![("price_update".into(), 3), ("product_update".into(), 1)],
            quarantined: 1,
            duplicates: 2,
            collapsed: 4,
            ..Tally::default()
        },
        Some(SYNCED),
    );
    server.status.set_queue_depth(Some(7));
    server.status.set_state(stalled("database is locked"));
    let answer = get(server.address, "/metrics", "localhost").await;
    assert!(
        answer
            .head
            .contains("content-type: text/plain; version=0.0.4"),
        "{answer:?}"
    );
    let samples = parse_prometheus_text(&answer.body);
    let value = |series: &str| {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in\n{}", answer.body))
    };
    let by_type = |name: &str, message_type: &str| {
        value(&format!("{name}{{{LABELS},type=\"{message_type}\"}}"))
    };
    assert_eq!(by_type("possync_messages_stale_total", "price_update"), 3.0);
    assert_eq!(
        by_type("possync_messages_stale_total", "product_update"),
        1.0
    );
    assert_eq!(
        by_type("possync_messages_applied_total", "price_update"),
        5.0
    );
    for state in State::names() {
        let expected = if state == "stalled" { 1.0 } else { 0.0 };
        assert_eq!(
            value(&format!("possync_state{{{LABELS},state=\"{state}\"}}")),
            expected,
            "{state}"
        );
    }
    assert_eq!(value(&format!("possync_stalled{{{LABELS}}}")), 1.0);
    assert_eq!(value(&format!("possync_live{{{LABELS}}}")), 0.0);
    assert_eq!(
        value(&format!("possync_messages_quarantined_total{{{LABELS}}}")),
        1.0
    );
    assert_eq!(
        value(&format!("possync_messages_duplicate_total{{{LABELS}}}")),
        2.0
    );
    assert_eq!(value(&format!("possync_queue_depth{{{LABELS}}}")), 7.0);
    assert_eq!(
        value(&format!("possync_messages_collapsed_total{{{LABELS}}}")),
        4.0
    );
    assert_eq!(
        value(&format!("possync_synced_up_to_seq{{{LABELS}}}")),
        40.0
    );
    assert_eq!(
        value(&format!("possync_highest_applied_seq{{{LABELS}}}")),
        42.0
    );
    assert_eq!(value(&format!("possync_head_seq{{{LABELS}}}")), 45.0);
    assert_eq!(
        value(&format!("possync_last_change_seconds{{{LABELS}}}")),
        1_764_239_400.0
    );
    assert!(value(&format!("possync_state_since_seconds{{{LABELS}}}")) > 0.0);
    assert!(value(&format!("possync_last_applied_seconds{{{LABELS}}}")) > 0.0);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off_while_others_are_served() {
    let limits = Limits {
        header_read: Duration::from_secs(2),
        ..Limits::default()
    };
    let server = start(limits, &[]).await;
    let mut dawdler = TcpStream::connect(server.address).await.expect("connect");
    let connected = Instant::now();
    dawdler
        .write_all(b"GET / HTTP/1.1\r\nHost: loc")
        .await
        .expect("half a request");

    assert_eq!(get(server.address, "/healthz", "localhost").await.code, 503);
    let mut byte = [0u8; 1];
    assert!(
        matches!(dawdler.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the dawdler is still waited for while another request is answered"
    );

    let mut rest = Vec::new();
    // Whatever hyper says before it closes (a 408, or nothing), it closes.
    let _ = tokio::time::timeout(DEADLINE, dawdler.read_to_end(&mut rest))
        .await
        .expect("the dawdler is cut off");
    assert!(
        connected.elapsed() >= limits.header_read,
        "cut off after {:?}, before its time",
        connected.elapsed()
    );
}

#[tokio::test]
async fn connections_beyond_the_bound_wait_their_turn_and_the_server_keeps_answering() {
    let limits = Limits {
        connections: 2,
        header_read: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = start(limits, &[]).await;
    // Three times the bound, all silent: each pair holds the slots until
    // its headers' deadline.
    let mut silent = Vec::new();
    for _ in 0..3 * limits.connections {
        silent.push(TcpStream::connect(server.address).await.expect("connect"));
    }
    let asked = Instant::now();
    let answer = get(server.address, "/healthz", "localhost").await;
    assert_eq!(answer.code, 503);
    assert!(
        asked.elapsed() >= limits.header_read,
        "answered after {:?}: the silent connections were all taken at once",
        asked.elapsed()
    );
}

/// A listener that fails its first accepts, as one out of file descriptors does.
struct FailingFirst {
    listener: TcpListener,
    failures: Arc<AtomicUsize>,
}

impl Incoming for FailingFirst {
    type Io = TcpStream;

    async fn accept(&mut self) -> std::io::Result<TcpStream> {
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(std::io::Error::other("Too many open files (os error 24)"));
        }
        self.listener.accept().await.map(|(stream, _)| stream)
    }
}

#[tokio::test]
async fn failed_accepts_are_survived_and_the_server_keeps_answering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (view, _status) = view(&dir);
    let router = routes::router(view, AllowedHosts::new(address.port(), &[]), 32);
    let failures = Arc::new(AtomicUsize::new(3));
    let incoming = FailingFirst {
        listener,
        failures: Arc::clone(&failures),
    };
    let limits = Limits {
        accept_backoff: Duration::from_millis(20),
        ..Limits::default()
    };
    let server = tokio::spawn(accept::serve(incoming, router, limits));

    assert_eq!(get(address, "/healthz", "localhost").await.code, 503);
    assert_eq!(failures.load(Ordering::SeqCst), 0, "every failure was met");
    assert_eq!(get(address, "/healthz", "localhost").await.code, 503);
    server.abort();
}

/// Checks `text` against the Prometheus text format (version 0.0.4): each
/// sample's metric is declared by a `# TYPE` line before it, names and
/// labels are well formed, values are numbers. Returns each series
/// (`name{labels}`) with its value.
fn parse_prometheus_text(text: &str) -> BTreeMap<String, f64> {
    let mut declared = Vec::new();
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(is_name(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            declared.push(name.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(rest.split(' ').next().is_some_and(is_name), "{line}");
            continue;
        }
        assert!(!line.starts_with('#') || line.starts_with("# "), "{line}");
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("a number: {line}"));
        let name = series.split('{').next().unwrap_or_default();
        assert!(is_name(name), "{line}");
        assert!(declared.iter().any(|d| d == name), "undeclared: {line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let labels = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("labels in braces: {line}"));
            assert!(are_labels(labels), "{line}");
        }
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "twice: {line}"
        );
    }
    samples
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `key="value",...`, values with `\\`, `\"` and `\n` escapes.
fn are_labels(mut labels: &str) -> bool {
    loop {
        let Some((key, rest)) = labels.split_once("=\"") else {
            return false;
        };
        if !is_name(key) || key.contains(':') {
            return false;
        }
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => {
                    if !matches!(chars.next(), Some((_, '\\' | '"' | 'n'))) {
                        return false;
                    }
                }
                Some((i, '"')) => break i,
                Some(_) => {}
                None => return false,
            }
        };
        match &rest[end + 1..] {
            "" => return true,
            more => match more.strip_prefix(',') {
                Some(next) => labels = next,
                None => return false,
            },
        }
    }
}

/// Gives the server's terminal a database with an empty change feed.
fn with_feed(server: &Running) {
    let connection =
        rusqlite::Connection::open(server._dir.path().join("terminal.db")).expect("opens");
    connection
        .execute_batch(crate::feed::MIGRATION.sql)
        .expect("creates");
    connection
        .execute_batch(crate::feed::MIGRATION_STATE.sql)
        .expect("creates");
}

/// Opens `/events` and reads its answer's head; the stream stays open.
async fn open_stream(address: SocketAddr, host: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(format!("GET /events HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read_head = async {
        while !head.ends_with(b"\r\n\r\n") {
            let read = stream.read(&mut byte).await.expect("read");
            if read == 0 {
                break;
            }
            head.push(byte[0]);
        }
    };
    tokio::time::timeout(DEADLINE, read_head)
        .await
        .expect("the head in time");
    (stream, String::from_utf8_lossy(&head).into_owned())
}

#[tokio::test]
async fn a_change_feed_stream_outlives_the_connection_deadline_and_frees_its_slot() {
    let limits = Limits {
        connections: 1,
        connection: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = start(limits, &[]).await;
    with_feed(&server);
    let (stream, head) = open_stream(server.address, "localhost").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    // With the one connection slot taken by the stream, others still answer.
    assert_eq!(get(server.address, "/healthz", "localhost").await.code, 503);
    tokio::time::sleep(limits.connection * 3).await;
    // What came (the `ready` event) is read; then the stream waits for more.
    let mut buffer = [0u8; 4096];
    let open = loop {
        match stream.try_read(&mut buffer) {
            Ok(0) => break false,
            Ok(_) => continue,
            Err(e) => break e.kind() == std::io::ErrorKind::WouldBlock,
        }
    };
    assert!(open, "the stream is still open past the deadline");
}

#[tokio::test]
async fn change_feed_streams_beyond_the_bound_are_refused_and_another_host_is_refused() {
    let limits = Limits {
        streams: 2,
        ..Limits::default()
    };
    let server = start(limits, &[]).await;
    with_feed(&server);
    let _open = [
        open_stream(server.address, "localhost").await,
        open_stream(server.address, "localhost").await,
    ];
    let third = get(server.address, "/events", "localhost").await;
    assert_eq!(third.code, 503, "{third:?}");
    assert!(
        third
            .body
            .contains("too many change feed subscribers at once (2)"),
        "{third:?}"
    );
    let elsewhere = get(server.address, "/events", "evil.example").await;
    assert_eq!(elsewhere.code, 421, "{elsewhere:?}");
}

#[tokio::test]
async fn a_subscriber_the_live_changes_run_past_catches_up_from_the_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("terminal.db");
    let mut database = crate::store::Database::open(&path).expect("opens");
    // A live channel of two batches, so that ten at once run past it.
    let live = tokio::sync::broadcast::channel(2).0;
    let (mut view, _status) = view(&dir);
    view.feed = live.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let server = StatusServer::new(listener, view, &[], Limits::default()).expect("server");
    let _server = tokio::spawn(server.run());
    let (stream, head) = open_stream(address, "localhost").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut lines = tokio::io::BufReader::new(stream).lines();
    // The `ready` event: the subscriber follows the live channel now.
    while lines
        .next_line()
        .await
        .expect("read")
        .is_some_and(|l| !l.is_empty())
    {}

    // Ten batches commit while the subscriber's task cannot run (this
    // runtime has one thread): the channel keeps the last two.
    let mut feed = crate::feed::Feed::new(1000, live);
    for n in 0..10 {
        commit_change(&mut database, &mut feed, &format!("P{n}"));
    }

    let mut ids = Vec::new();
    let read = async {
        while ids.len() < 10 {
            let line = lines.next_line().await.expect("read").expect("open");
            if let Some(id) = line.strip_prefix("id: ") {
                ids.push(id.parse::<i64>().expect("an id"));
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("all ten arrive");
    assert!(
        ids.windows(2).all(|pair| pair[0] < pair[1]),
        "each once, in order: {ids:?}"
    );
}

/// Commits a change of product `product` through `feed`, as the applier does.
fn commit_change(
    database: &mut crate::store::Database,
    feed: &mut crate::feed::Feed,
    product: &str,
) {
    let mut changes = crate::feed::Changes::default();
    let message = crate::inbound::Message::from(possync_sdk::Envelope::new(
        "price_update",
        "STORE-1",
        serde_json::json!({ "product_id": product }),
    ));
    changes.push(&message, None);
    let mut transaction = database.begin().expect("begins");
    let batch = feed.write(&mut transaction, changes).expect("writes");
    transaction.commit().expect("commits");
    feed.committed(batch.expect("a batch"));
}

#[tokio::test]
async fn a_batch_another_process_committed_reaches_a_live_subscriber() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("terminal.db");
    let mut database = crate::store::Database::open(&path).expect("opens");
    let mut twin_database = crate::store::Database::open(&path).expect("opens");
    let live = tokio::sync::broadcast::channel(16).0;
    let (mut view, _status) = view(&dir);
    view.feed = live.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let server = StatusServer::new(listener, view, &[], Limits::default()).expect("server");
    let _server = tokio::spawn(server.run());
    let (stream, _) = open_stream(address, "localhost").await;
    let mut lines = tokio::io::BufReader::new(stream).lines();
    while lines
        .next_line()
        .await
        .expect("read")
        .is_some_and(|l| !l.is_empty())
    {}

    // A twin process on the same database commits a batch this process
    // never sends live; then this one commits.
    let mut twin = crate::feed::Feed::new(1000, crate::feed::channel());
    commit_change(&mut twin_database, &mut twin, "TWIN");
    let mut feed = crate::feed::Feed::new(1000, live);
    commit_change(&mut database, &mut feed, "OWN");

    let mut ids = Vec::new();
    let read = async {
        while ids.len() < 2 {
            let line = lines.next_line().await.expect("read").expect("open");
            if let Some(id) = line.strip_prefix("id: ") {
                ids.push(id.parse::<i64>().expect("an id"));
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("both arrive, the twin's first");
    assert!(ids[0] < ids[1], "{ids:?}");
}
