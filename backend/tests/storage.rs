//! The backend's storage guarantees, checked against every implementation:
//! each test below runs once on SQLite and once on PostgreSQL, each time on
//! a database of its own, so the tests run in parallel.
//!
//! PostgreSQL is found at `POSSYNC_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); a missing server fails
//! the tests, it never skips them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use possync_backend::{
    Accepted, IdempotencyKey, NewChange, Outcome, PostgresStorage, ReceiptRecord, Recomputed,
    SqliteStorage, Storage, StorageError, StoreHead, TokenRecord, UpstreamRecord,
};
use possync_core::{ChangeKind, Checksum, ChecksumSpec, EntityChange};
use possync_sdk::Version;
use serde_json::{Value, json};

/// A fresh, empty database and the storages opened on it.
trait Harness: Sized {
    type S: Storage;
    /// A new empty database.
    async fn fresh() -> Self;
    /// A storage on it; may be called again for a second one.
    async fn open(&self) -> Self::S;
    /// Opens a storage on it, expecting an error.
    async fn open_err(&self) -> StorageError;
    /// Marks its schema as made by a later version of possync.
    async fn mark_schema_newer(&self);
    /// Runs SQL on it behind the storage's back.
    async fn raw(&self, sql: &str);
    /// Makes every idempotency key recorded so far `seconds` older.
    async fn age_keys(&self, seconds: i64);
    /// Runs a query answering one integer on it behind the storage's back.
    async fn count(&self, sql: &str) -> i64;
}

struct Sqlite {
    dir: tempfile::TempDir,
}

impl Harness for Sqlite {
    type S = SqliteStorage;

    async fn fresh() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temporary folder"),
        }
    }

    async fn open(&self) -> SqliteStorage {
        SqliteStorage::open(self.dir.path().join("backend.db"))
            .await
            .expect("the SQLite database opens")
    }

    async fn open_err(&self) -> StorageError {
        SqliteStorage::open(self.dir.path().join("backend.db"))
            .await
            .expect_err("the SQLite database is refused")
    }

    async fn mark_schema_newer(&self) {
        rusqlite::Connection::open(self.dir.path().join("backend.db"))
            .and_then(|db| db.pragma_update(None, "user_version", 99))
            .expect("the schema version is set");
    }

    async fn raw(&self, sql: &str) {
        rusqlite::Connection::open(self.dir.path().join("backend.db"))
            .and_then(|db| db.execute_batch(sql))
            .expect("the SQL runs");
    }

    async fn age_keys(&self, seconds: i64) {
        self.raw(&format!(
            "UPDATE idempotency SET created_at = created_at - {}",
            seconds * 1000
        ))
        .await;
    }

    async fn count(&self, sql: &str) -> i64 {
        rusqlite::Connection::open(self.dir.path().join("backend.db"))
            .and_then(|db| db.query_row(sql, [], |row| row.get(0)))
            .expect("the query answers")
    }
}

/// A database of its own on the test server, dropped with this value.
struct Postgres {
    name: String,
    url: String,
}

fn postgres_admin_url() -> String {
    std::env::var("POSSYNC_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The admin URL with its database replaced by `name`.
fn postgres_url_of(name: &str) -> String {
    let admin = postgres_admin_url();
    let (base, query) = admin.split_once('?').unwrap_or((&admin, ""));
    let (server, _) = base
        .rsplit_once('/')
        .filter(|(server, _)| server.contains("//"))
        .unwrap_or((base, ""));
    if query.is_empty() {
        format!("{server}/{name}")
    } else {
        format!("{server}/{name}?{query}")
    }
}

async fn postgres_admin() -> tokio_postgres::Client {
    let url = postgres_admin_url();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|err| {
            let cause = std::error::Error::source(&err).map_or(String::new(), |s| format!(": {s}"));
            panic!(
                "PostgreSQL does not answer at POSSYNC_TEST_POSTGRES_URL ({}): {err}{cause}; \
                 start it (.ci/run does) or point the variable at one",
                possync_core::redact_url(&url)
            )
        });
    tokio::spawn(connection);
    client
}

impl Harness for Postgres {
    type S = PostgresStorage;

    async fn fresh() -> Self {
        let name = format!("possync_test_{}", uuid::Uuid::now_v7().simple());
        postgres_admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("a test database is created");
        Self {
            url: postgres_url_of(&name),
            name,
        }
    }

    async fn open(&self) -> PostgresStorage {
        PostgresStorage::connect(&self.url)
            .await
            .expect("PostgreSQL storage connects")
    }

    async fn open_err(&self) -> StorageError {
        PostgresStorage::connect(&self.url)
            .await
            .expect_err("the PostgreSQL database is refused")
    }

    async fn mark_schema_newer(&self) {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("the test database answers");
        tokio::spawn(connection);
        client
            .batch_execute("INSERT INTO possync_schema (version) VALUES (99)")
            .await
            .expect("the schema version is set");
    }

    async fn raw(&self, sql: &str) {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("the test database answers");
        tokio::spawn(connection);
        client.batch_execute(sql).await.expect("the SQL runs");
    }

    async fn age_keys(&self, seconds: i64) {
        self.raw(&format!(
            "UPDATE idempotency SET created_at = created_at - interval '{seconds} seconds'"
        ))
        .await;
    }

    async fn count(&self, sql: &str) -> i64 {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("the test database answers");
        tokio::spawn(connection);
        client
            .query_one(sql, &[])
            .await
            .expect("the query answers")
            .get(0)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Drop is not async: drop the database from a runtime of its own,
        // whether the test passed or panicked.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                postgres_admin()
                    .await
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if let Ok(Err(err)) = dropped {
            eprintln!("cannot drop test database {}: {err}", self.name);
        }
    }
}

/// Runs each listed test on each implementation.
macro_rules! on_every_storage {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test::<super::Sqlite>().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test::<super::Postgres>().await;
                }
            )*
        }
    };
}

on_every_storage!(
    the_sequence_starts_at_one_per_store_and_has_no_gap,
    a_submission_is_stored_whole_or_not_at_all,
    a_stale_clock_takes_no_seq_and_writes_no_outbox_row,
    a_late_clock_after_a_delete_is_still_stale,
    entity_changes_apply_and_a_deleted_entity_leaves_the_catalog,
    the_relay_sees_each_store_in_order_until_marked_published,
    changes_after_lists_later_changes_in_order_and_limited,
    heads_count_each_stores_unpublished_changes,
    a_replayed_key_returns_the_first_answer_and_writes_nothing,
    a_key_reused_for_another_request_is_refused,
    the_same_key_from_another_client_is_independent,
    concurrent_replays_of_one_key_write_once,
    tokens_are_created_listed_found_and_revoked,
    one_storage_at_a_time_leads_the_relay,
    what_was_answered_is_there_after_reopening,
    concurrent_submitters_get_every_seq_exactly_once,
    two_storages_on_one_database_never_share_a_seq,
    a_schema_from_a_later_possync_is_refused,
    json_with_an_escaped_nul_is_stored_by_every_storage,
    an_undeclared_type_from_the_exchange_is_stale_behind_a_newer_clock_of_its_type,
    a_message_id_already_in_a_stores_outbox_is_refused,
    a_store_whose_sequence_is_exhausted_refuses_the_next_change,
    idempotency_keys_older_than_the_retention_are_forgotten,
    a_refused_submission_among_concurrent_ones_leaves_the_others_whole,
    each_database_has_its_own_catalog_id_kept_across_reopening,
    upstream_messages_are_recorded_once_each_in_arrival_order,
    a_refused_upstream_batch_records_none_of_it,
    the_latest_receipt_of_a_run_wins_and_a_new_run_replaces_it,
    a_forgotten_terminal_leaves_the_fleet,
    catalog_pages_follow_the_head_and_go_through_the_store_in_byte_order,
    checksums_kept_by_every_submission_are_those_of_the_catalog,
    checksums_are_computed_again_for_another_spec_and_kept_under_one_only,
    a_checkpoint_says_whether_its_store_has_unpublished_changes,
    a_receipt_records_what_its_terminal_verified_and_the_gap_it_has_open,
    the_checksum_log_states_the_checksums_at_every_boundary,
    computing_the_checksums_again_starts_the_log_at_each_stores_head,
    pruning_the_checksum_log_keeps_reads_at_and_above_its_bound,
    the_checksum_log_stays_bounded_without_pruning,
    the_checksum_log_keeps_every_boundary_the_relay_has_yet_to_publish,
    pruning_the_checksum_log_beside_submissions_fails_neither,
);

/// What the checksums cover in these tests: a product's price and name, a
/// category's name; not every kind the tests write.
fn spec() -> ChecksumSpec {
    let product = ["price", "name"].map(String::from);
    let category = ["name"].map(String::from);
    ChecksumSpec::new([
        ("product", product.as_slice()),
        ("category", category.as_slice()),
    ])
}

