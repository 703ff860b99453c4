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

fn ids(events: &[Sse]) -> Vec<i64> {
    events.iter().filter_map(|e| e.1).collect()
}

async fn publish(publisher: &Publisher, store: &possync_core::LicenseKey, id: &str) {
    publisher
        .publish(std::slice::from_ref(store), &price(id, 1.0))
        .await
        .expect("publish");
}

/// The feed's last id, as the terminal's database holds it.
fn last_id(db: &rusqlite::Connection) -> i64 {
    count(
        db,
        "SELECT coalesce(max(last_id), 0) FROM possync_feed_state",
    )
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
    publish(&publisher, &store, "A").await;
    publish(&publisher, &store, "B").await;
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
    let changes: Vec<Change> = live
        .iter()
        .map(|(event, _, data)| {
            assert_eq!(event, "message");
            serde_json::from_str(data).expect("a change")
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
            expect("A", ChangeOp::Upsert, "price_update"),
            expect("B", ChangeOp::Upsert, "price_update"),
            expect("A", ChangeOp::Delete, "product_delete"),
        ]
    );
    let first = ids(&live);
    assert!(
        first[0] < first[1] && first[1] < first[2],
        "ids only grow: {first:?}"
    );

    // A client back with the id of the first change gets the two after it.
    let resumed = read_events(port, Some(first[0]), 2).await;
    assert_eq!(ids(&resumed), first[1..]);
    // The feed survives a restart: a client at the last id gets what comes.
    terminal.stop().await;
    let terminal = RunningTerminal::start(config.clone()).await;
    let follower = tokio::spawn(read_events(port, Some(first[2]), 1));
    publish(&publisher, &store, "C").await;
    let after_restart = follower.await.expect("follower");
    assert!(ids(&after_restart)[0] > first[2], "{after_restart:?}");
    assert!(
        after_restart[0].2.contains(r#""id":"C""#),
        "{after_restart:?}"
    );
    let c = ids(&after_restart)[0];

    // Changes queued while the terminal was off apply as one batch; a
    // client that saw the first of them gets only the rest.
    terminal.stop().await;
    for id in ["D", "E", "F"] {
        publish(&publisher, &store, id).await;
    }
    let terminal = RunningTerminal::start(config).await;
    let db = terminal.db();
    eventually("the three to apply as one batch", || {
        count(
            &db,
            &format!(
                "SELECT count(*) FROM possync_feed WHERE first_id > {c} AND last_id = first_id + 2"
            ),
        ) == 1
    })
    .await;
    let d = count(
        &db,
        &format!("SELECT first_id FROM possync_feed WHERE first_id > {c}"),
    );
    let rest = read_events(port, Some(d), 2).await;
    assert_eq!(ids(&rest), vec![d + 1, d + 2], "{rest:?}");
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
    let follower = tokio::spawn(read_events(port, Some(0), 12));
    // One at a time, so that each is a batch of its own and old ones go.
    for n in 1..=12_u32 {
        publish(&publisher, &store, &format!("P{n}")).await;
        terminal.wait_applied(u64::from(n)).await;
    }
    let given = ids(&follower.await.expect("follower"));
    let db = terminal.db();
    assert_eq!(
        count(&db, "SELECT count(*) FROM possync_feed"),
        5,
        "the table keeps feed_keep changes"
    );
    let last = last_id(&db);
    assert_eq!(last, given[11]);
    for (asked, why) in [
        (given[0], "older than kept"),
        (given[5], "older than kept"),
        (0, "from before the first"),
        (last + 1, "newer than any change"),
        (-5, "never given"),
    ] {
        let answer = read_events(port, Some(asked), 1).await;
        assert_eq!(answer[0].0, "reload", "{why}: {answer:?}");
        assert_eq!(
            answer[0].1,
            Some(last),
            "{why}: follow on from the last change"
        );
        assert!(answer[0].2.contains("read the tables again"), "{answer:?}");
    }
    // The id before the oldest kept is good: that client missed nothing.
    let kept = read_events(port, Some(given[6]), 5).await;
    assert_eq!(ids(&kept), given[7..]);
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_larger_than_what_is_kept_stays_and_ids_never_go_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("feed-big");
    let (mut config, port) = with_status_page(terminal_config(dir.path(), &store, "till-1"));
    config.terminal.feed_keep = 2;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    RunningTerminal::start(config.clone()).await.stop().await;
    for id in ["A", "B", "C"] {
        publish(&publisher, &store, id).await;
    }
    let mut terminal = RunningTerminal::start(config.clone()).await;
    terminal.wait_applied(3).await;
    let db = terminal.db();
    let last = last_id(&db);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM possync_feed WHERE last_id - first_id = 2"
        ),
        1,
        "the newest batch stays, whatever its size"
    );
    let rest = read_events(port, Some(last - 2), 2).await;
    assert_eq!(ids(&rest), vec![last - 1, last]);
    terminal.stop().await;
    let terminal = RunningTerminal::start(config).await;
    let follower = tokio::spawn(read_events(port, Some(last), 1));
    publish(&publisher, &store, "D").await;
    let next = follower.await.expect("follower");
    assert!(ids(&next)[0] > last, "{next:?}");
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_is_told_to_reload_after_the_feed_was_off_or_the_database_went_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("feed-gone");
    let (config, port) = with_status_page(terminal_config(dir.path(), &store, "till-1"));
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let mut terminal = RunningTerminal::start(config.clone()).await;
    publish(&publisher, &store, "A").await;
    terminal.wait_applied(1).await;
    let seen = last_id(&terminal.db());
    terminal.stop().await;

    // Off while B applies, on again for C: a client at A missed B.
    let mut off = config.clone();
    off.terminal.feed_keep = 0;
    let mut terminal = RunningTerminal::start(off).await;
    publish(&publisher, &store, "B").await;
    terminal.wait_applied(1).await;
    let (code, body) = http_get(port, "/events").await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("feed_keep = 0"), "{body}");
    terminal.stop().await;
    let mut terminal = RunningTerminal::start(config.clone()).await;
    publish(&publisher, &store, "C").await;
    terminal.wait_applied(1).await;
    let answer = read_events(port, Some(seen), 1).await;
    assert_eq!(answer[0].0, "reload", "{answer:?}");

    // A copy of the database, changes after it, the copy restored: a
    // client that saw the undone changes is told to read everything.
    let copy = dir.path().join("copy.db");
    terminal.stop().await;
    std::fs::copy(&config.terminal.database, &copy).expect("copy");
    let mut terminal = RunningTerminal::start(config.clone()).await;
    publish(&publisher, &store, "D").await;
    terminal.wait_applied(1).await;
    let undone = last_id(&terminal.db());
    terminal.stop().await;
    std::fs::copy(&copy, &config.terminal.database).expect("restore");
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", config.terminal.database.display()));
    }
    let mut terminal = RunningTerminal::start(config).await;
    publish(&publisher, &store, "E").await;
    terminal.wait_applied(1).await;
    let answer = read_events(port, Some(undone), 1).await;
    assert_eq!(answer[0].0, "reload", "{answer:?}");
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
    let sentinel = Publisher::connect(&config.broker).await.expect("publisher");
    let terminal = RunningTerminal::start(config.clone()).await;
    let journal = dir.path().join("changes.jsonl");

    let mut client = start_example_client(port, &journal);
    wait_for_lines(&journal, 1).await; // where it starts
    let publishing = tokio::spawn({
        let store = store.clone();
        async move {
            for n in 0..1000_u32 {
                publisher
                    .publish(
                        std::slice::from_ref(&store),
                        &price(&format!("P{n:04}"), f64::from(n)),
                    )
                    .await
                    .expect("publish");
            }
        }
    });
    // Killed while changes stream in, perhaps halfway through a line; the
    // terminal restarts under it too, and the client follows on.
    wait_for_lines(&journal, 300).await;
    client.kill().expect("kill the client");
    client.wait().expect("reaped");
    terminal.stop().await;
    let terminal = RunningTerminal::start(config.clone()).await;
    let mut client = start_example_client(port, &journal);
    wait_for_lines(&journal, 600).await;
    terminal.stop().await;
    let terminal = RunningTerminal::start(config).await;
    publishing.await.expect("published");
    let db = terminal.db();
    eventually("every change to apply", || {
        count(&db, "SELECT count(*) FROM products") == 1000
    })
    .await;
    wait_for_lines(&journal, 1001).await;
    // Nothing more comes than was committed: the next line is the change
    // published after them all.
    publish(&sentinel, &store, "LAST").await;
    wait_for_lines(&journal, 1002).await;
    client.kill().expect("kill the client");
    client.wait().expect("reaped");

    let lines = journal_lines(&journal);
    let ids: Vec<String> = lines
        .iter()
        .filter_map(|line| line.get("id").and_then(|id| id.as_str()).map(str::to_owned))
        .collect();
    let mut published: Vec<String> = (0..1000).map(|n| format!("P{n:04}")).collect();
    published.push("LAST".into());
    assert_eq!(ids, published, "every change once, in the order published");
    let event_ids: Vec<i64> = lines
        .iter()
        .skip(1)
        .map(|line| line["event_id"].as_i64().expect("event id"))
        .collect();
    assert!(
        event_ids.windows(2).all(|pair| pair[0] < pair[1]),
        "event ids only grow"
    );
    terminal.stop().await;
}
