//! The change feed (`/events`): every committed change, in order, resumable
//! by the last event id, and a `reload` for a client that asks for more
//! than the terminal keeps; the example client in `examples/` follows it
//! across a kill.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use possync_catalog::{PriceUpdate, ProductDelete};
use possync_core::{Change, ChangeOp, Publisher};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// One Server-Sent Event: (event, id, data).
type Sse = (String, Option<i64>, String);

/// Opens `/events` (HTTP/1.0, so the body is the bare event stream) with
/// `last_id` as `Last-Event-ID`, and reads `count` events.
async fn read_events(port: u16, last_id: Option<i64>, count: usize) -> Vec<Sse> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the status endpoint");
    let header = last_id
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(format!("GET /events HTTP/1.0\r\nHost: localhost\r\n{header}\r\n").as_bytes())
        .await
        .expect("request");
    let mut lines = BufReader::new(stream).lines();
    let read = async {
        let mut events = Vec::new();
        let mut head_done = false;
        let (mut event, mut id, mut data) = ("message".to_owned(), None, String::new());
        while events.len() < count {
            let line = lines
                .next_line()
                .await
                .expect("read")
                .expect("the stream stays open");
            let line = line.trim_end_matches('\r');
            if !head_done {
                assert!(
                    !line.starts_with("HTTP/") || line.contains(" 200 "),
                    "{line}"
                );
                head_done = line.is_empty();
                continue;
            }
            if line.is_empty() {
                if !data.is_empty() {
                    events.push((
                        std::mem::replace(&mut event, "message".into()),
                        id.take(),
                        std::mem::take(&mut data),
                    ));
                }
            } else if let Some(value) = line.strip_prefix("event: ") {
                event = value.to_owned();
            } else if let Some(value) = line.strip_prefix("id: ") {
                id = Some(value.parse().expect("numeric event id"));
            } else if let Some(value) = line.strip_prefix("data: ") {
                data.push_str(value);
            }
        }
        events
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("the events arrive in time")
}

