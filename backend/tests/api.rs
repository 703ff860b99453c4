//! The HTTP API's guarantees, checked with real HTTP requests against the
//! router served on loopback, each test once over SQLite (a database in a
//! temporary folder) and once over PostgreSQL (a database of its own at
//! `POSSYNC_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; a missing server fails the
//! tests).

use std::collections::BTreeMap;
use std::sync::Arc;

use possync_backend::api::{self, MAX_BODY_BYTES, MAX_CHANGES_PER_REQUEST};
use possync_backend::token::{self, TOKEN_PREFIX};
use possync_backend::{
    Catalog, CatalogEntry, Change, IdempotencyKey, NewChange, OutboxRow, PostgresStorage,
    SqliteStorage, Storage, StorageError, StoreHead, Submitted, TokenRecord,
};
use possync_catalog as _;
use possync_core::Registry;
use serde_json::{Value, json};

/// A backend serving the API on 127.0.0.1, and a client for it.
struct Backend<S> {
    base: String,
    storage: Arc<S>,
    agent: ureq::Agent,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    _database: Option<PostgresDatabase>,
}

/// An answer: its status, its JSON body (`Null` when it is not JSON) and
/// its text.
struct Answer {
    status: u16,
    json: Value,
    text: String,
    headers: ureq::http::HeaderMap,
}

impl Answer {
    fn error(&self) -> &str {
        self.json["error"].as_str().unwrap_or_else(|| {
            panic!(
                "a refusal carries {{\"error\": ...}}; got {} {}",
                self.status, self.text
            )
        })
    }
}

impl Backend<SqliteStorage> {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let runtime = runtime();
        let storage = runtime
            .block_on(SqliteStorage::open(dir.path().join("backend.db")))
            .expect("the SQLite database opens");
        Self::serve(runtime, storage, dir, None)
    }
}

impl Backend<PostgresStorage> {
    fn postgres() -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let runtime = runtime();
        let database = PostgresDatabase::create(&runtime);
        let storage = runtime
            .block_on(PostgresStorage::connect(&database.url))
            .expect("PostgreSQL storage connects");
        Self::serve(runtime, storage, dir, Some(database))
    }
}

/// A database of its own on the test server, dropped after the test.
struct PostgresDatabase {
    name: String,
    url: String,
}

fn postgres_admin_url() -> String {
    std::env::var("POSSYNC_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn postgres_admin(statement: &str) -> Result<(), tokio_postgres::Error> {
    let (client, connection) =
        tokio_postgres::connect(&postgres_admin_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.batch_execute(statement).await
}

impl PostgresDatabase {
    fn create(runtime: &tokio::runtime::Runtime) -> Self {
        let name = format!("possync_api_test_{}", uuid::Uuid::now_v7().simple());
        runtime
            .block_on(postgres_admin(&format!("CREATE DATABASE {name}")))
            .unwrap_or_else(|err| {
                panic!(
                    "PostgreSQL does not answer at POSSYNC_TEST_POSTGRES_URL: {err}; start it (.ci/run does) or point the variable at one"
                )
            });
        let admin = postgres_admin_url();
        let (base, query) = admin.split_once('?').unwrap_or((&admin, ""));
        let server = base
            .rsplit_once('/')
            .filter(|(server, _)| server.contains("//"))
            .map_or(base, |(server, _)| server);
        let url = if query.is_empty() {
            format!("{server}/{name}")
        } else {
            format!("{server}/{name}?{query}")
        };
        Self { name, url }
    }
}

impl Drop for PostgresDatabase {
    fn drop(&mut self) {
        // On a runtime of its own: the test's may be gone or panicking.
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|runtime| runtime.block_on(postgres_admin(&statement)))
        })
        .join();
    }
}

/// Runs each listed test on each storage.
macro_rules! on_every_storage {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $test() {
                    super::$test(super::Backend::sqlite());
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $test() {
                    super::$test(super::Backend::postgres());
                }
            )*
        }
    };
}

on_every_storage!(
    a_request_without_a_token_is_refused_with_401_saying_what_to_send,
    a_wrong_token_or_another_scheme_is_refused_with_401,
    a_token_limited_to_some_stores_is_refused_others_with_403_and_a_batch_naming_one_is_refused_whole,
    a_revoked_token_stops_working_at_once,
    tokens_are_listed_by_name_and_stores_never_by_hash,
    a_retried_submission_with_the_same_key_applies_once_and_gets_the_first_answer,
    the_same_key_with_another_body_is_refused_and_applies_nothing,
    idempotency_keys_belong_to_their_token,
    malformed_requests_get_a_4xx_that_says_what_is_wrong,
    unknown_routes_and_methods_are_answered_in_json,
    the_catalog_and_the_changes_after_a_seq_read_back_what_was_submitted,
    health_needs_no_token_and_metrics_count_requests_and_show_heads,
    metrics_label_requests_by_route_template_and_a_known_method_only,
    metrics_are_refused_to_a_token_limited_to_some_stores,
    the_fleet_lists_each_stores_terminals_furthest_behind_first_and_only_to_its_stores_tokens,
    applied_answers_when_the_last_terminal_reports_and_names_those_that_have_not,
    upstream_messages_are_read_after_a_cursor_and_a_forgotten_terminal_is_gone,
);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