fn product(store: &str, id: &str, kind: ChangeKind, fields: Value) -> NewChange {
    let fields = fields.as_object().cloned().unwrap_or_default();
    let mut payload = fields.clone();
    payload.insert("product_id".into(), json!(id));
    NewChange {
        store: store.into(),
        message_type: "product_update".into(),
        payload: Value::Object(payload).to_string(),
        timestamp: "2025-11-27T10:30:00Z".into(),
        message_id: uuid::Uuid::now_v7().to_string(),
        entity: Some(EntityChange {
            entity: "product".into(),
            id: id.into(),
            kind,
            fields,
        }),
        clock: None,
    }
}

fn price(store: &str, id: &str, price: f64) -> NewChange {
    product(store, id, ChangeKind::Merge, json!({ "price": price }))
}

fn at(mut change: NewChange, micros: i64) -> NewChange {
    change.clock = Some(Version {
        micros,
        exact: true,
    });
    change
}

fn key(client: &str, key: &str, fingerprint: &str) -> Option<IdempotencyKey> {
    Some(IdempotencyKey {
        client: client.into(),
        key: key.into(),
        fingerprint: fingerprint.into(),
    })
}

fn seqs(accepted: &[Accepted]) -> Vec<Option<i64>> {
    accepted
        .iter()
        .map(|accepted| match accepted.outcome {
            Outcome::Sequenced { seq } => Some(seq),
            Outcome::Stale => None,
        })
        .collect()
}

async fn submit<S: Storage>(storage: &S, changes: Vec<NewChange>) -> Vec<Option<i64>> {
    let submitted = storage
        .submit(changes, None, &spec())
        .await
        .expect("the submission is stored");
    assert!(!submitted.replayed);
    seqs(&submitted.accepted)
}

async fn outbox_seqs<S: Storage>(storage: &S, store: &str) -> Vec<i64> {
    storage
        .changes_after(store, 0, 100_000)
        .await
        .expect("changes are listed")
        .iter()
        .map(|change| change.row.seq)
        .collect()
}

async fn head<S: Storage>(storage: &S, store: &str) -> i64 {
    storage
        .heads()
        .await
        .expect("heads are listed")
        .into_iter()
        .find(|head| head.store == store)
        .map_or(0, |head| head.head)
}

async fn state<S: Storage>(storage: &S, store: &str, id: &str) -> Option<Value> {
    storage
        .catalog(store)
        .await
        .expect("the catalog is listed")
        .into_iter()
        .find(|entry| entry.entity == "product" && entry.id == id)
        .map(|entry| Value::Object(entry.state))
}

async fn the_sequence_starts_at_one_per_store_and_has_no_gap<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    assert_eq!(
        submit(
            &storage,
            vec![
                price("A", "P1", 1.0),
                price("B", "P1", 1.0),
                price("A", "P2", 2.0)
            ]
        )
        .await,
        [Some(1), Some(1), Some(2)]
    );
    assert_eq!(
        submit(&storage, vec![price("A", "P1", 3.0)]).await,
        [Some(3)]
    );
    assert_eq!(outbox_seqs(&storage, "A").await, [1, 2, 3]);
    assert_eq!(outbox_seqs(&storage, "B").await, [1]);
}

async fn a_submission_is_stored_whole_or_not_at_all<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    submit(&storage, vec![price("A", "P1", 1.0)]).await;
    let mut broken = price("A", "P3", 3.0);
    broken.payload = "not JSON".into();
    let err = storage
        .submit(
            vec![price("A", "P2", 2.0), price("B", "P1", 1.0), broken],
            None,
            &spec(),
        )
        .await
        .expect_err("a change the database refuses fails its submission");
    assert!(
        matches!(err, StorageError::Refused(_)) && !err.is_transient(),
        "a refusal is permanent, not a failure to retry: {err}"
    );
    assert_eq!(outbox_seqs(&storage, "A").await, [1], "nothing was written");
    assert_eq!(outbox_seqs(&storage, "B").await, Vec::<i64>::new());
    assert_eq!(state(&storage, "A", "P2").await, None);
    assert_eq!(head(&storage, "B").await, 0);
    assert_eq!(
        submit(&storage, vec![price("A", "P2", 2.0), price("B", "P1", 1.0)]).await,
        [Some(2), Some(1)],
        "the failed submission gave out no number"
    );
}

async fn a_refused_submission_among_concurrent_ones_leaves_the_others_whole<H: Harness>() {
    // Submissions that arrive together may share one commit (SQLite
    // commits them as a group); a refused one must take only its own
    // writes back, half-written or not.
    let db = H::fresh().await;
    let storage = Arc::new(db.open().await);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..60 {
        let storage = Arc::clone(&storage);
        tasks.spawn(async move {
            let mut changes = vec![price("A", &format!("P{n}"), 1.0)];
            if n % 7 == 3 {
                let mut broken = price("A", &format!("Q{n}"), 2.0);
                broken.payload = "not JSON".into();
                changes.push(broken);
            }
            (n, storage.submit(changes, None, &spec()).await)
        });
    }
    let mut sequenced = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (n, result) = joined.expect("the task ran");
        match result {
            Ok(submitted) if n % 7 != 3 => match submitted.accepted[0].outcome {
                Outcome::Sequenced { seq } => sequenced.push(seq),
                Outcome::Stale => panic!("submission {n} was stale"),
            },
            Err(StorageError::Refused(_)) if n % 7 == 3 => {
                assert_eq!(
                    state(storage.as_ref(), "A", &format!("P{n}")).await,
                    None,
                    "{n}"
                );
            }
            other => panic!("submission {n}: {other:?}"),
        }
    }
    sequenced.sort_unstable();
    let expected: Vec<i64> = (1..=sequenced.len() as i64).collect();
    assert_eq!(
        sequenced, expected,
        "every accepted change has its own seq, with no gap"
    );
    assert_eq!(
        outbox_seqs(storage.as_ref(), "A").await,
        expected,
        "the outbox holds them alone"
    );
    assert_eq!(head(storage.as_ref(), "A").await, expected.len() as i64);
}

async fn a_stale_clock_takes_no_seq_and_writes_no_outbox_row<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    let answered = submit(
        &storage,
        vec![
            at(price("A", "P1", 1.0), 200),
            at(price("A", "P1", 2.0), 100),
            at(price("A", "P1", 3.0), 200),
        ],
    )
    .await;
    assert_eq!(answered, [Some(1), None, None], "older or the same change");
    // A change from the API orders by arrival and keeps the entity's clock.
    assert_eq!(
        submit(&storage, vec![price("A", "P1", 4.0)]).await,
        [Some(2)]
    );
    assert_eq!(
        submit(&storage, vec![at(price("A", "P1", 5.0), 150)]).await,
        [None]
    );
    assert_eq!(
        submit(&storage, vec![at(price("A", "P1", 6.0), 300)]).await,
        [Some(3)]
    );
    // A clock that does not identify its change exactly wins a tie.
    let mut tie = price("A", "P1", 7.0);
    tie.clock = Some(Version {
        micros: 300,
        exact: false,
    });
    assert_eq!(submit(&storage, vec![tie]).await, [Some(4)]);
    assert_eq!(outbox_seqs(&storage, "A").await, [1, 2, 3, 4]);
    assert_eq!(head(&storage, "A").await, 4);
    assert_eq!(
        state(&storage, "A", "P1").await,
        Some(json!({ "price": 7.0 }))
    );
}

async fn a_late_clock_after_a_delete_is_still_stale<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    let delete = product("A", "P1", ChangeKind::Delete, json!({}));
    submit(
        &storage,
        vec![at(price("A", "P1", 1.0), 100), at(delete, 200)],
    )
    .await;
    assert_eq!(state(&storage, "A", "P1").await, None);
    assert_eq!(
        submit(&storage, vec![at(price("A", "P1", 2.0), 150)]).await,
        [None],
        "the tombstone's clock judges the late change"
    );
    assert_eq!(state(&storage, "A", "P1").await, None);
    assert_eq!(
        submit(&storage, vec![at(price("A", "P1", 3.0), 250)]).await,
        [Some(3)]
    );
    assert_eq!(
        state(&storage, "A", "P1").await,
        Some(json!({ "price": 3.0 })),
        "a newer change brings it back, from nothing"
    );
}

async fn catalog_pages_follow_the_head_and_go_through_the_store_in_byte_order<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    // Upper case sorts before lower case in byte order, whatever the
    // database's collation says.
    let ids = ["b", "A", "a", "B", "c"];
    let changes = ids
        .iter()
        .map(|id| product("A", id, ChangeKind::Replace, json!({ "name": id })))
        .chain([product("OTHER", "x", ChangeKind::Replace, json!({}))])
        .collect();
    submit(&storage, changes).await;
    submit(
        &storage,
        vec![product("A", "c", ChangeKind::Delete, json!({}))],
    )
    .await;
    let mut after = None;
    let mut seen = Vec::new();
    loop {
        let page = storage
            .catalog_page("A", after.clone(), 2)
            .await
            .expect("a page");
        assert_eq!(page.head, 6, "the store's head");
        seen.extend(page.entries.iter().map(|e| e.id.clone()));
        match page.entries.last() {
            Some(last) if page.entries.len() == 2 => {
                after = Some((last.entity.clone(), last.id.clone()));
            }
            _ => break,
        }
    }
    assert_eq!(
        seen,
        ["A", "B", "a", "b"],
        "deleted and other stores' left out"
    );
    let unknown = storage
        .catalog_page("NONE", None, 10)
        .await
        .expect("a page");
    assert_eq!((unknown.head, unknown.entries.len()), (0, 0));
}