fn price(id: &str, new_price: f64) -> PriceUpdate {
    PriceUpdate {
        product_id: id.into(),
        new_price,
        product_name: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_change_is_an_event_and_a_client_resumes_after_its_last_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("feed");
    let (config, port) = with_status_page(terminal_config(dir.path(), &store, "till-1"));
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let mut terminal = RunningTerminal::start(config.clone()).await;

    let ready = read_events(port, None, 1).await;
    assert_eq!(ready[0].0, "ready");
    assert_eq!(ready[0].1, Some(0), "a new terminal has sent no change yet");

    let follower = tokio::spawn(read_events(port, Some(0), 3));
    publisher
        .publish(std::slice::from_ref(&store), &price("A", 1.0))
        .await
        .expect("publish");
    publisher
        .publish(std::slice::from_ref(&store), &price("B", 2.0))
        .await
        .expect("publish");
    publisher
        .publish(
            std::slice::from_ref(&store),
            &ProductDelete {
                product_id: "A".into(),
            },
        )
        .await
        .expect("publish");
    terminal.wait_applied(3).await;
    let live = follower.await.expect("follower");
    let changes: Vec<(Option<i64>, Change)> = live
        .iter()
        .map(|(event, id, data)| {
            assert_eq!(event, "message");
            (*id, serde_json::from_str(data).expect("a change"))
        })
        .collect();
    let expect = |id: &str, op: ChangeOp, message_type: &str| Change {
        seq: None,
        message_type: message_type.into(),
        entity: Some("product".into()),
        id: Some(id.into()),
        op,
    };
    assert_eq!(
        changes,
        vec![
            (Some(1), expect("A", ChangeOp::Upsert, "price_update")),
            (Some(2), expect("B", ChangeOp::Upsert, "price_update")),
            (Some(3), expect("A", ChangeOp::Delete, "product_delete")),
        ]
    );

    // A client back with the id of the first change gets the two after it.
    let resumed = read_events(port, Some(1), 2).await;
    assert_eq!(
        resumed.iter().map(|e| e.1).collect::<Vec<_>>(),
        vec![Some(2), Some(3)]
    );
    // The feed survives a restart: its ids go on from the table.
    terminal.stop().await;
    let terminal = RunningTerminal::start(config.clone()).await;
    let follower = tokio::spawn(read_events(port, Some(3), 1));
    publisher
        .publish(std::slice::from_ref(&store), &price("C", 3.0))
        .await
        .expect("publish");
    let after_restart = follower.await.expect("follower");
    assert_eq!(after_restart[0].1, Some(4));
    assert!(
        after_restart[0].2.contains(r#""id":"C""#),
        "{after_restart:?}"
    );

    // Changes queued while the terminal was off apply as one batch; a
    // client that saw the first of them gets only the rest.
    terminal.stop().await;
    for id in ["D", "E", "F"] {
        publisher
            .publish(std::slice::from_ref(&store), &price(id, 4.0))
            .await
            .expect("publish");
    }
    let terminal = RunningTerminal::start(config).await;
    let db = terminal.db();
    eventually("the three to apply as one batch", || {
        count(
            &db,
            "SELECT count(*) FROM possync_feed WHERE first_id = 5 AND last_id = 7",
        ) == 1
    })
    .await;
    let rest = read_events(port, Some(5), 2).await;
    assert_eq!(
        rest.iter().map(|e| e.1).collect::<Vec<_>>(),
        vec![Some(6), Some(7)],
        "{rest:?}"
    );
    assert!(rest[0].2.contains(r#""id":"E""#), "{rest:?}");
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_asking_for_more_than_is_kept_is_told_to_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("feed-reload");
    let (mut config, port) = with_status_page(terminal_config(dir.path(), &store, "till-1"));
    config.terminal.feed_keep = 5;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let mut terminal = RunningTerminal::start(config).await;
    // One at a time, so that each is a batch of its own and old ones go.
    for n in 1..=12_u32 {
        publisher
            .publish(
                std::slice::from_ref(&store),
                &price(&format!("P{n}"), f64::from(n)),
            )
            .await
            .expect("publish");
        terminal.wait_applied(u64::from(n)).await;
    }
    let db = terminal.db();
    assert!(
        count(&db, "SELECT count(*) FROM possync_feed") <= 6,
        "the table keeps about feed_keep changes"
    );

    for (asked, why) in [(1, "older than kept"), (99, "newer than any change")] {
        let answer = read_events(port, Some(asked), 1).await;
        assert_eq!(answer[0].0, "reload", "{why}: {answer:?}");
        assert_eq!(
            answer[0].1,
            Some(12),
            "{why}: follow on from the last change"
        );
        assert!(answer[0].2.contains("read the tables again"), "{answer:?}");
    }
    let kept = read_events(port, Some(9), 3).await;
    assert_eq!(
        kept.iter().map(|e| e.1).collect::<Vec<_>>(),
        vec![Some(10), Some(11), Some(12)]
    );
    terminal.stop().await;
}

/// The example client, appending to `journal`.
fn start_example_client(port: u16, journal: &Path) -> Child {
    Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/feed_client.py"))
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(journal)
        .arg("--quiet")
        .stdout(Stdio::null())
        .spawn()
        .expect("python3 runs the example client")
}

/// The journal's whole lines, as JSON (a line being written is not yet one).
fn journal_lines(journal: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(journal)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter_map(|line| line.strip_suffix('\n'))
        .map(|line| serde_json::from_str(line).expect("a whole JSON line"))
        .collect()
}

async fn wait_for_lines(journal: &Path, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal_lines(journal).len() < count {
        assert!(
            Instant::now() < deadline,
            "the client wrote {} of {count} lines",
            journal_lines(journal).len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_client_gets_every_change_once_in_order_across_a_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("feed-client");
    let (config, port) = with_status_page(terminal_config(dir.path(), &store, "till-1"));
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let mut terminal = RunningTerminal::start(config).await;
    let journal = dir.path().join("changes.jsonl");

    let mut client = start_example_client(port, &journal);
    wait_for_lines(&journal, 1).await; // where it starts
    let publishing = tokio::spawn(async move {
        for n in 0..1000_u32 {
            publisher
                .publish(
                    std::slice::from_ref(&store),
                    &price(&format!("P{n:04}"), f64::from(n)),
                )
                .await
                .expect("publish");
        }
    });
    // Killed while changes stream in, perhaps halfway through a line.
    wait_for_lines(&journal, 300).await;
    client.kill().expect("kill the client");
    client.wait().expect("reaped");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut client = start_example_client(port, &journal);
    publishing.await.expect("published");
    terminal.wait_applied(1000).await;
    wait_for_lines(&journal, 1001).await;
    // Nothing more comes than was committed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.kill().expect("kill the client");
    client.wait().expect("reaped");

    let lines = journal_lines(&journal);
    let ids: Vec<String> = lines
        .iter()
        .filter_map(|line| line.get("id").and_then(|id| id.as_str()).map(str::to_owned))
        .collect();
    let published: Vec<String> = (0..1000).map(|n| format!("P{n:04}")).collect();
    assert_eq!(ids, published, "every change once, in the order published");
    let event_ids: Vec<i64> = lines
        .iter()
        .skip(1)
        .map(|line| line["event_id"].as_i64().expect("event id"))
        .collect();
    assert_eq!(event_ids, (1..=1000).collect::<Vec<_>>());
    terminal.stop().await;
}