impl<S: Storage> Backend<S> {
    fn serve(
        runtime: tokio::runtime::Runtime,
        storage: S,
        dir: tempfile::TempDir,
        database: Option<PostgresDatabase>,
    ) -> Self {
        let storage = Arc::new(storage);
        let registry =
            Registry::for_publishing(&BTreeMap::new()).expect("the built-in plugins load");
        let catalog = Arc::new(Catalog::new(storage.clone(), Arc::new(registry)));
        let router = api::router(catalog);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback port");
        let address = listener.local_addr().expect("the port's address");
        runtime.spawn(async move { axum::serve(listener, router).await });
        // A fresh connection per request: a pooled one the server has
        // closed meanwhile would fail a request that never reached it.
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections(0)
            .build()
            .into();
        Self {
            base: format!("http://{address}"),
            storage,
            agent,
            runtime,
            _dir: dir,
            _database: database,
        }
    }

    /// A new token named `name`, limited to `stores` unless empty.
    fn token(&self, name: &str, stores: &[&str]) -> String {
        let stores: Vec<String> = stores.iter().map(|s| s.to_string()).collect();
        let created = self
            .runtime
            .block_on(token::create_token(&*self.storage, name, &stores))
            .expect("the token is created");
        created.token
    }

    fn revoke(&self, name: &str) {
        self.runtime
            .block_on(token::revoke_token(&*self.storage, name))
            .expect("the token is revoked");
    }

    fn head(&self, store: &str) -> i64 {
        self.runtime
            .block_on(self.storage.heads())
            .expect("the heads are read")
            .into_iter()
            .find(|head| head.store == store)
            .map_or(0, |head| head.head)
    }

    fn get(&self, path: &str, token: Option<&str>) -> Answer {
        let mut request = self.agent.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        answer(request.call())
    }

    fn post(&self, path: &str, token: Option<&str>, key: Option<&str>, body: &str) -> Answer {
        let mut request = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json");
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        answer(request.send(body))
    }

    fn request(&self, method: &str, path: &str, token: Option<&str>) -> Answer {
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let request = request.body(()).expect("a request");
        answer(self.agent.run(request))
    }
}

impl<S: Storage> Backend<S> {
    /// Sends a request by hand (the HTTP client takes only the standard
    /// methods) and returns the answer's status line.
    fn raw_request(&self, method: &str, path: &str, token: &str) -> String {
        use std::io::{BufRead, Write};
        let address = self.base.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(address).expect("connects");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .expect("sends");
        let mut status = String::new();
        std::io::BufReader::new(stream)
            .read_line(&mut status)
            .expect("an answer");
        status
    }
}