async fn entity_changes_apply_and_a_deleted_entity_leaves_the_catalog<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    let replace = |fields| product("A", "P1", ChangeKind::Replace, fields);
    submit(
        &storage,
        vec![
            replace(json!({ "name": "Tea", "price": 1.0, "icon_name": "cup" })),
            price("A", "P1", 2.0),
            product("A", "P2", ChangeKind::Replace, json!({ "name": "Cake" })),
            product(
                "B",
                "P1",
                ChangeKind::Replace,
                json!({ "name": "Other store" }),
            ),
        ],
    )
    .await;
    let catalog = storage.catalog("A").await.expect("the catalog is listed");
    let listed: Vec<(&str, &str, i64)> = catalog
        .iter()
        .map(|entry| (entry.entity.as_str(), entry.id.as_str(), entry.seq))
        .collect();
    assert_eq!(listed, [("product", "P1", 2), ("product", "P2", 3)]);
    assert_eq!(
        Value::Object(catalog[0].state.clone()),
        json!({ "name": "Tea", "price": 2.0, "icon_name": "cup" })
    );
    submit(&storage, vec![replace(json!({ "name": "Green tea" }))]).await;
    assert_eq!(
        state(&storage, "A", "P1").await,
        Some(json!({ "name": "Green tea" })),
        "a replace drops the fields it does not carry"
    );
    submit(
        &storage,
        vec![product("A", "P1", ChangeKind::Delete, json!({}))],
    )
    .await;
    let ids: Vec<String> = storage
        .catalog("A")
        .await
        .expect("the catalog is listed")
        .into_iter()
        .map(|entry| entry.id)
        .collect();
    assert_eq!(ids, ["P2"]);
    // A change without an entity is sequenced, with no catalog state.
    let mut plain = price("A", "X", 1.0);
    plain.entity = None;
    plain.message_type = "note".into();
    assert_eq!(submit(&storage, vec![plain]).await, [Some(6)]);
    assert_eq!(storage.catalog("A").await.expect("listed").len(), 1);
}

async fn the_relay_sees_each_store_in_order_until_marked_published<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    for round in 0..3 {
        submit(
            &storage,
            vec![price("B", "P", f64::from(round)), price("A", "P", 1.0)],
        )
        .await;
    }
    let rows = storage.unpublished(100).await.expect("the outbox is read");
    for store in ["A", "B"] {
        let seqs: Vec<i64> = rows
            .iter()
            .filter(|row| row.store == store)
            .map(|row| row.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3], "store {store} in sequence order");
    }
    let first = rows.first().expect("rows");
    assert_eq!(first.message_type, "product_update");
    assert_eq!(first.timestamp, "2025-11-27T10:30:00Z");
    assert_eq!(
        serde_json::from_str::<Value>(&first.payload).expect("JSON"),
        json!({ "product_id": "P", "price": 0.0 }),
    );
    assert_eq!(storage.unpublished(2).await.expect("read").len(), 2);

    storage
        .mark_published(&[("A".into(), 1), ("B".into(), 1), ("B".into(), 2)])
        .await
        .expect("rows are marked");
    let left: Vec<(String, i64)> = storage
        .unpublished(100)
        .await
        .expect("read")
        .into_iter()
        .map(|row| (row.store, row.seq))
        .collect();
    assert_eq!(
        left.iter().filter(|(store, _)| store == "A").count(),
        2,
        "{left:?}"
    );
    assert!(left.contains(&("A".into(), 2)) && left.contains(&("B".into(), 3)));
    assert!(!left.contains(&("A".into(), 1)) && !left.contains(&("B".into(), 2)));
    // Marking again, or a row that does not exist, changes nothing.
    storage
        .mark_published(&[("A".into(), 1), ("Z".into(), 9)])
        .await
        .expect("rows are marked");
    assert_eq!(storage.unpublished(100).await.expect("read").len(), 3);
}

async fn changes_after_lists_later_changes_in_order_and_limited<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    let changes: Vec<NewChange> = (0..5).map(|i| price("A", "P", f64::from(i))).collect();
    let ids: Vec<String> = changes.iter().map(|c| c.message_id.clone()).collect();
    submit(&storage, changes).await;
    submit(&storage, vec![price("B", "P", 1.0)]).await;
    storage
        .mark_published(&[("A".into(), 3)])
        .await
        .expect("marked");
    let listed = storage.changes_after("A", 1, 3).await.expect("listed");
    let got: Vec<(i64, &str, bool)> = listed
        .iter()
        .map(|c| (c.row.seq, c.row.message_id.as_str(), c.published))
        .collect();
    assert_eq!(
        got,
        [
            (2, ids[1].as_str(), false),
            (3, ids[2].as_str(), true),
            (4, ids[3].as_str(), false)
        ]
    );
    assert!(listed.iter().all(|c| c.row.store == "A"));
    assert!(
        storage
            .changes_after("A", 5, 10)
            .await
            .expect("listed")
            .is_empty()
    );
    assert!(
        storage
            .changes_after("C", 0, 10)
            .await
            .expect("listed")
            .is_empty()
    );
}

async fn heads_count_each_stores_unpublished_changes<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    assert!(storage.heads().await.expect("listed").is_empty());
    submit(
        &storage,
        vec![
            price("B", "P", 1.0),
            price("A", "P", 1.0),
            price("B", "Q", 1.0),
        ],
    )
    .await;
    storage
        .mark_published(&[("B".into(), 1)])
        .await
        .expect("marked");
    assert_eq!(
        storage.heads().await.expect("listed"),
        [
            StoreHead {
                store: "A".into(),
                head: 1,
                unpublished: 1
            },
            StoreHead {
                store: "B".into(),
                head: 2,
                unpublished: 1
            },
        ]
    );
}

async fn a_replayed_key_returns_the_first_answer_and_writes_nothing<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    submit(&storage, vec![at(price("A", "P1", 1.0), 500)]).await;
    let changes = vec![
        price("A", "P2", 2.0),
        at(price("A", "P1", 9.0), 100),
        price("B", "P1", 3.0),
    ];
    let first = storage
        .submit(changes.clone(), key("office", "k1", "f1"), &spec())
        .await
        .expect("stored");
    assert!(!first.replayed);
    assert_eq!(seqs(&first.accepted), [Some(2), None, Some(1)]);
    // The same request again, even with new message ids, is not stored again.
    let mut again = changes.clone();
    for change in &mut again {
        change.message_id = uuid::Uuid::now_v7().to_string();
    }
    let replayed = storage
        .submit(again, key("office", "k1", "f1"), &spec())
        .await
        .expect("replayed");
    assert!(replayed.replayed);
    assert_eq!(replayed.accepted, first.accepted);
    assert_eq!(outbox_seqs(&storage, "A").await, [1, 2]);
    assert_eq!(outbox_seqs(&storage, "B").await, [1]);
}

async fn a_key_reused_for_another_request_is_refused<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    storage
        .submit(
            vec![price("A", "P", 1.0)],
            key("office", "k1", "f1"),
            &spec(),
        )
        .await
        .expect("stored");
    let err = storage
        .submit(
            vec![price("A", "P", 2.0)],
            key("office", "k1", "f2"),
            &spec(),
        )
        .await
        .expect_err("another request under the same key");
    assert!(
        matches!(&err, StorageError::KeyReused { key } if key == "k1"),
        "{err}"
    );
    assert!(err.to_string().contains("use a new key"), "{err}");
    assert_eq!(outbox_seqs(&storage, "A").await, [1]);
}

async fn the_same_key_from_another_client_is_independent<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    let one = storage
        .submit(
            vec![price("A", "P", 1.0)],
            key("office", "k1", "f1"),
            &spec(),
        )
        .await
        .expect("stored");
    let other = storage
        .submit(vec![price("A", "P", 2.0)], key("shop", "k1", "f2"), &spec())
        .await
        .expect("stored");
    assert!(!other.replayed);
    assert_eq!(seqs(&one.accepted), [Some(1)]);
    assert_eq!(seqs(&other.accepted), [Some(2)]);
}

async fn concurrent_replays_of_one_key_write_once<H: Harness>() {
    let db = H::fresh().await;
    let storage = Arc::new(db.open().await);
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let storage = Arc::clone(&storage);
            tokio::spawn(async move {
                storage
                    .submit(
                        vec![price("A", "P", 1.0), price("A", "Q", 1.0)],
                        key("office", "same", "f"),
                        &spec(),
                    )
                    .await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(
            task.await
                .expect("the task ran")
                .expect("stored or replayed"),
        );
    }
    assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1);
    assert!(answers.iter().all(|a| a.accepted == answers[0].accepted));
    assert_eq!(outbox_seqs(&*storage, "A").await, [1, 2]);
}

