//! Faults a real shop brings, against a real broker and real files: a second
//! process with the same identity, the POS app holding the database's write
//! lock, a full disk. In each the till's catalog ends right, in publish
//! order, with nothing dead-lettered, or the terminal says loudly that it
//! is not right yet.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use possync_core::{Delivery, LicenseKey, Publisher, QueueType, State, Status};
use possync_plugin_product_images::ImageUpdate;
use possync_sdk::Payload;

/// Products the legacy stream spreads its changes over.
const PRODUCTS: usize = 50;

/// `count` price changes in the original back office's format (no
/// `message_id`, no `version`, timestamps to the second, all within one
/// second, so only arrival order can tell them apart), and the price each
/// product must end on: the last one published.
fn legacy_price_changes(store: &LicenseKey, count: usize) -> (Vec<(String, Vec<u8>)>, Vec<f64>) {
    let mut last = vec![0.0; PRODUCTS];
    let messages = (0..count)
        .map(|i| {
            let product = i % PRODUCTS;
            let price = (100 + i) as f64 / 100.0;
            last[product] = price;
            let body = serde_json::json!({
                "type": "price_update",
                "license_key": store.as_str(),
                "payload": {"product_id": format!("P{product:02}"), "new_price": price},
                "timestamp": "2026-12-01T10:00:00Z",
            });
            (
                format!("license.{store}.price_update"),
                serde_json::to_vec(&body).expect("encodes"),
            )
        })
        .collect();
    (messages, last)
}

fn assert_prices(db: &rusqlite::Connection, expected: &[f64]) {
    for (product, price) in expected.iter().enumerate() {
        let id = format!("P{product:02}");
        assert_eq!(
            product_price(db, &id),
            Some(*price),
            "{id} ends on the last price published"
        );
    }
}

fn product_price(db: &rusqlite::Connection, id: &str) -> Option<f64> {
    product(db, id).map(|p| p.1)
}

async fn wait_stalled(terminal: &mut RunningTerminal) -> String {
    let stalled = terminal
        .wait_for(|s| matches!(s.state, State::Stalled { .. }))
        .await;
    let status = terminal.status.borrow().clone();
    assert!(stalled, "the terminal says Stalled: {:?}", status.state);
    status.state.reason().unwrap_or_default().to_owned()
}

/// Nothing of a stream went to the quarantine table or the dead-letter queue.
async fn assert_nothing_dead_lettered(terminal: &RunningTerminal) {
    assert_eq!(quarantine_reasons(&terminal.db()), Vec::<String>::new());
    assert_eq!(queue_depth(&terminal.topology.dead_letter_queue).await, 0);
}

async fn twin_is_refused(delivery: Delivery, queue_type: QueueType) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("twin");
    let mut config = queue_config(dir.path(), &store, queue_type);
    config.terminal.delivery = delivery;
    let queue_type_name = format!("{queue_type:?}").to_lowercase();
    let delivery_name = format!("{delivery:?}").to_lowercase();
    let first = RunningTerminal::start(config.clone()).await;

    // A cloned disk: same store and terminal id, its own database file.
    let clone_db = dir.path().join("clone.db");
    let mut twin = ChildLog::spawn(
        possync_command(&["terminal"])
            .env("POSSYNC_TERMINAL__DELIVERY", &delivery_name)
            .env("POSSYNC_BROKER__QUEUE_TYPE", &queue_type_name)
            .env("POSSYNC_TERMINAL__LICENSE_KEY", store.as_str())
            .env("POSSYNC_TERMINAL__TERMINAL_ID", "till-1")
            .env("POSSYNC_TERMINAL__QUEUE_EXPIRY_DAYS", "1")
            .env("POSSYNC_TERMINAL__DATABASE", &clone_db),
    );
    // It keeps trying (the other consumer may be this till before a power
    // cut), saying why, while the first terminal goes on.
    let said = twin
        .wait_for_line("another process is already running as this terminal")
        .await;
    assert!(
        !said.contains("guest:guest"),
        "no password in the message: {said}"
    );

    if delivery == Delivery::Transient {
        // The queue of a transient terminal is its connection's own; doctor
        // cannot look into it from another connection.
        finish_twin(first, &store).await;
        return stop_twin(twin, &clone_db).await;
    }
    let doctor = possync_command(&["doctor"])
        .env("POSSYNC_BROKER__QUEUE_TYPE", &queue_type_name)
        .env("POSSYNC_TERMINAL__LICENSE_KEY", store.as_str())
        .env("POSSYNC_TERMINAL__TERMINAL_ID", "till-1")
        .env("POSSYNC_TERMINAL__QUEUE_EXPIRY_DAYS", "1")
        .env("POSSYNC_TERMINAL__DATABASE", &clone_db)
        .output()
        .expect("doctor");
    let report = text(&doctor.stdout);
    assert!(
        report.contains("another process is already running as this terminal"),
        "doctor on the clone says so: {report}"
    );
    finish_twin(first, &store).await;
    stop_twin(twin, &clone_db).await;
}