fn answer(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut response = result.expect("the backend answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_string()
        .expect("a readable body");
    Answer {
        status,
        json: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
        headers,
    }
}

fn price(product: &str, new_price: f64) -> Value {
    json!({"type": "price_update", "payload": {"product_id": product, "new_price": new_price}})
}

fn product(product: &str, name: &str, price: f64) -> Value {
    json!({"type": "product_update", "payload": {
        "product_id": product, "product_name": name, "price": price, "category_id": "CAT-1"
    }})
}

fn in_store(store: &str, mut change: Value) -> Value {
    change["store"] = json!(store);
    change
}

fn seqs(answer: &Answer) -> Vec<Value> {
    answer.json["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("a submission's answer lists its changes: {}", answer.text))
        .iter()
        .map(|change| change["seq"].clone())
        .collect()
}

fn a_request_without_a_token_is_refused_with_401_saying_what_to_send<S: Storage>(
    backend: Backend<S>,
) {
    for path in [
        "/v1/stores",
        "/v1/stores/S1/catalog",
        "/v1/stores/S1/changes",
        "/metrics",
    ] {
        let answer = backend.get(path, None);
        assert_eq!(answer.status, 401, "{path}");
        assert!(
            answer.error().contains("Authorization: Bearer"),
            "{path}: {}",
            answer.error()
        );
        assert!(answer.headers.contains_key("www-authenticate"));
    }
    let answer = backend.post(
        "/v1/stores/S1/changes",
        None,
        None,
        &price("P", 1.0).to_string(),
    );
    assert_eq!(answer.status, 401);
    assert_eq!(backend.head("S1"), 0, "nothing was applied");
}

fn a_wrong_token_or_another_scheme_is_refused_with_401<S: Storage>(backend: Backend<S>) {
    let _real = backend.token("office", &[]);
    let answer = backend.get(
        "/v1/stores",
        Some(&format!("{TOKEN_PREFIX}not-a-real-token")),
    );
    assert_eq!(answer.status, 401);
    assert!(answer.error().contains("not known"), "{}", answer.error());

    let answer = answer_with_header(&backend, "/v1/stores", "Basic b2ZmaWNlOnB3");
    assert_eq!(answer.status, 401);
    assert!(
        answer.error().contains("not a bearer token"),
        "{}",
        answer.error()
    );
}

fn answer_with_header<S: Storage>(backend: &Backend<S>, path: &str, authorization: &str) -> Answer {
    answer(
        backend
            .agent
            .get(format!("{}{path}", backend.base))
            .header("Authorization", authorization)
            .call(),
    )
}

fn a_token_limited_to_some_stores_is_refused_others_with_403_and_a_batch_naming_one_is_refused_whole<
    S: Storage,
>(
    backend: Backend<S>,
) {
    let limited = backend.token("store-one", &["S1"]);

    let answer = backend.post(
        "/v1/stores/S1/changes",
        Some(&limited),
        None,
        &price("P", 1.0).to_string(),
    );
    assert_eq!(answer.status, 200, "its own store: {}", answer.text);

    for path in ["/v1/stores/S2/catalog", "/v1/stores/S2/changes"] {
        let answer = backend.get(path, Some(&limited));
        assert_eq!(answer.status, 403, "{path}");
        assert!(answer.error().contains("\"S2\""), "{}", answer.error());
    }
    let answer = backend.post(
        "/v1/stores/S2/changes",
        Some(&limited),
        None,
        &price("P", 1.0).to_string(),
    );
    assert_eq!(answer.status, 403);

    let batch =
        json!({"changes": [in_store("S1", price("P", 2.0)), in_store("S2", price("P", 2.0))]});
    let answer = backend.post("/v1/changes", Some(&limited), None, &batch.to_string());
    assert_eq!(answer.status, 403);
    assert!(
        answer.error().starts_with("change 1: "),
        "{}",
        answer.error()
    );
    assert_eq!(
        (backend.head("S1"), backend.head("S2")),
        (1, 0),
        "nothing of the batch applied"
    );

    let everything = backend.token("head-office", &[]);
    backend.post(
        "/v1/stores/S2/changes",
        Some(&everything),
        None,
        &price("P", 3.0).to_string(),
    );
    let stores = backend.get("/v1/stores", Some(&limited));
    assert_eq!(
        stores.json,
        json!({"stores": [{"store": "S1", "head": 1, "unpublished": 1}]})
    );
    let stores = backend.get("/v1/stores", Some(&everything));
    assert_eq!(stores.json["stores"].as_array().map(Vec::len), Some(2));
}

fn a_revoked_token_stops_working_at_once<S: Storage>(backend: Backend<S>) {
    let token = backend.token("office", &[]);
    assert_eq!(backend.get("/v1/stores", Some(&token)).status, 200);
    backend.revoke("office");
    let answer = backend.get("/v1/stores", Some(&token));
    assert_eq!(answer.status, 401);
}

fn tokens_are_listed_by_name_and_stores_never_by_hash<S: Storage>(backend: Backend<S>) {
    let token = backend.token("office", &["S2", "S1"]);
    let listed = backend
        .runtime
        .block_on(token::list_tokens(&*backend.storage))
        .expect("the tokens are listed");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "office");
    assert_eq!(
        listed[0].stores,
        Some(vec!["S1".to_owned(), "S2".to_owned()])
    );
    let shown = listed[0].to_string();
    assert!(
        !shown.contains(&token::hash_token(&token)) && !shown.contains(&token),
        "{shown}"
    );
    let again = backend
        .runtime
        .block_on(token::create_token(&*backend.storage, "office", &[]));
    assert!(again.is_err(), "a name is taken once");
}

fn a_retried_submission_with_the_same_key_applies_once_and_gets_the_first_answer<S: Storage>(
    backend: Backend<S>,
) {
    let token = backend.token("office", &[]);
    let batch =
        json!({"changes": [in_store("S1", price("P1", 1.0)), in_store("S1", price("P2", 2.0))]})
            .to_string();

    let first = backend.post("/v1/changes", Some(&token), Some("batch-1"), &batch);
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(seqs(&first), [json!(1), json!(2)]);
    assert_eq!(first.json["replayed"], json!(false));

    let retry = backend.post("/v1/changes", Some(&token), Some("batch-1"), &batch);
    assert_eq!(retry.status, 200, "{}", retry.text);
    assert_eq!(
        retry.json["changes"], first.json["changes"],
        "the first answer, message ids too"
    );
    assert_eq!(retry.json["replayed"], json!(true));
    assert_eq!(
        retry
            .headers
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(backend.head("S1"), 2, "applied once");

    let one = price("P1", 5.0).to_string();
    let first = backend.post("/v1/stores/S1/changes", Some(&token), Some("one-1"), &one);
    let retry = backend.post("/v1/stores/S1/changes", Some(&token), Some("one-1"), &one);
    assert_eq!(seqs(&first), [json!(3)]);
    assert_eq!(retry.json["changes"], first.json["changes"]);
    assert_eq!(backend.head("S1"), 3);
}

fn the_same_key_with_another_body_is_refused_and_applies_nothing<S: Storage>(backend: Backend<S>) {
    let token = backend.token("office", &[]);
    let first = backend.post(
        "/v1/stores/S1/changes",
        Some(&token),
        Some("k"),
        &price("P", 1.0).to_string(),
    );
    assert_eq!(first.status, 200);

    let other = backend.post(
        "/v1/stores/S1/changes",
        Some(&token),
        Some("k"),
        &price("P", 2.0).to_string(),
    );
    assert_eq!(other.status, 422);
    assert!(
        other
            .error()
            .contains("already used for a different request"),
        "{}",
        other.error()
    );

    let other_store = backend.post(
        "/v1/stores/S2/changes",
        Some(&token),
        Some("k"),
        &price("P", 1.0).to_string(),
    );
    assert_eq!(
        other_store.status, 422,
        "another store's route is another request"
    );
    assert_eq!((backend.head("S1"), backend.head("S2")), (1, 0));
}

fn idempotency_keys_belong_to_their_token<S: Storage>(backend: Backend<S>) {
    let one = backend.token("one", &[]);
    let two = backend.token("two", &[]);
    let body = price("P", 1.0).to_string();
    let first = backend.post("/v1/stores/S1/changes", Some(&one), Some("k"), &body);
    let second = backend.post("/v1/stores/S1/changes", Some(&two), Some("k"), &body);
    assert_eq!(
        (seqs(&first), seqs(&second)),
        (vec![json!(1)], vec![json!(2)])
    );
}

fn malformed_requests_get_a_4xx_that_says_what_is_wrong<S: Storage>(backend: Backend<S>) {
    let token = backend.token("office", &[]);
    let post = |path: &str, body: &str| backend.post(path, Some(&token), None, body);

    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/stores/S1/changes", "{\"type\": ".into(), 400, "not valid JSON"),
        ("/v1/stores/S1/changes", format!("{} {{}}", price("P", 1.0)), 400, "exactly one JSON object"),
        ("/v1/stores/S1/changes", json!({"payload": {}}).to_string(), 400, "missing field `type`"),
        (
            "/v1/stores/S1/changes",
            json!({"type": "price_update", "payload": "P1"}).to_string(),
            400,
            "at `payload`",
        ),
        ("/v1/stores/S1/changes", json!({"type": "price_update", "payload": {}, "colour": 1}).to_string(), 400, "unknown field `colour`"),
        (
            "/v1/changes",
            json!({"changes": [{"store": "S1", "type": 7, "payload": {}}]}).to_string(),
            400,
            "at `changes[0].type`",
        ),
        (
            "/v1/stores/S1/changes",
            json!({"type": "price_updat", "payload": {}}).to_string(),
            422,
            "unknown type \"price_updat\"; this backend takes: category_update, price_update, product_delete, product_update",
        ),
        (
            "/v1/stores/S1/changes",
            json!({"type": "price_update", "payload": {"product_id": "P1"}}).to_string(),
            422,
            "new_price",
        ),
        (
            "/v1/stores/S1/changes",
            json!({"type": "price_update", "payload": {"product_id": "P1", "new_price": 1}, "timestamp": "yesterday"}).to_string(),
            422,
            "RFC 3339",
        ),
        ("/v1/stores/S.1/changes", price("P", 1.0).to_string(), 400, "has a meaning in routing keys"),
        (
            "/v1/changes",
            json!({"changes": [in_store("#", price("P", 1.0))]}).to_string(),
            422,
            "change 0: license key \"#\" is not valid",
        ),
        ("/v1/changes", json!({"changes": []}).to_string(), 422, "holds no change"),
        (
            "/v1/changes",
            json!({"changes": vec![in_store("S1", price("P", 1.0)); MAX_CHANGES_PER_REQUEST + 1]}).to_string(),
            422,
            "at most 1000",
        ),
        ("/v1/changes", "x".repeat(MAX_BODY_BYTES + 1), 413, "larger than"),
    ];
    for (path, body, status, says) in cases {
        let answer = post(path, &body);
        assert_eq!(
            answer.status,
            status,
            "{path} {}: {}",
            &body[..body.len().min(80)],
            answer.text
        );
        assert!(
            answer.error().contains(says),
            "{path}: {:?} should say {says:?}",
            answer.error()
        );
    }
    assert_eq!(backend.head("S1"), 0, "nothing was applied");

    let answer = backend.get("/v1/stores/S1/changes?after=-1", Some(&token));
    assert_eq!(
        (answer.status, answer.error().contains("negative")),
        (400, true),
        "{}",
        answer.text
    );
    let answer = backend.get("/v1/stores/S1/changes?limit=100000", Some(&token));
    assert_eq!(
        (answer.status, answer.error().contains("1 to 1000")),
        (400, true),
        "{}",
        answer.text
    );
    let answer = backend.get("/v1/stores/S1/changes?after=many", Some(&token));
    assert_eq!(answer.status, 400, "{}", answer.text);
    let answer = backend.post(
        "/v1/changes",
        Some(&token),
        Some(&"k".repeat(256)),
        &json!({"changes": []}).to_string(),
    );
    assert_eq!(answer.status, 400, "{}", answer.text);
}

fn unknown_routes_and_methods_are_answered_in_json<S: Storage>(backend: Backend<S>) {
    let token = backend.token("office", &[]);
    let answer = backend.get("/v2/stores", Some(&token));
    assert_eq!(answer.status, 404);
    assert!(
        answer.error().contains("/openapi.json"),
        "{}",
        answer.error()
    );
    let answer = backend.request("DELETE", "/v1/stores/S1/catalog", Some(&token));
    assert_eq!(answer.status, 405);
    assert!(
        answer.error().contains("does not take DELETE"),
        "{}",
        answer.error()
    );
    assert_eq!(
        answer.headers.get("allow").map(|v| v.as_bytes()),
        Some(&b"GET,HEAD"[..])
    );
}

fn the_catalog_and_the_changes_after_a_seq_read_back_what_was_submitted<S: Storage>(
    backend: Backend<S>,
) {
    let token = backend.token("office", &[]);
    let batch = json!({"changes": [
        in_store("S1", product("P1", "Cappuccino", 3.5)),
        in_store("S1", product("P2", "Latte", 4.0)),
        in_store("S2", product("P1", "Tea", 2.0)),
        in_store("S1", price("P1", 3.9)),
    ]});
    let answer = backend.post("/v1/changes", Some(&token), None, &batch.to_string());
    assert_eq!(
        seqs(&answer),
        [json!(1), json!(2), json!(1), json!(3)],
        "per store"
    );
    assert_eq!(answer.json["changes"][2]["store"], json!("S2"));
    assert_eq!(answer.json["changes"][0]["status"], json!("sequenced"));

    let catalog = backend.get("/v1/stores/S1/catalog", Some(&token));
    assert_eq!(catalog.status, 200, "{}", catalog.text);
    assert_eq!(catalog.json["head"], json!(3));
    let entities = &catalog.json["entities"];
    assert_eq!(
        entities.as_array().map(Vec::len),
        Some(2),
        "{}",
        catalog.text
    );
    assert_eq!(entities[0]["id"], json!("P1"));
    assert_eq!(entities[0]["entity"], json!("product"));
    assert_eq!(entities[0]["seq"], json!(3));
    assert_eq!(entities[0]["state"]["price"], json!(3.9));
    assert_eq!(entities[0]["state"]["product_name"], json!("Cappuccino"));

    let changes = backend.get("/v1/stores/S1/changes?after=1&limit=1", Some(&token));
    assert_eq!(changes.status, 200, "{}", changes.text);
    assert_eq!(changes.json["head"], json!(3));
    let listed = changes.json["changes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["seq"], json!(2));
    assert_eq!(listed[0]["type"], json!("product_update"));
    assert_eq!(listed[0]["payload"]["product_name"], json!("Latte"));
    assert_eq!(
        listed[0]["message_id"],
        answer.json["changes"][1]["message_id"]
    );
    assert_eq!(listed[0]["published"], json!(false));

    let rest = backend.get("/v1/stores/S1/changes?after=2", Some(&token));
    let seqs: Vec<&Value> = rest.json["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| &c["seq"])
        .collect();
    assert_eq!(seqs, [&json!(3)]);

    let empty = backend.get("/v1/stores/NEW-STORE/catalog", Some(&token));
    assert_eq!(
        empty.json,
        json!({"store": "NEW-STORE", "head": 0, "entities": []})
    );
}

fn health_needs_no_token_and_metrics_count_requests_and_show_heads<S: Storage>(
    backend: Backend<S>,
) {
    let health = backend.get("/health", None);
    assert_eq!(
        (health.status, health.json.clone()),
        (200, json!({"status": "ok", "database": true}))
    );

    let token = backend.token("office", &[]);
    backend.post(
        "/v1/stores/S1/changes",
        Some(&token),
        None,
        &price("P", 1.0).to_string(),
    );
    backend.post("/v1/stores/S1/changes", Some(&token), None, "{");
    let metrics = backend.get("/metrics", Some(&token));
    assert_eq!(metrics.status, 200);
    for line in [
        "possync_backend_store_head{store=\"S1\"} 1",
        "possync_backend_store_unpublished{store=\"S1\"} 1",
        "possync_backend_changes_sequenced_total 1",
        "possync_backend_submissions_refused_total{status=\"400\"} 1",
        "possync_backend_http_requests_total{route=\"/v1/stores/{store}/changes\",method=\"POST\",status=\"200\"} 1",
    ] {
        assert!(
            metrics.text.lines().any(|l| l == line),
            "{line:?} in\n{}",
            metrics.text
        );
    }
    assert!(!metrics.text.contains(&token));
}

fn metrics_label_requests_by_route_template_and_a_known_method_only<S: Storage>(
    backend: Backend<S>,
) {
    let token = backend.token("office", &[]);
    for store in ["S1", "S2", "S3"] {
        backend.get(&format!("/v1/stores/{store}/catalog"), Some(&token));
        backend.raw_request("BREW", &format!("/v1/stores/{store}/catalog"), &token);
    }
    backend.get("/nowhere/x1", Some(&token));
    backend.raw_request("XYZZY", "/nowhere/x2", &token);
    let metrics = backend.get("/metrics", Some(&token));
    assert_eq!(metrics.status, 200);
    let requests: Vec<&str> = metrics
        .text
        .lines()
        .filter(|line| line.starts_with("possync_backend_http_requests_total{"))
        .collect();
    for line in &requests {
        assert!(
            !line.contains("BREW") && !line.contains("XYZZY"),
            "no invented method as a label: {line}"
        );
        assert!(
            !line.contains("S1") && !line.contains("/nowhere"),
            "no raw path as a label: {line}"
        );
    }
    assert!(
        requests.contains(
            &"possync_backend_http_requests_total{route=\"/v1/stores/{store}/catalog\",method=\"GET\",status=\"200\"} 3"
        ),
        "{requests:#?}"
    );
    assert!(
        requests
            .iter()
            .any(|line| line.contains("method=\"other\"")),
        "{requests:#?}"
    );
}

fn metrics_are_refused_to_a_token_limited_to_some_stores<S: Storage>(backend: Backend<S>) {
    let limited = backend.token("store-one", &["S1"]);
    let answer = backend.get("/metrics", Some(&limited));
    assert_eq!(answer.status, 403, "{}", answer.text);
    assert!(
        answer.error().contains("limited to some stores")
            && answer.error().contains("token create"),
        "{}",
        answer.error()
    );
    let operator = backend.token("operator", &[]);
    assert_eq!(backend.get("/metrics", Some(&operator)).status, 200);
}

/// A storage whose database never answers, but for token lookups when
/// `lookups_answer` (the database up, its outbox too slow to read).
struct Unreachable {
    lookups_answer: bool,
}

fn down<T: Send>() -> impl std::future::Future<Output = Result<T, StorageError>> + Send {
    std::future::ready(Err(StorageError::Database("connection refused".into())))
}

impl Storage for Unreachable {
    fn submit(
        &self,
        _: Vec<NewChange>,
        _: Option<IdempotencyKey>,
        _: &possync_core::ChecksumSpec,
    ) -> impl std::future::Future<Output = Result<Submitted, StorageError>> + Send {
        down()
    }
    fn sync_checksums(
        &self,
        _: &possync_core::ChecksumSpec,
    ) -> impl std::future::Future<Output = Result<Option<possync_backend::Recomputed>, StorageError>>
    + Send {
        down()
    }
    fn checkpoint(
        &self,
        _: &str,
        _: &possync_core::ChecksumSpec,
    ) -> impl std::future::Future<Output = Result<possync_backend::StoreCheckpoint, StorageError>> + Send
    {
        down()
    }
    fn unpublished(
        &self,
        _: usize,
    ) -> impl std::future::Future<Output = Result<Vec<OutboxRow>, StorageError>> + Send {
        down()
    }
    fn mark_published(
        &self,
        _: &[(String, i64)],
    ) -> impl std::future::Future<Output = Result<(), StorageError>> + Send {
        down()
    }
    fn prune_keys(
        &self,
        _: std::time::Duration,
    ) -> impl std::future::Future<Output = Result<u64, StorageError>> + Send {
        down()
    }
    fn lead_relay(&self) -> impl std::future::Future<Output = Result<bool, StorageError>> + Send {
        down()
    }
    fn catalog(
        &self,
        _: &str,
    ) -> impl std::future::Future<Output = Result<Vec<CatalogEntry>, StorageError>> + Send {
        down()
    }
    fn changes_after(
        &self,
        _: &str,
        _: i64,
        _: usize,
    ) -> impl std::future::Future<Output = Result<Vec<Change>, StorageError>> + Send {
        down()
    }
    fn catalog_id(&self) -> impl std::future::Future<Output = Result<String, StorageError>> + Send {
        down()
    }

    fn heads(
        &self,
    ) -> impl std::future::Future<Output = Result<Vec<StoreHead>, StorageError>> + Send {
        down()
    }
    fn create_token(
        &self,
        _: TokenRecord,
    ) -> impl std::future::Future<Output = Result<(), StorageError>> + Send {
        down()
    }
    fn tokens(
        &self,
    ) -> impl std::future::Future<Output = Result<Vec<TokenRecord>, StorageError>> + Send {
        down()
    }
    fn revoke_token(
        &self,
        _: &str,
    ) -> impl std::future::Future<Output = Result<bool, StorageError>> + Send {
        down()
    }
    fn token_by_hash(
        &self,
        _: &str,
    ) -> impl std::future::Future<Output = Result<Option<TokenRecord>, StorageError>> + Send {
        let answer = self.lookups_answer;
        async move { if answer { Ok(None) } else { down().await } }
    }
    fn record_upstream(
        &self,
        _: Vec<possync_backend::UpstreamRecord>,
    ) -> impl std::future::Future<Output = Result<Vec<bool>, StorageError>> + Send {
        down()
    }
    fn upstream_after(
        &self,
        _: &str,
        _: Option<&str>,
        _: i64,
        _: usize,
    ) -> impl std::future::Future<Output = Result<Vec<possync_backend::Received>, StorageError>> + Send
    {
        down()
    }
    fn upstream_since(
        &self,
        _: i64,
        _: usize,
    ) -> impl std::future::Future<Output = Result<Vec<possync_backend::Received>, StorageError>> + Send
    {
        down()
    }
    fn record_receipts(
        &self,
        _: Vec<possync_backend::ReceiptRecord>,
    ) -> impl std::future::Future<Output = Result<(), StorageError>> + Send {
        down()
    }
    fn fleet(
        &self,
        _: Option<&str>,
    ) -> impl std::future::Future<
        Output = Result<Vec<possync_backend::TerminalRecord>, StorageError>,
    > + Send {
        down()
    }
    fn forget_terminal(
        &self,
        _: &str,
        _: &str,
    ) -> impl std::future::Future<Output = Result<bool, StorageError>> + Send {
        down()
    }
}

#[test]
fn health_is_a_ping_that_never_reads_the_outbox() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let backend = Backend::serve(
        runtime(),
        Unreachable {
            lookups_answer: true,
        },
        dir,
        None,
    );
    let health = backend.get("/health", None);
    assert_eq!(
        (health.status, health.json),
        (200, json!({"status": "ok", "database": true})),
        "answered without the heads, which this storage cannot read"
    );
}

#[test]
fn a_database_that_does_not_answer_is_a_503_with_a_retry_hint_never_a_500() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let backend = Backend::serve(
        runtime(),
        Unreachable {
            lookups_answer: false,
        },
        dir,
        None,
    );
    let health = backend.get("/health", None);
    assert_eq!(
        (health.status, health.json),
        (503, json!({"status": "unavailable", "database": false}))
    );
    let token = format!("{TOKEN_PREFIX}anything");
    for answer in [
        backend.get("/v1/stores", Some(&token)),
        backend.post(
            "/v1/changes",
            Some(&token),
            Some("k"),
            &json!({"changes": [in_store("S1", price("P", 1.0))]}).to_string(),
        ),
    ] {
        assert_eq!(answer.status, 503, "{}", answer.text);
        assert!(answer.error().contains("retry"), "{}", answer.error());
        assert!(
            !answer.error().contains("connection refused"),
            "the detail is logged, not shown"
        );
        assert_eq!(
            answer.headers.get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
    }
}

/// The document served is the one built from the code, every operation it
/// describes is routed, and the copy kept in the repository for client
/// generators (`backend/openapi.json`) is the same document: run with
/// `POSSYNC_UPDATE_OPENAPI=1` to write it after changing the API.
#[test]
fn the_served_openapi_document_is_built_from_the_code_and_describes_every_route() {
    let backend = Backend::sqlite();
    let served = backend.get("/openapi.json", None);
    assert_eq!(served.status, 200);
    let built = serde_json::to_value(api::openapi()).expect("the document serializes");
    assert_eq!(served.json, built);
    assert!(
        built["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3."))
    );

    let paths = built["paths"].as_object().expect("the document has paths");
    let mut operations = Vec::new();
    for (path, item) in paths {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                operations.push(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    operations.sort();
    assert_eq!(
        operations,
        [
            "DELETE /v1/stores/{store}/terminals/{terminal}",
            "GET /fleet",
            "GET /health",
            "GET /metrics",
            "GET /openapi.json",
            "GET /v1/fleet",
            "GET /v1/stores",
            "GET /v1/stores/{store}/applied",
            "GET /v1/stores/{store}/catalog",
            "GET /v1/stores/{store}/changes",
            "GET /v1/stores/{store}/upstream",
            "POST /v1/changes",
            "POST /v1/stores/{store}/changes",
        ]
    );
    for operation in &operations {
        let (method, path) = operation.split_once(' ').expect("METHOD path");
        let answer = backend.request(method, &path.replace("{store}", "S1"), None);
        assert!(
            ![404, 405].contains(&answer.status),
            "{operation} is described but not routed: {}",
            answer.status
        );
        let documented = &paths[path][method.to_lowercase()]["responses"];
        assert!(
            documented.get(answer.status.to_string()).is_some(),
            "{operation} answered {} which it does not describe",
            answer.status
        );
    }

    let kept = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let pretty = serde_json::to_string_pretty(&built).expect("the document serializes") + "\n";
    if std::env::var_os("POSSYNC_UPDATE_OPENAPI").is_some() {
        std::fs::write(&kept, &pretty).expect("backend/openapi.json is written");
    }
    let on_disk = std::fs::read_to_string(&kept).unwrap_or_default();
    assert!(
        on_disk == pretty,
        "backend/openapi.json differs from the API the code serves: run `POSSYNC_UPDATE_OPENAPI=1 cargo test -p possync-backend --test api` and commit it"
    );
}

impl<S: Storage> Backend<S> {
    /// Records a receipt of `terminal` as the upstream consumer would.
    fn receipt(&self, store: &str, terminal: &str, n: u64, applied: i64) {
        self.receipt_verifying(store, terminal, n, applied, None, None);
    }

    /// Records a receipt that says where `terminal` last verified its
    /// catalog, and its gap.
    fn receipt_verifying(
        &self,
        store: &str,
        terminal: &str,
        n: u64,
        applied: i64,
        verified_seq: Option<i64>,
        gap: Option<&str>,
    ) {
        let record = possync_backend::ReceiptRecord {
            store: store.into(),
            terminal: terminal.into(),
            receipt: possync_core::Receipt {
                applied_up_to: applied,
                highest_applied: applied,
                quarantined: 0,
                outbox: 0,
                stopping: false,
                verified_seq,
                gap: gap.map(str::to_owned),
                run: "r1".into(),
                n,
            },
            seen_ms: possync_core::unix_now_ms(),
        };
        self.runtime
            .block_on(self.storage.record_receipts(vec![record]))
            .expect("the receipt is recorded");
    }
}

fn the_fleet_lists_each_stores_terminals_furthest_behind_first_and_only_to_its_stores_tokens<
    S: Storage,
>(
    backend: Backend<S>,
) {
    let operator = backend.token("operator", &[]);
    let limited = backend.token("store-one", &["S1"]);
    for n in 1..=3 {
        let answer = backend.post(
            "/v1/stores/S1/changes",
            Some(&operator),
            None,
            &price("P", f64::from(n)).to_string(),
        );
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    backend.receipt_verifying("S1", "till-a", 1, 3, Some(3), None);
    backend.receipt_verifying(
        "S1",
        "till-b",
        1,
        1,
        None,
        Some("the checksum of product differs"),
    );
    backend.receipt("S2", "till-a", 1, 0);

    let fleet = backend.get("/v1/fleet", Some(&operator));
    assert_eq!(fleet.status, 200, "{}", fleet.text);
    let stores = fleet.json["stores"].as_array().expect("stores");
    assert_eq!(stores.len(), 2);
    assert_eq!(stores[0]["store"], "S1", "the store furthest behind first");
    assert_eq!(
        (stores[0]["head"].as_i64(), stores[0]["max_lag"].as_i64()),
        (Some(3), Some(2))
    );
    let terminals: Vec<(&str, i64, &str)> = stores[0]["terminals"]
        .as_array()
        .expect("terminals")
        .iter()
        .map(|t| {
            (
                t["terminal"].as_str().unwrap_or_default(),
                t["lag"].as_i64().unwrap_or(-1),
                t["state"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(terminals, [("till-b", 2, "live"), ("till-a", 0, "live")]);
    let verified: Vec<(&Value, &Value)> = stores[0]["terminals"]
        .as_array()
        .expect("terminals")
        .iter()
        .map(|t| (&t["verified_seq"], &t["gap"]))
        .collect();
    assert_eq!(
        verified,
        [
            (&Value::Null, &json!("the checksum of product differs")),
            (&json!(3), &Value::Null)
        ]
    );
    let by_name = backend.get("/v1/fleet?sort=name", Some(&operator));
    assert_eq!(
        by_name.json["stores"][0]["terminals"][0]["terminal"],
        "till-a"
    );
    let bad = backend.get("/v1/fleet?sort=age", Some(&operator));
    assert_eq!(bad.status, 400);
    assert!(bad.error().contains("lag"), "{}", bad.error());

    let mine = backend.get("/v1/fleet", Some(&limited));
    assert_eq!(mine.status, 200);
    let names: Vec<&str> = mine.json["stores"]
        .as_array()
        .expect("stores")
        .iter()
        .filter_map(|s| s["store"].as_str())
        .collect();
    assert_eq!(names, ["S1"], "a store-limited token sees its stores only");
    assert_eq!(backend.get("/v1/fleet", None).status, 401);

    let metrics = backend.get("/metrics", Some(&operator));
    for line in [
        "possync_backend_fleet_terminals{store=\"S1\",state=\"live\"} 2",
        "possync_backend_fleet_max_lag{store=\"S1\"} 2",
        "possync_backend_fleet_gaps{store=\"S1\"} 1",
        "possync_backend_fleet_gaps{store=\"S2\"} 0",
    ] {
        assert!(metrics.text.contains(line), "{line}: {}", metrics.text);
    }
}

fn applied_answers_when_the_last_terminal_reports_and_names_those_that_have_not<S: Storage>(
    backend: Backend<S>,
) {
    let operator = backend.token("operator", &[]);
    let answer = backend.get("/v1/stores/S1/applied?seq=1", Some(&operator));
    assert_eq!(answer.status, 400, "no change yet: {}", answer.text);
    assert!(answer.error().contains("head"), "{}", answer.error());
    for n in 1..=4 {
        let answer = backend.post(
            "/v1/stores/S1/changes",
            Some(&operator),
            None,
            &price("P", f64::from(n)).to_string(),
        );
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    let answer = backend.get("/v1/stores/S1/applied?seq=1", Some(&operator));
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(
        answer.json["complete"], true,
        "no terminal: nothing to wait for"
    );
    assert_eq!(answer.json["terminals"], json!([]));

    backend.receipt("S1", "till-a", 1, 4);
    backend.receipt("S1", "till-b", 1, 2);
    let started = std::time::Instant::now();
    let answer = backend.get("/v1/stores/S1/applied?seq=3&wait=1", Some(&operator));
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "it waited"
    );
    assert_eq!(answer.json["complete"], false, "{}", answer.text);
    assert_eq!(answer.json["pending"], json!(["till-b"]));

    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| {
            let started = std::time::Instant::now();
            let answer = backend.get("/v1/stores/S1/applied?seq=3&wait=20", Some(&operator));
            (answer, started.elapsed())
        });
        std::thread::sleep(std::time::Duration::from_millis(500));
        backend.receipt("S1", "till-b", 2, 3);
        let (answer, took) = waiting.join().expect("the wait answers");
        assert_eq!(answer.json["complete"], true, "{}", answer.text);
        assert_eq!(answer.json["pending"], json!([]));
        assert!(
            took < std::time::Duration::from_secs(5),
            "answered once the last one reported, not at the end of the wait: {took:?}"
        );
    });

    for (query, says) in [
        ("seq=0", "seq"),
        ("seq=5", "head (4)"),
        ("seq=1&wait=51", "wait"),
        ("wait=1", "seq"),
    ] {
        let answer = backend.get(&format!("/v1/stores/S1/applied?{query}"), Some(&operator));
        assert_eq!(answer.status, 400, "{query}");
        assert!(answer.error().contains(says), "{query}: {}", answer.error());
    }
    let limited = backend.token("store-two", &["S2"]);
    assert_eq!(
        backend
            .get("/v1/stores/S1/applied?seq=1", Some(&limited))
            .status,
        403
    );
}

fn upstream_messages_are_read_after_a_cursor_and_a_forgotten_terminal_is_gone<S: Storage>(
    backend: Backend<S>,
) {
    let operator = backend.token("operator", &[]);
    let record = |n: usize, message_type: &str| possync_backend::UpstreamRecord {
        store: "S1".into(),
        terminal: "till-a".into(),
        message_type: message_type.into(),
        message_id: format!("m{n}"),
        created_at: "2026-12-02T10:00:00Z".into(),
        payload: format!(r#"{{"order_id":"O{n}"}}"#),
    };
    backend
        .runtime
        .block_on(backend.storage.record_upstream(vec![
            record(1, "order"),
            record(2, "note"),
            record(3, "order"),
        ]))
        .expect("recorded");
    let first = backend.get("/v1/stores/S1/upstream?type=order&limit=1", Some(&operator));
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.json["messages"][0]["payload"]["order_id"], "O1");
    let after = first.json["next_after"].as_i64().expect("a cursor");
    let rest = backend.get(
        &format!("/v1/stores/S1/upstream?type=order&after={after}"),
        Some(&operator),
    );
    let ids: Vec<&str> = rest.json["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["message_id"].as_str())
        .collect();
    assert_eq!(ids, ["m3"]);
    let everything = backend.get("/v1/stores/S1/upstream", Some(&operator));
    assert_eq!(
        everything.json["messages"].as_array().map(Vec::len),
        Some(3)
    );
    let none = backend.get("/v1/stores/S2/upstream", Some(&operator));
    assert_eq!(none.json["messages"], json!([]));
    assert_eq!(none.json["next_after"], 0);
    for query in ["type=Order", "after=-1", "limit=0"] {
        let answer = backend.get(&format!("/v1/stores/S1/upstream?{query}"), Some(&operator));
        assert_eq!(answer.status, 400, "{query}: {}", answer.text);
    }
    let limited = backend.token("store-two", &["S2"]);
    assert_eq!(
        backend.get("/v1/stores/S1/upstream", Some(&limited)).status,
        403
    );

    backend.receipt("S1", "till-a", 1, 0);
    let other = backend.token("store-two-only", &["S2"]);
    let refused = backend.request("DELETE", "/v1/stores/S1/terminals/till-a", Some(&other));
    assert_eq!(refused.status, 403, "another store's token forgets nothing");
    let gone = backend.request("DELETE", "/v1/stores/S1/terminals/till-a", Some(&operator));
    assert_eq!(gone.status, 204);
    let again = backend.request("DELETE", "/v1/stores/S1/terminals/till-a", Some(&operator));
    assert_eq!(again.status, 404);
    assert!(again.error().contains("till-a"), "{}", again.error());
    let fleet = backend.get("/v1/fleet", Some(&operator));
    assert_eq!(fleet.json["stores"], json!([]));
}