async fn tokens_are_created_listed_found_and_revoked<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    let office = TokenRecord {
        name: "office".into(),
        hash: "a".repeat(64),
        stores: None,
        created_at: 1_700_000_000,
    };
    let shop = TokenRecord {
        name: "shop".into(),
        hash: "b".repeat(64),
        stores: Some(vec!["A".into(), "B".into()]),
        created_at: 1_700_000_001,
    };
    storage.create_token(shop.clone()).await.expect("created");
    storage.create_token(office.clone()).await.expect("created");
    let err = storage
        .create_token(TokenRecord {
            hash: "c".repeat(64),
            ..office.clone()
        })
        .await
        .expect_err("the name is taken");
    assert!(
        matches!(&err, StorageError::TokenExists(name) if name == "office"),
        "{err}"
    );
    assert_eq!(
        storage.tokens().await.expect("listed"),
        [office.clone(), shop.clone()]
    );
    assert_eq!(
        storage.token_by_hash(&shop.hash).await.expect("found"),
        Some(shop.clone())
    );
    assert_eq!(
        storage
            .token_by_hash(&"c".repeat(64))
            .await
            .expect("looked up"),
        None
    );
    assert!(storage.revoke_token("office").await.expect("revoked"));
    assert!(!storage.revoke_token("office").await.expect("looked up"));
    assert_eq!(
        storage
            .token_by_hash(&office.hash)
            .await
            .expect("looked up"),
        None
    );
    assert_eq!(storage.tokens().await.expect("listed"), [shop]);
}

async fn one_storage_at_a_time_leads_the_relay<H: Harness>() {
    let db = H::fresh().await;
    let first = db.open().await;
    let second = db.open().await;
    assert!(first.lead_relay().await.expect("asked"));
    assert!(first.lead_relay().await.expect("asked"), "it keeps leading");
    assert!(!second.lead_relay().await.expect("asked"));
    drop(first);
    // The database may notice the first one's end a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !second.lead_relay().await.expect("asked") {
        assert!(
            Instant::now() < deadline,
            "the second storage never took the relay over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn what_was_answered_is_there_after_reopening<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    submit(&storage, vec![price("A", "P", 1.0), price("A", "P", 2.0)]).await;
    drop(storage);
    let storage = db.open().await;
    assert_eq!(outbox_seqs(&storage, "A").await, [1, 2]);
    assert_eq!(
        state(&storage, "A", "P").await,
        Some(json!({ "price": 2.0 }))
    );
    assert_eq!(
        submit(&storage, vec![price("A", "P", 3.0)]).await,
        [Some(3)]
    );
}

/// Submits `tasks` x `rounds` submissions of three changes across stores A
/// and B, spread over `storages`, all at once; then checks that each store
/// holds exactly 1..=N.
async fn submit_concurrently<S: Storage>(storages: &[Arc<S>], tasks: usize, rounds: usize) {
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let storage = Arc::clone(&storages[task % storages.len()]);
            tokio::spawn(async move {
                let mut answered = Vec::new();
                for round in 0..rounds {
                    let id = format!("T{task}-{round}");
                    let submitted = storage
                        .submit(
                            vec![
                                price("A", &id, 1.0),
                                price("B", &id, 1.0),
                                price("A", "X", 2.0),
                            ],
                            None,
                            &spec(),
                        )
                        .await
                        .expect("the submission is stored");
                    answered.extend(submitted.accepted);
                }
                answered
            })
        })
        .collect();
    let mut answered: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for handle in handles {
        for accepted in handle.await.expect("the task ran") {
            let Outcome::Sequenced { seq } = accepted.outcome else {
                panic!("no change here is stale");
            };
            answered.entry(accepted.store).or_default().push(seq);
        }
    }
    let storage = &storages[0];
    for (store, per_submission) in [("A", 2), ("B", 1)] {
        let n = i64::try_from(tasks * rounds * per_submission).expect("small");
        let expected: Vec<i64> = (1..=n).collect();
        let mut seqs = answered.remove(store).expect("answers");
        seqs.sort_unstable();
        assert_eq!(seqs, expected, "store {store}'s answers");
        assert_eq!(
            outbox_seqs(&**storage, store).await,
            expected,
            "store {store}'s outbox"
        );
        assert_eq!(head(&**storage, store).await, n);
    }
}

async fn concurrent_submitters_get_every_seq_exactly_once<H: Harness>() {
    let db = H::fresh().await;
    let storage = Arc::new(db.open().await);
    submit_concurrently(&[storage], 8, 50).await;
}

async fn two_storages_on_one_database_never_share_a_seq<H: Harness>() {
    let db = H::fresh().await;
    let storages = [Arc::new(db.open().await), Arc::new(db.open().await)];
    submit_concurrently(&storages, 8, 25).await;
}

/// Two backend processes on one PostgreSQL database, each with its pool,
/// submitting at once: each store's sequence is still 1..=N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_instances_starting_together_share_one_gapless_sequence() {
    let db = Postgres::fresh().await;
    // Both migrate the new database at the same moment.
    let (one, two) = tokio::join!(db.open(), db.open());
    submit_concurrently(&[Arc::new(one), Arc::new(two)], 8, 50).await;
}

async fn each_database_has_its_own_catalog_id_kept_across_reopening<H: Harness>() {
    // The guarantee: a database's catalog id is made once, with it, and
    // another database (or one made again) has another.
    let db = H::fresh().await;
    let id = db.open().await.catalog_id().await.expect("a catalog id");
    assert!(id.len() >= 16, "{id}");
    let (one, two) = (db.open().await, db.open().await);
    assert_eq!(one.catalog_id().await.expect("read again"), id);
    assert_eq!(two.catalog_id().await.expect("read again"), id);
    let other = H::fresh().await;
    assert_ne!(
        other.open().await.catalog_id().await.expect("a catalog id"),
        id
    );
}

async fn a_schema_from_a_later_possync_is_refused<H: Harness>() {
    let db = H::fresh().await;
    drop(db.open().await);
    db.mark_schema_newer().await;
    let err = db.open_err().await;
    assert!(err.to_string().contains("upgrade possync"), "{err}");
}

async fn json_with_an_escaped_nul_is_stored_by_every_storage<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    let change = product(
        "A",
        "P1",
        ChangeKind::Replace,
        json!({ "name": "Tea\u{0}cup" }),
    );
    assert!(change.payload.contains("\\u0000"), "{}", change.payload);
    assert_eq!(submit(&storage, vec![change]).await, [Some(1)]);
    assert_eq!(
        state(&storage, "A", "P1").await,
        Some(json!({ "name": "Tea\u{0}cup" }))
    );
}

fn note(store: &str, micros: Option<i64>) -> NewChange {
    let mut change = price(store, "X", 1.0);
    change.entity = None;
    change.message_type = "note".into();
    change.clock = micros.map(|micros| Version {
        micros,
        exact: true,
    });
    change
}

async fn an_undeclared_type_from_the_exchange_is_stale_behind_a_newer_clock_of_its_type<
    H: Harness,
>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    assert_eq!(
        submit(&storage, vec![note("A", Some(200)), note("A", Some(100))]).await,
        [Some(1), None],
        "terminals would end on the older change"
    );
    assert_eq!(
        submit(&storage, vec![note("A", Some(150))]).await,
        [None],
        "the clock is kept across submissions"
    );
    let mut other_type = note("A", Some(100));
    other_type.message_type = "memo".into();
    assert_eq!(
        submit(&storage, vec![other_type, note("B", Some(100))]).await,
        [Some(2), Some(1)],
        "another type or another store is judged apart"
    );
    assert_eq!(
        submit(&storage, vec![note("A", None), note("A", Some(300))]).await,
        [Some(3), Some(4)],
        "a change from the API orders by arrival; a newer clock is sequenced"
    );
}

async fn a_message_id_already_in_a_stores_outbox_is_refused<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    let with_id = |store: &str, value: f64| {
        let mut change = price(store, "P", value);
        change.message_id = "m-1".into();
        change
    };
    submit(&storage, vec![with_id("A", 1.0)]).await;
    let err = storage
        .submit(vec![price("A", "Q", 1.0), with_id("A", 2.0)], None, &spec())
        .await
        .expect_err("the id is taken");
    assert!(err.to_string().contains("m-1"), "{err}");
    let err = storage
        .submit(vec![with_id("C", 1.0), with_id("C", 2.0)], None, &spec())
        .await
        .expect_err("twice in one submission");
    assert!(err.to_string().contains("m-1"), "{err}");
    assert_eq!(outbox_seqs(&storage, "A").await, [1], "nothing was written");
    assert_eq!(submit(&storage, vec![with_id("B", 1.0)]).await, [Some(1)]);
}

async fn a_store_whose_sequence_is_exhausted_refuses_the_next_change<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    submit(&storage, vec![price("A", "P", 1.0)]).await;
    db.raw("UPDATE stores SET head = 9223372036854775807").await;
    let err = storage
        .submit(vec![price("A", "P", 2.0)], None, &spec())
        .await
        .expect_err("no number is left");
    assert!(err.to_string().contains("sequence"), "{err}");
    assert_eq!(outbox_seqs(&storage, "A").await, [1]);
}