/// Stops the refused twin; it never applied anything.
async fn stop_twin(twin: ChildLog, clone_db: &Path) {
    twin.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = twin.exit().await;
    assert!(status.success(), "the twin stops cleanly on SIGTERM: {log}");
    let db = rusqlite::Connection::open(clone_db).expect("clone database");
    assert_eq!(
        count(&db, "SELECT count(*) FROM products"),
        0,
        "the twin applied nothing"
    );
}

/// The first terminal still gets every change.
async fn finish_twin(mut first: RunningTerminal, store: &LicenseKey) {
    sync_and_check(&mut first, store, 50, 7).await;
    assert!(first.status.borrow().is_live());
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_with_the_same_identity_is_refused_and_the_first_applies_everything() {
    twin_is_refused(Delivery::Durable, QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_on_a_quorum_queue_is_refused_although_quorum_queues_ignore_exclusivity() {
    twin_is_refused(Delivery::Durable, QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_transient_process_with_the_same_identity_is_refused_too() {
    twin_is_refused(Delivery::Transient, QueueType::Classic).await;
}

/// Holds the database's write lock, as a POS app in a long transaction does.
fn hold_write_lock(database: PathBuf, locked: std::sync::mpsc::Sender<()>, hold: Duration) {
    let connection = rusqlite::Connection::open(database).expect("open");
    connection
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");
    let _ = locked.send(());
    std::thread::sleep(hold);
    connection.execute_batch("COMMIT").expect("release");
}

async fn stream_while_the_pos_app_holds_the_lock(queue_type: QueueType) {
    const CHANGES: usize = 300;
    const HOLD: Duration = Duration::from_secs(20);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("lock");
    let mut terminal = RunningTerminal::start(queue_config(dir.path(), &store, queue_type)).await;
    let (messages, last) = legacy_price_changes(&store, CHANGES);

    let (locked, lock_taken) = std::sync::mpsc::channel();
    let holder = std::thread::spawn({
        let database = terminal.database.clone();
        move || hold_write_lock(database, locked, HOLD)
    });
    lock_taken
        .recv_timeout(WAIT)
        .expect("the lock is taken in time");
    publish_raw_many(&messages).await;

    let reason = wait_stalled(&mut terminal).await;
    assert!(
        reason.contains("locked"),
        "the reason names the lock: {reason}"
    );
    assert_eq!(
        product_price(&terminal.db(), "P00"),
        None,
        "nothing applied while the lock is held"
    );
    tokio::task::spawn_blocking(move || holder.join())
        .await
        .expect("join")
        .expect("lock holder");

    terminal.wait_applied(CHANGES as u64).await;
    assert!(
        terminal.wait_for(Status::is_live).await,
        "Live again once the lock is gone"
    );
    assert_prices(&terminal.db(), &last);
    assert_nothing_dead_lettered(&terminal).await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_locked_database_stalls_the_stream_in_place_and_keeps_publish_order_classic() {
    stream_while_the_pos_app_holds_the_lock(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_locked_database_stalls_the_stream_in_place_and_keeps_publish_order_quorum() {
    stream_while_the_pos_app_holds_the_lock(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_terminal_whose_connection_is_closed_says_offline_and_loses_nothing() {
    const CHANGES: usize = 50;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("stallgone");
    let mut terminal = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let (messages, last) = legacy_price_changes(&store, CHANGES);
    let (locked, lock_taken) = std::sync::mpsc::channel();
    let holder = std::thread::spawn({
        let database = terminal.database.clone();
        move || hold_write_lock(database, locked, Duration::from_secs(20))
    });
    lock_taken
        .recv_timeout(WAIT)
        .expect("the lock is taken in time");
    publish_raw_many(&messages).await;
    wait_stalled(&mut terminal).await;

    // Only this terminal's connection: the broker takes back what it holds.
    let name = format!("possync terminal till-1 of {store}");
    let listed = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("list connections");
    let pid = text(&listed.stdout)
        .lines()
        .find(|line| line.contains(&name))
        .and_then(|line| line.split('\t').next())
        .map(str::to_owned)
        .expect("the terminal's connection is listed");
    rabbitmqctl(&[
        "close_connection",
        &pid,
        "possync test: connection lost while stalled",
    ]);
    let offline = terminal
        .wait_for(|s| matches!(s.state, State::Offline { .. }))
        .await;
    assert!(offline, "Offline, not Stalled, once the connection is gone");
    assert!(
        !holder.is_finished(),
        "it noticed while the lock was still held, not only once its batch committed"
    );

    tokio::task::spawn_blocking(move || holder.join())
        .await
        .expect("join")
        .expect("lock holder");
    assert!(terminal.wait_for(Status::is_live).await, "Live again");
    eventually("every change applied", || {
        product_price(&terminal.db(), "P49") == Some(last[49])
    })
    .await;
    assert_prices(&terminal.db(), &last);
    assert_nothing_dead_lettered(&terminal).await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_started_while_the_pos_app_holds_the_lock_waits_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("bootlock");
    let config = terminal_config(dir.path(), &store, "till-1");
    let (locked, lock_taken) = std::sync::mpsc::channel();
    let holder = std::thread::spawn({
        let database = config.terminal.database.clone();
        move || hold_write_lock(database, locked, Duration::from_secs(6))
    });
    lock_taken
        .recv_timeout(WAIT)
        .expect("the lock is taken in time");
    let mut terminal = RunningTerminal::start(config).await;
    sync_and_check(&mut terminal, &store, 20, 11).await;
    tokio::task::spawn_blocking(move || holder.join())
        .await
        .expect("join")
        .expect("lock holder");
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_till_restarted_while_the_broker_still_holds_its_old_consumer_gets_in_when_it_is_dropped()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("reboot");
    let config = terminal_config(dir.path(), &store, "till-1");
    // Declares the queue; then a connection the broker still thinks alive
    // (a till before a power cut) holds it.
    let first_run = RunningTerminal::start(config.clone()).await;
    let topology = first_run.topology.clone();
    first_run.stop().await;
    let ghost = broker().await;
    let channel = ghost.create_channel().await.expect("channel");
    let _consumer = channel
        .basic_consume(
            topology.queue.as_str().into(),
            "ghost".into(),
            lapin::options::BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("the ghost consumes");
    let starting = tokio::spawn(RunningTerminal::start(config.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await; // the ghost's remaining life, a fault duration
    assert!(
        !starting.is_finished(),
        "refused while the ghost holds the queue"
    );
    ghost
        .close(200, "power cut noticed".into())
        .await
        .expect("close");
    let mut terminal = starting.await.expect("the restarted till goes live");
    sync_and_check(&mut terminal, &store, 10, 5).await;
    terminal.stop().await;
}

/// A small file system of the test's own, mounted at a temporary folder.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "the disk-full test mounts a small tmpfs (it runs as root): {}",
            text(&output.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills what is left with one file; returns it.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 4096];
        while file.write_all(&block).is_ok() {}
        let _ = file.flush();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_stalls_the_stream_in_place_and_it_resumes_when_space_returns() {
    stream_onto_a_full_disk(ImagesOn::AnotherDisk).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn images_that_cannot_be_written_stall_the_stream_instead_of_being_dead_lettered() {
    stream_onto_a_full_disk(ImagesOn::TheFullDisk).await;
}

/// Where the product-images plugin writes its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImagesOn {
    /// The database's commits fail; image files can be written.
    AnotherDisk,
    /// Image files cannot be written either.
    TheFullDisk,
}

async fn stream_onto_a_full_disk(images_on: ImagesOn) {
    const CHANGES: usize = 300;
    let disk = SmallDisk::mount(8 << 20);
    let other_disk = tempfile::tempdir().expect("images dir");
    let images = match images_on {
        ImagesOn::AnotherDisk => other_disk.path().to_owned(),
        ImagesOn::TheFullDisk => disk.path().join("images"),
    };
    let store = unique_license("full");
    let mut config = terminal_config(disk.path(), &store, "till-1");
    config.plugins.insert(
        "product_images".into(),
        dynamic_plugin(
            "possync-plugin-product-images",
            serde_json::json!({ "images_dir": images }),
        ),
    );
    let mut terminal = RunningTerminal::start(config).await;
    let image = |product: &str, picture: &[u8]| {
        let envelope = ImageUpdate::new(product, "image/png", picture)
            .to_envelope(store.as_str())
            .expect("envelope");
        (
            format!("license.{store}.{}", ImageUpdate::TYPE),
            serde_json::to_vec(&envelope).expect("encodes"),
        )
    };
    let (before, after, new) = (vec![1u8; 3000], vec![2u8; 3000], vec![3u8; 3000]);
    publish_raw_many(&[image("P01", &before)]).await;
    terminal.wait_applied(1).await;
    let files = || -> Vec<Vec<u8>> {
        let mut files: Vec<Vec<u8>> = std::fs::read_dir(&images)
            .expect("images dir")
            .map(|entry| std::fs::read(entry.expect("entry").path()).unwrap_or_default())
            .collect();
        files.sort();
        files
    };
    assert_eq!(files(), std::slice::from_ref(&before));

    // Every commit must now grow the write-ahead log.
    terminal
        .db()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .expect("checkpoint");
    let filler = disk.fill();
    let (mut messages, last) = legacy_price_changes(&store, CHANGES);
    messages.splice(0..0, [image("P00", &new), image("P01", &after)]);
    publish_raw_many(&messages).await;

    let reason = wait_stalled(&mut terminal).await;
    assert!(
        reason.contains("full") || reason.contains("No space left"),
        "the reason names the full disk: {reason}"
    );
    // Each try writes the new pictures and removes them again when its
    // commit fails; the picture P01 still shows is never removed.
    eventually("the files of the committed rows only", || {
        files() == [before.clone()]
    })
    .await;

    std::fs::remove_file(filler).expect("free the space");
    terminal.wait_applied(1 + messages.len() as u64).await;
    assert!(terminal.wait_for(Status::is_live).await, "Live again");
    let db = terminal.db();
    assert_prices(&db, &last);
    for (product, picture) in [("P00", &new), ("P01", &after)] {
        let path: String = db
            .query_row(
                "SELECT path FROM product_images WHERE product_id = ?1",
                [product],
                |row| row.get(0),
            )
            .expect("the image row committed");
        assert_eq!(&std::fs::read(&path).expect("its file"), picture);
    }
    assert_eq!(
        files(),
        [before, after, new][1..].to_vec(),
        "the picture no row refers to any more is removed after the commit"
    );
    assert_nothing_dead_lettered(&terminal).await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_older_than_the_stored_one_is_counted_as_stale_by_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("stale");
    let mut terminal = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let change = |price: f64, timestamp: &str| {
        let body = serde_json::json!({
            "type": "price_update",
            "license_key": store.as_str(),
            "payload": {"product_id": "P1", "new_price": price},
            "timestamp": timestamp,
        });
        (
            format!("license.{store}.price_update"),
            serde_json::to_vec(&body).expect("encodes"),
        )
    };
    // A second back office whose clock runs ten minutes behind.
    publish_raw_many(&[
        change(5.0, "2026-12-01T10:10:00Z"),
        change(4.0, "2026-12-01T10:00:00Z"),
    ])
    .await;
    let counted = terminal
        .wait_for(|s| s.stale_by_type.get("price_update") == Some(&1))
        .await;
    let status = terminal.status.borrow().clone();
    assert!(counted, "one stale price_update counted: {status:?}");
    assert_eq!(
        status.applied, 1,
        "the stale change is not counted as applied"
    );
    assert_eq!(product_price(&terminal.db(), "P1"), Some(5.0));
    terminal.stop().await;
    let shown = possync_command(&["status"])
        .env(
            "POSSYNC_TERMINAL__DATABASE",
            &terminal_config(dir.path(), &store, "till-1")
                .terminal
                .database,
        )
        .output()
        .expect("status");
    let shown = text(&shown.stdout);
    assert!(
        shown.contains("stale         1 changes older"),
        "possync status counts it: {shown}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn old_bookkeeping_is_pruned_while_the_terminal_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("prune");
    let mut terminal = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    terminal
        .db()
        .execute_batch(
            "INSERT INTO possync_applied (message_id, applied_at) VALUES ('long-ago', 0);
             INSERT INTO possync_publishers (publisher_id, last_seq, applied_at) VALUES ('long-ago', 3, 0);
             INSERT INTO possync_quarantine (received_at, routing_key, reason, body)
                 VALUES (0, 'license.x.y', 'long ago', x'00');",
        )
        .expect("old rows");
    let (changes, _) = catalog_changes(&store, 5, 3);
    let publisher = Publisher::connect(&terminal_config(dir.path(), &store, "x").broker)
        .await
        .expect("publisher");
    publisher
        .publish_envelopes(changes)
        .await
        .expect("confirmed");
    terminal.wait_applied(5).await;
    eventually("old rows to be pruned", || {
        let db = terminal.db();
        count(
            &db,
            "SELECT count(*) FROM possync_applied WHERE applied_at = 0",
        ) == 0
            && count(
                &db,
                "SELECT count(*) FROM possync_publishers WHERE applied_at = 0",
            ) == 0
            && count(
                &db,
                "SELECT count(*) FROM possync_quarantine WHERE received_at = 0",
            ) == 0
    })
    .await;
    assert_eq!(
        count(
            &terminal.db(),
            "SELECT count(*) FROM possync_publishers WHERE last_seq = 5"
        ),
        1,
        "the publisher heard from now is kept"
    );
    publisher.close().await;
    terminal.stop().await;
}