#[tokio::test]
async fn a_sqlite_database_in_memory_is_refused() {
    for path in [":memory:", "", "file:catalog?mode=memory&cache=shared"] {
        let err = SqliteStorage::open(path)
            .await
            .expect_err("private to each connection");
        assert!(err.to_string().contains("file"), "{path:?}: {err}");
    }
}

/// Terminates the server process holding the relay's lock, as a failover
/// or an administrator would.
async fn terminate_relay_lock_holder(db: &Postgres) -> u64 {
    let admin = postgres_admin().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l
             JOIN pg_database d ON d.oid = l.database
             WHERE l.locktype = 'advisory' AND d.datname = $1",
            &[&db.name],
        )
        .await
        .expect("the lock holder is terminated")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_relay_lock_lost_with_its_connection_is_noticed_and_taken_over() {
    let db = Postgres::fresh().await;
    let first = db.open().await;
    let second = db.open().await;
    assert!(first.lead_relay().await.expect("asked"));
    assert!(!second.lead_relay().await.expect("asked"));
    assert_eq!(terminate_relay_lock_holder(&db).await, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !second.lead_relay().await.expect("asked") {
        assert!(
            Instant::now() < deadline,
            "the second storage never took the relay over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !first.lead_relay().await.expect("asked"),
        "the first storage knows it no longer leads"
    );
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !first.lead_relay().await.expect("asked") {
        assert!(
            Instant::now() < deadline,
            "the first storage never took the relay back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn idempotency_keys_older_than_the_retention_are_forgotten<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    storage
        .submit(
            vec![price("A", "P", 1.0)],
            key("office", "old", "f1"),
            &spec(),
        )
        .await
        .expect("stored");
    assert_eq!(
        storage
            .prune_keys(Duration::from_secs(3600))
            .await
            .expect("pruned"),
        0,
        "a key younger than the retention stays"
    );
    db.age_keys(7200).await;
    storage
        .submit(
            vec![price("A", "Q", 1.0)],
            key("office", "new", "f2"),
            &spec(),
        )
        .await
        .expect("stored");
    assert_eq!(
        storage
            .prune_keys(Duration::from_secs(3600))
            .await
            .expect("pruned"),
        1
    );
    let again = storage
        .submit(
            vec![price("A", "P", 1.0)],
            key("office", "old", "f1"),
            &spec(),
        )
        .await
        .expect("stored");
    assert!(!again.replayed, "a forgotten key is applied again");
    let replayed = storage
        .submit(
            vec![price("A", "Q", 1.0)],
            key("office", "new", "f2"),
            &spec(),
        )
        .await
        .expect("replayed");
    assert!(replayed.replayed, "a kept key still replays");
}

fn order(store: &str, terminal: &str, message_id: &str) -> UpstreamRecord {
    UpstreamRecord {
        store: store.into(),
        terminal: terminal.into(),
        message_type: "order".into(),
        message_id: message_id.into(),
        created_at: "2026-12-02T10:00:00Z".into(),
        payload: format!(r#"{{"order_id":"{message_id}"}}"#),
    }
}

async fn received<S: Storage>(storage: &S, store: &str, after: i64) -> Vec<(i64, String, String)> {
    storage
        .upstream_after(store, None, after, 100)
        .await
        .expect("read")
        .into_iter()
        .map(|r| (r.cursor, r.record.terminal, r.record.message_id))
        .collect()
}

async fn upstream_messages_are_recorded_once_each_in_arrival_order<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    let new = storage
        .record_upstream(vec![
            order("A", "t1", "m1"),
            order("A", "t2", "m1"),
            order("B", "t1", "m1"),
        ])
        .await
        .expect("recorded");
    assert_eq!(new, [true, true, true], "ids are per store and terminal");
    let again = storage
        .record_upstream(vec![
            order("A", "t1", "m2"),
            order("A", "t1", "m1"),
            order("A", "t1", "m3"),
        ])
        .await
        .expect("recorded");
    assert_eq!(again, [true, false, true], "a copy is left out");
    let a = received(&storage, "A", 0).await;
    let names: Vec<(&str, &str)> = a.iter().map(|(_, t, m)| (t.as_str(), m.as_str())).collect();
    assert_eq!(
        names,
        [("t1", "m1"), ("t2", "m1"), ("t1", "m2"), ("t1", "m3")]
    );
    assert!(a.windows(2).all(|w| w[0].0 < w[1].0), "cursors grow: {a:?}");
    let after_second = received(&storage, "A", a[1].0).await;
    assert_eq!(after_second.len(), 2, "read on after a cursor");
    let orders_only = storage
        .upstream_after("A", Some("receipt"), 0, 100)
        .await
        .expect("read");
    assert!(orders_only.is_empty(), "filtered by type");
    let limited = storage.upstream_after("A", None, 0, 1).await.expect("read");
    assert_eq!(limited.len(), 1);
    assert_eq!(received(&storage, "B", 0).await.len(), 1, "stores apart");
    let every_store: Vec<(String, String, String)> = storage
        .upstream_since(0, 100)
        .await
        .expect("read")
        .into_iter()
        .map(|r| (r.record.store, r.record.terminal, r.record.message_id))
        .collect();
    let read: Vec<(&str, &str, &str)> = every_store
        .iter()
        .map(|(s, t, m)| (s.as_str(), t.as_str(), m.as_str()))
        .collect();
    assert_eq!(
        read,
        [
            ("A", "t1", "m1"),
            ("A", "t2", "m1"),
            ("B", "t1", "m1"),
            ("A", "t1", "m2"),
            ("A", "t1", "m3")
        ],
        "every store's, in the order recorded"
    );
    let after_b = storage.upstream_since(a[1].0, 2).await.expect("read");
    let stores: Vec<&str> = after_b.iter().map(|r| r.record.store.as_str()).collect();
    assert_eq!(stores, ["B", "A"], "after a cursor, at most the limit");
    drop(storage);
    let reopened = db.open().await;
    assert_eq!(received(&reopened, "A", 0).await, a, "durable");
}

async fn a_refused_upstream_batch_records_none_of_it<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    let mut bad = order("A", "t1", "m2");
    bad.payload = "not json".into();
    let refused = storage
        .record_upstream(vec![order("A", "t1", "m1"), bad])
        .await
        .expect_err("a payload that is not JSON is refused");
    assert!(!refused.is_transient(), "{refused}");
    assert!(received(&storage, "A", 0).await.is_empty(), "nothing of it");
}

fn receipt(
    store: &str,
    terminal: &str,
    run: &str,
    n: u64,
    applied: i64,
    seen_ms: i64,
) -> ReceiptRecord {
    ReceiptRecord {
        store: store.into(),
        terminal: terminal.into(),
        receipt: possync_core::Receipt {
            applied_up_to: applied,
            highest_applied: applied,
            quarantined: 2,
            outbox: 3,
            stopping: false,
            verified_seq: None,
            gap: None,
            run: run.into(),
            n,
        },
        seen_ms,
    }
}

async fn the_latest_receipt_of_a_run_wins_and_a_new_run_replaces_it<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    storage
        .record_receipts(vec![receipt("A", "t1", "r1", 2, 10, 1_000)])
        .await
        .expect("recorded");
    // A late receipt of the same run (redelivered) changes nothing.
    storage
        .record_receipts(vec![receipt("A", "t1", "r1", 1, 5, 2_000)])
        .await
        .expect("recorded");
    let fleet = storage.fleet(Some("A")).await.expect("fleet");
    assert_eq!(fleet.len(), 1);
    assert_eq!(
        (
            fleet[0].applied_up_to,
            fleet[0].last_seen_ms,
            fleet[0].applied_changed_ms
        ),
        (10, 1_000, 1_000)
    );
    assert_eq!((fleet[0].quarantined, fleet[0].outbox), (2, 3));
    // The same applied seq later: seen again, not moved.
    storage
        .record_receipts(vec![receipt("A", "t1", "r1", 3, 10, 3_000)])
        .await
        .expect("recorded");
    let fleet = storage.fleet(Some("A")).await.expect("fleet");
    assert_eq!(
        (fleet[0].last_seen_ms, fleet[0].applied_changed_ms),
        (3_000, 1_000)
    );
    // A new run (a restart, a database restored from a backup) may report less.
    storage
        .record_receipts(vec![
            receipt("A", "t1", "r2", 1, 4, 4_000),
            receipt("B", "t1", "r9", 1, 1, 4_000),
        ])
        .await
        .expect("recorded");
    let fleet = storage.fleet(Some("A")).await.expect("fleet");
    assert_eq!(
        (
            fleet[0].applied_up_to,
            fleet[0].applied_changed_ms,
            fleet[0].first_seen_ms
        ),
        (4, 4_000, 1_000)
    );
    let all = storage.fleet(None).await.expect("fleet");
    let names: Vec<(&str, &str)> = all
        .iter()
        .map(|t| (t.store.as_str(), t.terminal.as_str()))
        .collect();
    assert_eq!(names, [("A", "t1"), ("B", "t1")]);
}

async fn a_forgotten_terminal_leaves_the_fleet<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    storage
        .record_receipts(vec![
            receipt("A", "t1", "r1", 1, 1, 1_000),
            receipt("A", "t2", "r1", 1, 1, 1_000),
        ])
        .await
        .expect("recorded");
    assert!(storage.forget_terminal("A", "t1").await.expect("forgotten"));
    assert!(
        !storage.forget_terminal("A", "t1").await.expect("answered"),
        "once"
    );
    let fleet = storage.fleet(Some("A")).await.expect("fleet");
    assert_eq!(fleet.len(), 1);
    assert_eq!(fleet[0].terminal, "t2");
}

/// A store's checksums under `spec`, computed from scratch from its catalog.
async fn from_scratch<S: Storage>(
    storage: &S,
    store: &str,
    spec: &ChecksumSpec,
) -> BTreeMap<String, Checksum> {
    let mut checksums: BTreeMap<String, Checksum> = spec
        .kinds()
        .map(|kind| (kind.to_owned(), Checksum::default()))
        .collect();
    for entry in storage.catalog(store).await.expect("the catalog") {
        if let Some(digest) = spec.digest(&entry.entity, &entry.id, &entry.state) {
            checksums.entry(entry.entity).or_default().add(digest);
        }
    }
    checksums
}

/// A store's checksums as stored under `spec`.
async fn stored<S: Storage>(
    storage: &S,
    store: &str,
    spec: &ChecksumSpec,
) -> Option<BTreeMap<String, Checksum>> {
    storage
        .checkpoint(store, spec)
        .await
        .expect("the checkpoint is read")
        .checksums
}

fn category(store: &str, id: &str, name: &str) -> NewChange {
    let mut change = product(store, id, ChangeKind::Replace, json!({ "name": name }));
    change.message_type = "category_update".into();
    if let Some(entity) = change.entity.as_mut() {
        entity.entity = "category".into();
    }
    change
}

fn modifier(store: &str, id: &str) -> NewChange {
    let mut change = product(store, id, ChangeKind::Replace, json!({ "name": "extra" }));
    change.message_type = "modifier_update".into();
    if let Some(entity) = change.entity.as_mut() {
        entity.entity = "modifier".into();
    }
    change
}

fn delete(store: &str, id: &str) -> NewChange {
    product(store, id, ChangeKind::Delete, json!({}))
}

/// Replaces, merges, deletes, a product deleted and made again, a stale
/// change, kinds with and without a checksum, several stores, and
/// concurrent submissions on two storages.
async fn a_busy_day<S: Storage + 'static>(storages: &[Arc<S>]) {
    let storage = &storages[0];
    submit(
        &**storage,
        vec![
            product(
                "A",
                "P1",
                ChangeKind::Replace,
                json!({"price": 1.5, "name": "Tea"}),
            ),
            product(
                "A",
                "P2",
                ChangeKind::Replace,
                json!({"price": 2, "name": "Coffee"}),
            ),
            category("A", "C1", "Drinks"),
            modifier("A", "M1"),
            note("A", None),
            product(
                "B",
                "P1",
                ChangeKind::Replace,
                json!({"price": 1.5, "name": "Tea"}),
            ),
        ],
    )
    .await;
    submit(
        &**storage,
        vec![
            price("A", "P1", 1.75),
            product("A", "P2", ChangeKind::Merge, json!({"name": "Espresso"})),
            delete("A", "P2"),
            product("A", "P3", ChangeKind::Merge, json!({"price": 3})),
            delete("B", "P1"),
            category("B", "C1", "Food"),
        ],
    )
    .await;
    submit(
        &**storage,
        vec![
            product("A", "P2", ChangeKind::Replace, json!({"price": 2.25})),
            delete("A", "P9"),
            at(price("C", "P1", 9.0), 200),
        ],
    )
    .await;
    let stale = submit(&**storage, vec![at(price("C", "P1", 1.0), 100)]).await;
    assert_eq!(stale, [None], "stale: changes nothing");
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..4 {
        let storage = Arc::clone(&storages[task % storages.len()]);
        tasks.spawn(async move {
            for round in 0..10 {
                // Not A, whose catalog the tests count.
                let store = ["B", "D", "E"][(task + round) % 3];
                let id = format!("Q{}", round % 4);
                let change = match (task + round) % 4 {
                    0 => delete(store, &id),
                    1 => product(store, &id, ChangeKind::Replace, json!({"name": id})),
                    _ => price(store, &id, (task * 100 + round) as f64),
                };
                storage
                    .submit(
                        vec![change, price(store, "P7", round as f64)],
                        None,
                        &spec(),
                    )
                    .await
                    .expect("stored");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a submitter");
    }
}

async fn checksums_kept_by_every_submission_are_those_of_the_catalog<H: Harness>() {
    let db = H::fresh().await;
    let storages = [Arc::new(db.open().await), Arc::new(db.open().await)];
    let storage = &storages[0];
    assert_eq!(
        storage.sync_checksums(&spec()).await.expect("synced"),
        Some(Recomputed {
            stores: 0,
            entities: 0
        }),
        "a new database keeps no spec's checksums yet"
    );
    assert_eq!(
        storages[1].sync_checksums(&spec()).await.expect("synced"),
        None,
        "kept under this spec now"
    );
    a_busy_day(&storages).await;
    for store in ["A", "B", "C", "D", "E"] {
        let expected = from_scratch(&**storage, store, &spec()).await;
        assert_eq!(
            stored(&**storage, store, &spec()).await,
            Some(expected.clone()),
            "store {store}"
        );
        // Each store's last submission moved a checksum: the log has its
        // head, concurrent submissions or not.
        assert_eq!(
            storage
                .checkpoint_at(store, i64::MAX, &spec())
                .await
                .expect("read"),
            Some((head(&**storage, store).await, expected.clone())),
            "store {store}'s log at its head"
        );
        assert_eq!(
            expected.keys().collect::<Vec<_>>(),
            ["category", "product"],
            "every kind of the spec, and only those"
        );
    }
    let a = from_scratch(&**storage, "A", &spec()).await;
    assert_eq!(
        (a["product"].count, a["category"].count),
        (3, 1),
        "P1, P2 made again and P3, and C1: {a:?}"
    );
    assert_eq!(
        stored(&**storage, "NEW", &spec()).await,
        Some(from_scratch(&**storage, "NEW", &spec()).await),
        "a store with no change has the zero checksum of every kind"
    );
}

async fn checksums_are_computed_again_for_another_spec_and_kept_under_one_only<H: Harness>() {
    let db = H::fresh().await;
    let storages = [Arc::new(db.open().await)];
    let storage = &*storages[0];
    storage.sync_checksums(&spec()).await.expect("synced");
    a_busy_day(&storages).await;
    let kept = stored(storage, "A", &spec()).await;
    // A plugin that now exports only a product's price.
    let fields = ["price".to_owned()];
    let other = ChecksumSpec::new([("product", fields.as_slice())]);
    let recomputed = storage
        .sync_checksums(&other)
        .await
        .expect("synced")
        .expect("computed again");
    let (mut entities, mut stores) = (0, 0);
    for store in ["A", "B", "C", "D", "E"] {
        let expected = from_scratch(storage, store, &other).await;
        entities += expected["product"].count;
        stores += u64::from(expected["product"].count > 0);
        assert_eq!(stored(storage, store, &other).await, Some(expected));
        assert_eq!(
            stored(storage, store, &spec()).await,
            None,
            "no longer kept under the first spec"
        );
    }
    assert_eq!((recomputed.entities, recomputed.stores), (entities, stores));
    // A submission under the first spec (a backend process with other
    // plugins) cannot keep them: they are stale until computed again.
    submit(storage, vec![price("A", "P1", 4.0)]).await;
    assert_eq!(stored(storage, "A", &other).await, None, "stale");
    assert!(
        storage
            .sync_checksums(&other)
            .await
            .expect("synced")
            .is_some()
    );
    assert_eq!(
        stored(storage, "A", &other).await,
        Some(from_scratch(storage, "A", &other).await)
    );
    // Back to the first spec: the same as the ones kept change by change.
    storage.sync_checksums(&spec()).await.expect("synced");
    submit(storage, vec![price("A", "P1", 1.75)]).await;
    assert_eq!(stored(storage, "A", &spec()).await, kept);
    let db2 = H::fresh().await;
    let empty = db2.open().await;
    assert_eq!(
        empty.sync_checksums(&other).await.expect("synced"),
        Some(Recomputed {
            stores: 0,
            entities: 0
        })
    );
}

async fn a_checkpoint_says_whether_its_store_has_unpublished_changes<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    storage.sync_checksums(&spec()).await.expect("synced");
    submit(
        &storage,
        vec![
            price("A", "P1", 1.0),
            price("A", "P2", 2.0),
            price("B", "P1", 1.0),
            price("A", "P3", 3.0),
        ],
    )
    .await;
    let checkpoint = storage.checkpoint("A", &spec()).await.expect("read");
    assert_eq!(
        (checkpoint.head, checkpoint.highest_unpublished),
        (3, Some(3))
    );
    storage
        .mark_published(&[("A".into(), 1), ("A".into(), 3), ("B".into(), 1)])
        .await
        .expect("marked");
    let checkpoint = storage.checkpoint("A", &spec()).await.expect("read");
    assert_eq!(
        checkpoint.highest_unpublished,
        Some(2),
        "a row below the last marked one is still to publish"
    );
    storage
        .mark_published(&[("A".into(), 2)])
        .await
        .expect("marked");
    let checkpoint = storage.checkpoint("A", &spec()).await.expect("read");
    assert_eq!((checkpoint.head, checkpoint.highest_unpublished), (3, None));
    assert_eq!(
        checkpoint.checksums,
        Some(from_scratch(&storage, "A", &spec()).await)
    );
    assert_eq!(
        checkpoint.checksums.as_ref().map(|c| c["product"].count),
        Some(3)
    );
    let unknown = storage.checkpoint("Z", &spec()).await.expect("read");
    assert_eq!((unknown.head, unknown.highest_unpublished), (0, None));
}

async fn a_receipt_records_what_its_terminal_verified_and_the_gap_it_has_open<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    let mut first = receipt("A", "t1", "r1", 1, 10, 1_000);
    first.receipt.verified_seq = Some(8);
    first.receipt.gap = Some("the checksum of product differs".into());
    storage
        .record_receipts(vec![first, receipt("A", "t2", "r1", 1, 10, 1_000)])
        .await
        .expect("recorded");
    let fleet = storage.fleet(Some("A")).await.expect("fleet");
    let shown: Vec<(Option<i64>, Option<&str>)> = fleet
        .iter()
        .map(|t| (t.verified_seq, t.gap.as_deref()))
        .collect();
    assert_eq!(
        shown,
        [
            (Some(8), Some("the checksum of product differs")),
            (None, None)
        ]
    );
    // The next receipt says what holds now: the gap closed.
    let mut next = receipt("A", "t1", "r1", 2, 12, 2_000);
    next.receipt.verified_seq = Some(12);
    storage.record_receipts(vec![next]).await.expect("recorded");
    let fleet = storage.fleet(Some("A")).await.expect("fleet");
    assert_eq!(
        (fleet[0].verified_seq, fleet[0].gap.as_deref()),
        (Some(12), None)
    );
}

fn delete_category(store: &str, id: &str) -> NewChange {
    let mut change = category(store, id, "");
    if let Some(entity) = change.entity.as_mut() {
        entity.kind = ChangeKind::Delete;
        entity.fields.clear();
    }
    change
}

/// Every kind of `spec` with no entity.
fn zero(spec: &ChecksumSpec) -> BTreeMap<String, Checksum> {
    spec.kinds()
        .map(|kind| (kind.to_owned(), Checksum::default()))
        .collect()
}

/// The checksum log's submissions: replaces, merges, deletes (one of an
/// entity never seen), writes that change nothing, a kind without a
/// checksum, changes without an entity, two stores, kinds some leave
/// alone, and a store whose first submission moves no checksum.
fn log_submissions() -> Vec<Vec<NewChange>> {
    vec![
        vec![
            product(
                "A",
                "P1",
                ChangeKind::Replace,
                json!({"price": 1.5, "name": "Tea"}),
            ),
            product(
                "A",
                "P2",
                ChangeKind::Replace,
                json!({"price": 2, "name": "Coffee"}),
            ),
            note("A", None),
        ],
        vec![note("B", None)],
        vec![
            price("A", "P1", 2.0),
            category("B", "C1", "Food"),
            price("B", "P1", 1.0),
        ],
        vec![modifier("A", "M1")],
        vec![note("A", None), note("A", None)],
        vec![
            delete("A", "P2"),
            category("A", "C1", "Drinks"),
            product("A", "P3", ChangeKind::Merge, json!({"price": 3})),
        ],
        vec![
            product("A", "P1", ChangeKind::Merge, json!({"name": "Green tea"})),
            delete("B", "P1"),
        ],
        vec![delete("A", "P9"), price("A", "P3", 3.0)],
        vec![category("A", "C1", "Drinks")],
        vec![
            delete_category("B", "C1"),
            product("B", "P1", ChangeKind::Replace, json!({"price": 4})),
            note("B", None),
        ],
        vec![modifier("B", "M1"), note("A", None)],
    ]
}

/// What the log's submissions left, per store: at each boundary (the end
/// of a submission), the checksums computed from scratch from the catalog
/// there, and whether it moved a checksum of its store (or was its first).
type Boundaries = BTreeMap<String, BTreeMap<i64, (bool, BTreeMap<String, Checksum>)>>;

/// Submits the log's submissions, one at a time, reading after each the
/// catalog of each store it changed.
async fn log_a_day<S: Storage>(storage: &S) -> Boundaries {
    let spec = spec();
    let mut boundaries = Boundaries::new();
    for changes in log_submissions() {
        let kinds: Vec<(String, Option<String>)> = changes
            .iter()
            .map(|c| (c.store.clone(), c.entity.as_ref().map(|e| e.entity.clone())))
            .collect();
        let seqs = submit(storage, changes).await;
        let mut ends: BTreeMap<String, (i64, bool)> = BTreeMap::new();
        for ((store, kind), seq) in kinds.into_iter().zip(seqs) {
            let Some(seq) = seq else { continue };
            let first = !boundaries.contains_key(&store);
            let moves = kind.is_some_and(|kind| spec.fields(&kind).is_some());
            let end = ends.entry(store).or_insert((seq, first));
            end.0 = end.0.max(seq);
            end.1 |= moves;
        }
        for (store, (end, logged)) in ends {
            let expected = from_scratch(storage, &store, &spec).await;
            boundaries
                .entry(store)
                .or_default()
                .insert(end, (logged, expected));
        }
    }
    boundaries
}

/// What the log answers for `store` at or below each seq from 0 to its
/// head and a little beyond.
async fn log_answers<S: Storage>(
    storage: &S,
    store: &str,
    spec: &ChecksumSpec,
) -> Vec<Option<(i64, BTreeMap<String, Checksum>)>> {
    let mut answers = Vec::new();
    for up_to in 0..=head(storage, store).await + 2 {
        answers.push(
            storage
                .checkpoint_at(store, up_to, spec)
                .await
                .expect("the log is read"),
        );
    }
    answers
}

async fn the_checksum_log_states_the_checksums_at_every_boundary<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    storage.sync_checksums(&spec()).await.expect("synced");
    let boundaries = log_a_day(&storage).await;
    for (store, ends) in &boundaries {
        let answers = log_answers(&storage, store, &spec()).await;
        for (up_to, answer) in answers.iter().enumerate() {
            let up_to = i64::try_from(up_to).expect("small");
            // The last boundary at or below it that moved a checksum.
            let expected = ends
                .range(..=up_to)
                .rev()
                .find(|(_, (logged, _))| *logged)
                .map(|(end, (_, checksums))| (*end, checksums.clone()));
            assert_eq!(answer, &expected, "store {store} up to {up_to}");
        }
        for (end, (_, checksums)) in ends {
            // A boundary that moved no checksum: the one before states it.
            let answer = answers[usize::try_from(*end).expect("small")].as_ref();
            assert_eq!(
                answer.map(|(_, at)| at),
                Some(checksums),
                "store {store} at {end}"
            );
        }
        assert_eq!(
            answers.last().cloned().flatten().map(|(_, at)| at),
            Some(from_scratch(&storage, store, &spec()).await),
            "store {store}: above its head, the head's"
        );
    }
    // What the day covers: boundaries that log and boundaries that do not,
    // a kind one store's submission leaves alone, both stores.
    let a = &boundaries["A"];
    assert_eq!(
        a.keys().copied().collect::<Vec<_>>(),
        [3, 4, 5, 7, 10, 11, 13, 14, 15]
    );
    assert_eq!(
        a.values().map(|(logged, _)| *logged).collect::<Vec<_>>(),
        [true, true, false, false, true, true, true, true, false]
    );
    assert_eq!(
        boundaries["B"].keys().copied().collect::<Vec<_>>(),
        [1, 3, 4, 7, 8]
    );
    assert_eq!(
        log_answers(&storage, "B", &spec()).await[1],
        Some((1, zero(&spec()))),
        "a store's first submission logs every kind, even moving none"
    );
    assert_eq!(
        storage.checkpoint_at("Z", 10, &spec()).await.expect("read"),
        None,
        "a store without a change has no boundary"
    );
    let fields = ["price".to_owned()];
    let other = ChecksumSpec::new([("product", fields.as_slice())]);
    assert_eq!(
        storage.checkpoint_at("A", 10, &other).await.expect("read"),
        None,
        "kept under another spec"
    );
}

async fn computing_the_checksums_again_starts_the_log_at_each_stores_head<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    storage.sync_checksums(&spec()).await.expect("synced");
    log_a_day(&storage).await;
    // A store no entity of a kind with a checksum ever reached.
    submit(&storage, vec![note("N", None), modifier("N", "M1")]).await;
    let fields = ["price".to_owned()];
    let other = ChecksumSpec::new([("product", fields.as_slice())]);
    storage
        .sync_checksums(&other)
        .await
        .expect("synced")
        .expect("computed again");
    for store in ["A", "B", "N"] {
        let head = head(&storage, store).await;
        let at_head = Some((head, from_scratch(&storage, store, &other).await));
        let answers = log_answers(&storage, store, &other).await;
        for (up_to, answer) in answers.iter().enumerate() {
            let up_to = i64::try_from(up_to).expect("small");
            let expected = if up_to < head { None } else { at_head.clone() };
            assert_eq!(answer, &expected, "store {store} up to {up_to}");
        }
        assert_eq!(
            storage
                .checkpoint_at(store, head, &spec())
                .await
                .expect("read"),
            None,
            "no longer kept under the first spec"
        );
    }
    assert_eq!(
        storage
            .checkpoint_at("N", i64::MAX, &other)
            .await
            .expect("read"),
        Some((2, zero(&other))),
        "every kind is logged, with no entity too"
    );
    // A submission under the first spec (a backend process with other
    // plugins) leaves them stale: no answer under either spec.
    let before = head(&storage, "A").await;
    submit(&storage, vec![price("A", "P1", 5.0)]).await;
    for spec in [spec(), other] {
        assert_eq!(
            storage
                .checkpoint_at("A", before, &spec)
                .await
                .expect("read"),
            None
        );
        assert_eq!(
            storage
                .checkpoint_at("A", i64::MAX, &spec)
                .await
                .expect("read"),
            None
        );
    }
    // Computed again: the log starts at the head and goes on from there.
    storage
        .sync_checksums(&spec())
        .await
        .expect("synced")
        .expect("computed again");
    let restarted = head(&storage, "A").await;
    let at_restart = from_scratch(&storage, "A", &spec()).await;
    submit(&storage, vec![note("A", None)]).await;
    submit(&storage, vec![price("A", "P3", 7.0), note("A", None)]).await;
    let now = from_scratch(&storage, "A", &spec()).await;
    assert_ne!(now, at_restart);
    for (up_to, answer) in log_answers(&storage, "A", &spec()).await.iter().enumerate() {
        let up_to = i64::try_from(up_to).expect("small");
        let expected = if up_to < restarted {
            None
        } else if up_to < restarted + 3 {
            Some((restarted, at_restart.clone()))
        } else {
            Some((restarted + 3, now.clone()))
        };
        assert_eq!(answer, &expected, "up to {up_to}");
    }
}

async fn pruning_the_checksum_log_keeps_reads_at_and_above_its_bound<H: Harness>() {
    let db = H::fresh().await;
    let storage = db.open().await;
    storage.sync_checksums(&spec()).await.expect("synced");
    log_a_day(&storage).await;
    let full = log_answers(&storage, "A", &spec()).await;
    let other_store = log_answers(&storage, "B", &spec()).await;
    let mut removed = 0;
    for below in [2, 5, 9, 11, 13, 15, 40] {
        removed += storage
            .prune_checksum_log("A", below)
            .await
            .expect("pruned");
        let answers = log_answers(&storage, "A", &spec()).await;
        for (up_to, (answer, before)) in answers.iter().zip(&full).enumerate() {
            let up_to = i64::try_from(up_to).expect("small");
            if up_to >= below {
                assert_eq!(answer, before, "below {below}, up to {up_to}");
            } else {
                assert!(
                    answer.is_none() || answer == before,
                    "below {below}, up to {up_to}: no answer rather than a wrong one"
                );
            }
        }
        assert_eq!(
            log_answers(&storage, "B", &spec()).await,
            other_store,
            "another store's log is left alone"
        );
    }
    assert!(removed > 0, "rows went");
    assert_eq!(
        db.count("SELECT count(*) FROM checksum_log WHERE store = 'A'")
            .await,
        2,
        "each kind's latest row, and no other"
    );
    // The category's rows before 14 went: no answer at 13, though its
    // product row is there.
    assert_eq!(
        storage.checkpoint_at("A", 13, &spec()).await.expect("read"),
        None
    );
    assert_eq!(
        storage.checkpoint_at("A", 14, &spec()).await.expect("read"),
        full[14]
    );
    // The log goes on.
    submit(&storage, vec![price("A", "P1", 8.0)]).await;
    let head = head(&storage, "A").await;
    assert_eq!(
        storage
            .checkpoint_at("A", head, &spec())
            .await
            .expect("read"),
        Some((head, from_scratch(&storage, "A", &spec()).await))
    );
}

async fn the_checksum_log_stays_bounded_without_pruning<H: Harness>() {
    // As far below its newest boundary as the storages keep a checksum's
    // log, in seqs.
    const WINDOW: i64 = 1024;
    const BATCH: i64 = 40;
    let db = H::fresh().await;
    let storage = db.open().await;
    storage.sync_checksums(&spec()).await.expect("synced");
    submit(&storage, vec![category("A", "C1", "Drinks")]).await;
    let mut ends = BTreeMap::new();
    for round in 0..60 {
        let changes = (0..BATCH)
            .map(|i| price("A", &format!("P{}", i % 7), (round * 100 + i) as f64))
            .collect();
        let seqs = submit(&storage, changes).await;
        let end = seqs.last().copied().flatten().expect("sequenced");
        ends.insert(end, from_scratch(&storage, "A", &spec()).await);
        // As the relay does, with no checkpoint to prune after.
        publish_all(&storage, "A").await;
    }
    let head = head(&storage, "A").await;
    assert_eq!(head, 1 + 60 * BATCH);
    let rows = |kind: &str| format!("SELECT count(*) FROM checksum_log WHERE entity = '{kind}'");
    let products = db.count(&rows("product")).await;
    assert!(
        products <= WINDOW / BATCH + 2,
        "{products} rows for {} submissions",
        ends.len()
    );
    assert_eq!(
        db.count(&rows("category")).await,
        1,
        "a kind left alone keeps its one row"
    );
    for (end, expected) in &ends {
        let answer = storage
            .checkpoint_at("A", *end, &spec())
            .await
            .expect("read");
        let expected = Some((*end, expected.clone()));
        if *end >= head - WINDOW {
            assert_eq!(answer, expected, "at {end}");
        } else {
            assert!(answer.is_none() || answer == expected, "at {end}");
        }
    }
    let (first, _) = ends.first_key_value().expect("ends");
    assert_eq!(
        storage
            .checkpoint_at("A", *first, &spec())
            .await
            .expect("read"),
        None,
        "trimmed: no answer rather than a wrong one"
    );
}

async fn the_checksum_log_keeps_every_boundary_the_relay_has_yet_to_publish<H: Harness>() {
    const BATCH: i64 = 40;
    let db = H::fresh().await;
    let storage = db.open().await;
    storage.sync_checksums(&spec()).await.expect("synced");
    submit(&storage, vec![category("A", "C1", "Drinks")]).await;
    publish_all(&storage, "A").await;
    // A backlog far longer than the log's window, none of it published:
    // the relay must find a boundary wherever it stands in it.
    let mut ends = BTreeMap::new();
    for round in 0..60 {
        let changes = (0..BATCH)
            .map(|i| price("A", &format!("P{}", i % 7), (round * 100 + i) as f64))
            .collect();
        let seqs = submit(&storage, changes).await;
        let end = seqs.last().copied().flatten().expect("sequenced");
        ends.insert(end, from_scratch(&storage, "A", &spec()).await);
    }
    for (end, expected) in &ends {
        assert_eq!(
            storage
                .checkpoint_at("A", *end, &spec())
                .await
                .expect("read"),
            Some((*end, expected.clone())),
            "at {end}"
        );
    }
    // Once it is published, the next submission trims it to the window.
    publish_all(&storage, "A").await;
    submit(&storage, vec![price("A", "P1", 1.0)]).await;
    let products = db
        .count("SELECT count(*) FROM checksum_log WHERE entity = 'product'")
        .await;
    assert!(products <= 1024 / BATCH + 3, "{products} rows kept");
}

/// Marks every change of `store` published, as the relay does once the
/// broker confirmed them.
async fn publish_all(storage: &impl Storage, store: &str) {
    let rows: Vec<(String, i64)> = (1..=head(storage, store).await)
        .map(|seq| (store.to_owned(), seq))
        .collect();
    storage.mark_published(&rows).await.expect("marked");
}

async fn pruning_the_checksum_log_beside_submissions_fails_neither<H: Harness>() {
    let db = H::fresh().await;
    let storage = Arc::new(db.open().await);
    storage.sync_checksums(&spec()).await.expect("synced");
    let submitter = {
        let storage = Arc::clone(&storage);
        tokio::spawn(async move {
            // Batches long enough that each one trims the log too.
            for round in 0..30 {
                let changes = (0..100)
                    .map(|i| price("A", &format!("P{}", i % 5), f64::from(round * 100 + i)))
                    .collect();
                submit(&*storage, changes).await;
            }
        })
    };
    while !submitter.is_finished() {
        let head = head(&*storage, "A").await;
        storage
            .prune_checksum_log("A", head - 150)
            .await
            .expect("pruned beside submissions");
        tokio::task::yield_now().await;
    }
    submitter.await.expect("the submitter");
    let head = head(&*storage, "A").await;
    assert_eq!(
        storage
            .checkpoint_at("A", head, &spec())
            .await
            .expect("read"),
        Some((head, from_scratch(&*storage, "A", &spec()).await))
    );
}
