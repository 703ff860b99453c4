//! The backend's database on PostgreSQL, for several backend processes on
//! one catalog.
//!
//! A submission locks its stores' rows (in store order, so two submissions
//! never wait on each other crosswise) before it reads their heads: every
//! writer of a store waits for the one before it to commit, so each store's
//! sequence is gapless and its committed outbox is always a prefix of it.

use std::collections::HashMap;
use std::error::Error as _;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::TryStreamExt;
use possync_core::ChecksumSpec;
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{Client, Config, NoTls, Row};

use super::checksums::{self, STALE, Tally};
use super::plan::{self, Before, StoredEntity};
use super::{
    CatalogEntry, CatalogPage, Change, ChecksumsAt, IdempotencyKey, NewChange, OutboxRow,
    ReceiptRecord, Received, Recomputed, Storage, StorageError, StoreCheckpoint, StoreHead,
    Submitted, TerminalRecord, TokenRecord, UpstreamRecord, answer,
};

/// Connections kept for concurrent requests.
const POOL_SIZE: usize = 8;
/// How long a request waits for a free connection, or a new one.
const POOL_WAIT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the relay's lock connection may take to answer whether it
/// still holds the lock before it is taken for lost.
const LOCK_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalives on every connection, so that a peer gone silently (a
/// network cut, a host powered off) is noticed within some 20 s rather
/// than the system's default two hours: first probe after 10 s of
/// silence, then every 5 s, given up after 2 unanswered.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 2;
/// Data sent and not acknowledged for this long ends the connection.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);

/// Advisory lock keys, chosen at random once: held while migrating, and by
/// the instance that relays.
const MIGRATION_LOCK: i64 = 0x706f_7373_796e_6301;
const RELAY_LOCK: i64 = 0x706f_7373_796e_6302;

/// The schema, one migration per entry; `possync_schema` counts those
/// applied.
const MIGRATIONS: &[&str] = &[
    r"
    CREATE TABLE stores (
        store text PRIMARY KEY,
        head bigint NOT NULL
    );

    -- id gives the relay one order across stores, oldest first.
    CREATE TABLE outbox (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        store text NOT NULL,
        seq bigint NOT NULL,
        message_type text NOT NULL,
        payload text NOT NULL CHECK (payload::json IS NOT NULL),
        envelope_timestamp text NOT NULL,
        message_id text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        published boolean NOT NULL DEFAULT false,
        published_at timestamptz,
        UNIQUE (store, seq)
    );
    CREATE INDEX outbox_unpublished ON outbox (id) WHERE NOT published;

    -- state NULL: deleted. The row stays so that its clock judges a late
    -- change from the exchange.
    CREATE TABLE entities (
        store text NOT NULL,
        entity text NOT NULL,
        id text NOT NULL,
        state jsonb,
        seq bigint NOT NULL,
        clock bigint NOT NULL,
        PRIMARY KEY (store, entity, id)
    );

    -- answer NULL: the first submission under the key is in progress.
    CREATE TABLE idempotency (
        client text NOT NULL,
        key text NOT NULL,
        fingerprint text NOT NULL,
        answer text,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (client, key)
    );

    -- stores NULL: every store.
    CREATE TABLE tokens (
        name text PRIMARY KEY,
        hash text NOT NULL UNIQUE,
        stores text[],
        created_at bigint NOT NULL
    );
",
    r"
    -- json keeps the text as given: jsonb refuses a \u0000 escape, which
    -- JSON allows and SQLite stores.
    ALTER TABLE entities ALTER COLUMN state TYPE json USING state::json;

    -- The last clock from the exchange of each type without an entity, per
    -- store: it judges that type's late changes.
    CREATE TABLE type_clocks (
        store text NOT NULL,
        message_type text NOT NULL,
        clock bigint NOT NULL,
        PRIMARY KEY (store, message_type)
    );

    -- A message id names one change of its store.
    CREATE INDEX outbox_message_id ON outbox (store, message_id);

    -- Keys are forgotten after a retention.
    CREATE INDEX idempotency_created_at ON idempotency (created_at);

    -- The direct consumer's keys, under a name no token can have.
    UPDATE idempotency SET client = ':exchange' WHERE client = 'exchange';
",
    r"
    -- The catalog's id, made once with the database: terminals follow one
    -- catalog's sequence per store and refuse another's.
    CREATE TABLE catalog_identity (id text NOT NULL);
    INSERT INTO catalog_identity (id) SELECT replace(gen_random_uuid()::text, '-', '');
",
    r"
    -- What terminals sent upstream, each message once; cursor orders them.
    CREATE TABLE upstream (
        cursor bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        store text NOT NULL,
        terminal text NOT NULL,
        message_type text NOT NULL,
        message_id text NOT NULL,
        created_at text NOT NULL,
        received_ms bigint NOT NULL,
        payload text NOT NULL CHECK (payload::json IS NOT NULL),
        UNIQUE (store, terminal, message_id)
    );
    CREATE INDEX upstream_store ON upstream (store, cursor);

    -- Each terminal's latest receipt.
    CREATE TABLE fleet (
        store text NOT NULL,
        terminal text NOT NULL,
        first_seen_ms bigint NOT NULL,
        last_seen_ms bigint NOT NULL,
        applied_up_to bigint NOT NULL,
        highest_applied bigint NOT NULL,
        quarantined bigint NOT NULL,
        outbox bigint NOT NULL,
        applied_changed_ms bigint NOT NULL,
        stopping boolean NOT NULL,
        run text NOT NULL,
        n bigint NOT NULL,
        PRIMARY KEY (store, terminal)
    );
",
    r#"
    -- Snapshots page through a store's entities in byte order.
    CREATE INDEX entities_snapshot ON entities (store, entity COLLATE "C", id COLLATE "C");
"#,
    r"
    -- Each store's checksum per kind of entity: the wrapping sum of its
    -- entities' digests (the bits of an unsigned 64-bit integer) and how
    -- many, kept by every submission.
    CREATE TABLE checksums (
        store text NOT NULL,
        entity text NOT NULL,
        digest_sum bigint NOT NULL,
        entity_count bigint NOT NULL,
        PRIMARY KEY (store, entity)
    );

    -- The fingerprint of the spec the checksums are kept under; '': none,
    -- computed at the backend's next start.
    CREATE TABLE checksum_spec (fingerprint text NOT NULL);
    INSERT INTO checksum_spec (fingerprint) VALUES ('');

    -- A store's unpublished changes, found without reading its published ones.
    CREATE INDEX outbox_store_unpublished ON outbox (store, seq) WHERE NOT published;

    -- What each terminal's latest receipt said of its catalog's verification.
    ALTER TABLE fleet ADD COLUMN verified_seq bigint;
    ALTER TABLE fleet ADD COLUMN gap text;
",
    r"
    -- The checksums' past values: each row is a store's checksum of a kind
    -- from seq on, seq being the end of the submission that moved it.
    CREATE TABLE checksum_log (
        store text NOT NULL,
        entity text NOT NULL,
        seq bigint NOT NULL,
        digest_sum bigint NOT NULL,
        entity_count bigint NOT NULL,
        PRIMARY KEY (store, entity, seq)
    );

    -- The log starts when the checksums are computed again, at the
    -- backend's next start: that logs every kind at each store's head.
    UPDATE checksum_spec SET fingerprint = '';
",
];

/// The backend's database on PostgreSQL.
///
/// Connections are made without TLS: run PostgreSQL on the same host (or
/// reach it through a tunnel) and give the backend a database of its own.
#[derive(Debug)]
pub struct PostgresStorage {
    config: Config,
    pool: Pool,
    /// The connection holding the relay's advisory lock, once this storage
    /// leads the relay: the lock lives as long as it.
    leader: Mutex<Option<Client>>,
}

/// The advisory lock that orders upstream recordings (any number; this
/// one spells "upstrm").
const UPSTREAM_LOCK: i64 = 0x7570_7374_726d;

impl PostgresStorage {
    /// Connects to the database at `url`
    /// (`postgres://user[:password]@host[:port]/database`) and brings its
    /// schema up to date; two instances starting together migrate one after
    /// the other.
    pub async fn connect(url: &str) -> Result<Self, StorageError> {
        let mut config: Config = url.parse().map_err(|err| {
            StorageError::Database(format!(
                "the PostgreSQL URL is invalid ({}); expected postgres://user@host:port/database",
                describe(&err)
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES)
            .tcp_user_timeout(TCP_USER_TIMEOUT);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|err| {
                StorageError::Database(format!("cannot build a connection pool: {err}"))
            })?;
        let storage = Self {
            config,
            pool,
            leader: Mutex::new(None),
        };
        storage.migrate().await?;
        Ok(storage)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StorageError> {
        self.pool.get().await.map_err(|err| {
            let cause = match &err {
                deadpool_postgres::PoolError::Backend(err) => describe(err),
                err => err.to_string(),
            };
            StorageError::Database(format!(
                "cannot reach PostgreSQL (database {:?}): {cause}; check that it runs and that the URL is right",
                self.config.get_dbname().unwrap_or_default()
            ))
        })
    }

    /// Upstream messages chosen by `clause` (the query's `WHERE ... LIMIT`).
    async fn read_upstream(
        &self,
        clause: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Received>, StorageError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT cursor, store, terminal, message_type, message_id, created_at,
                        payload, received_ms
                     FROM upstream {clause}"
                ),
                params,
            )
            .await
            .map_err(failed("cannot read upstream messages"))?;
        rows.iter()
            .map(|row| {
                Ok(Received {
                    cursor: col(row, 0)?,
                    record: UpstreamRecord {
                        store: col(row, 1)?,
                        terminal: col(row, 2)?,
                        message_type: col(row, 3)?,
                        message_id: col(row, 4)?,
                        created_at: col(row, 5)?,
                        payload: col(row, 6)?,
                    },
                    received_ms: col(row, 7)?,
                })
            })
            .collect()
    }

    async fn migrate(&self) -> Result<(), StorageError> {
        let sql = failed("cannot migrate the schema");
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(&sql)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(&sql)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS possync_schema (version integer NOT NULL)")
            .await
            .map_err(&sql)?;
        let row = tx
            .query_one("SELECT coalesce(max(version), 0) FROM possync_schema", &[])
            .await
            .map_err(&sql)?;
        let applied = usize::try_from(col::<i32>(&row, 0)?).unwrap_or_default();
        if applied > MIGRATIONS.len() {
            return Err(StorageError::Database(format!(
                "the database's schema is version {applied}, newer than this possync knows ({}); upgrade possync",
                MIGRATIONS.len()
            )));
        }
        for (version, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
            tx.batch_execute(migration).await.map_err(&sql)?;
            let version = i32::try_from(version + 1).unwrap_or(i32::MAX);
            tx.execute(
                "INSERT INTO possync_schema (version) VALUES ($1)",
                &[&version],
            )
            .await
            .map_err(&sql)?;
        }
        tx.commit().await.map_err(&sql)
    }
}

/// A PostgreSQL error with the server's own message, which the driver's
/// display leaves out.
fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let mut text = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" ({detail})"));
        }
        return text;
    }
    match err.source() {
        Some(source) => format!("{err}: {source}"),
        None => err.to_string(),
    }
}

/// A failed statement: refused for what it holds (SQLSTATE class 22, data
/// exception, or 23, integrity constraint violation), which no retry
/// changes, or the database failed.
fn failed(what: &str) -> impl Fn(tokio_postgres::Error) -> StorageError + '_ {
    move |err| {
        let refused = err
            .code()
            .is_some_and(|code| matches!(code.code().get(..2), Some("22" | "23")));
        let text = format!("{what}: {}", describe(&err));
        if refused {
            StorageError::Refused(text)
        } else {
            StorageError::Database(text)
        }
    }
}

fn parse_state(value: Value) -> Result<Map<String, Value>, StorageError> {
    match value {
        Value::Object(state) => Ok(state),
        other => Err(StorageError::Database(format!(
            "an entity's stored state is {other}, not an object; the database was changed by hand"
        ))),
    }
}

fn outbox_row(row: &Row) -> Result<OutboxRow, StorageError> {
    Ok(OutboxRow {
        store: col(row, 0)?,
        seq: col(row, 1)?,
        message_type: col(row, 2)?,
        payload: col(row, 3)?,
        timestamp: col(row, 4)?,
        message_id: col(row, 5)?,
    })
}

fn token(row: &Row) -> Result<TokenRecord, StorageError> {
    Ok(TokenRecord {
        name: col(row, 0)?,
        hash: col(row, 1)?,
        stores: col(row, 2)?,
        created_at: col(row, 3)?,
    })
}

/// A column's value; a type the schema does not give it is an error, not a
/// panic.
fn col<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, StorageError> {
    row.try_get(index).map_err(|err| {
        StorageError::Database(format!(
            "unexpected column {index} ({}); the database schema was changed by hand",
            describe(&err)
        ))
    })
}

/// Whether `client`'s session still holds the relay's advisory lock,
/// answered within [`LOCK_CHECK_TIMEOUT`]: a connection that is closed,
/// fails or does not answer in time holds nothing.
async fn holds_relay_lock(client: &Client) -> bool {
    if client.is_closed() {
        return false;
    }
    // An advisory lock on a bigint key shows in pg_locks as its high and
    // low 32 bits, in classid and objid, with objsubid 1.
    let check = client.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_locks
            WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
              AND objsubid = 1 AND (classid::int8 << 32 | objid::int8) = $1)",
        &[&RELAY_LOCK],
    );
    match tokio::time::timeout(LOCK_CHECK_TIMEOUT, check).await {
        Ok(Ok(row)) => row.try_get::<_, bool>(0).unwrap_or(false),
        Ok(Err(_)) | Err(_) => false,
    }
}

fn limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl Storage for PostgresStorage {
    async fn submit(
        &self,
        changes: Vec<NewChange>,
        key: Option<IdempotencyKey>,
        checksums: &ChecksumSpec,
    ) -> Result<Submitted, StorageError> {
        let sql = failed("cannot store the submission");
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(&sql)?;

        if let Some(key) = &key {
            // Claiming the key first makes a concurrent submission under it
            // wait for this one, then see its answer.
            let claimed = tx
                .query_opt(
                    "INSERT INTO idempotency (client, key, fingerprint) VALUES ($1, $2, $3)
                     ON CONFLICT (client, key) DO NOTHING RETURNING 1",
                    &[&key.client, &key.key, &key.fingerprint],
                )
                .await
                .map_err(&sql)?;
            if claimed.is_none() {
                let row = tx
                    .query_one(
                        "SELECT fingerprint, answer FROM idempotency WHERE client = $1 AND key = $2",
                        &[&key.client, &key.key],
                    )
                    .await
                    .map_err(&sql)?;
                let fingerprint: String = col(&row, 0)?;
                if fingerprint != key.fingerprint {
                    return Err(StorageError::KeyReused {
                        key: key.key.clone(),
                    });
                }
                let stored: Option<String> = col(&row, 1)?;
                let stored = stored.ok_or_else(|| {
                    StorageError::Database(
                        "an idempotency key has no answer; the database was changed by hand".into(),
                    )
                })?;
                return Ok(Submitted {
                    accepted: answer::decode(&stored)?,
                    replayed: true,
                });
            }
        }

        let mut before = Before::default();
        let lock = tx
            .prepare_cached(
                "INSERT INTO stores (store, head) VALUES ($1, 0)
                 ON CONFLICT (store) DO UPDATE SET head = stores.head RETURNING head",
            )
            .await
            .map_err(&sql)?;
        for store in plan::stores(&changes) {
            let row = tx.query_one(&lock, &[&store]).await.map_err(&sql)?;
            before.heads.insert(store, col(&row, 0)?);
        }

        // Read after the stores' rows are locked: every writer of these
        // stores committed, or waits.
        let (stores, ids): (Vec<String>, Vec<String>) =
            plan::message_keys(&changes).into_iter().unzip();
        let rows = tx
            .query(
                "SELECT DISTINCT store, message_id FROM outbox
                 WHERE (store, message_id) IN
                    (SELECT * FROM unnest($1::text[], $2::text[]))",
                &[&stores, &ids],
            )
            .await
            .map_err(&sql)?;
        for row in rows {
            before.used_ids.insert((col(&row, 0)?, col(&row, 1)?));
        }
        let keys = plan::type_keys(&changes);
        if !keys.is_empty() {
            let (stores, types): (Vec<&str>, Vec<&str>) = keys
                .iter()
                .map(|(store, message_type)| (store.as_str(), message_type.as_str()))
                .unzip();
            let rows = tx
                .query(
                    "SELECT store, message_type, clock FROM type_clocks
                     WHERE (store, message_type) IN
                        (SELECT * FROM unnest($1::text[], $2::text[]))",
                    &[&stores, &types],
                )
                .await
                .map_err(&sql)?;
            for row in rows {
                before
                    .type_clocks
                    .insert((col(&row, 0)?, col(&row, 1)?), col(&row, 2)?);
            }
        }

        let keys = plan::entity_keys(&changes);
        if !keys.is_empty() {
            let (stores, (kinds, ids)): (Vec<&str>, (Vec<&str>, Vec<&str>)) = keys
                .iter()
                .map(|(store, kind, id)| (store.as_str(), (kind.as_str(), id.as_str())))
                .unzip();
            let rows = tx
                .query(
                    "SELECT store, entity, id, state, clock FROM entities
                     WHERE (store, entity, id) IN
                        (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))",
                    &[&stores, &kinds, &ids],
                )
                .await
                .map_err(&sql)?;
            for row in rows {
                let state: Option<Value> = col(&row, 3)?;
                before.entities.insert(
                    (col(&row, 0)?, col(&row, 1)?, col(&row, 2)?),
                    StoredEntity {
                        state: state.map(parse_state).transpose()?,
                        clock: col(&row, 4)?,
                    },
                );
            }
        }

        if plan::reads_checksums(&changes, &before) {
            before.checksums = stored_checksums(&tx, &changes, checksums).await?;
        }

        let plan = plan::plan(changes, before, checksums)?;
        if !plan.outbox.is_empty() {
            let outbox = &plan.outbox;
            let stores: Vec<&str> = outbox.iter().map(|row| row.store.as_str()).collect();
            let seqs: Vec<i64> = outbox.iter().map(|row| row.seq).collect();
            let types: Vec<&str> = outbox.iter().map(|row| row.message_type.as_str()).collect();
            let payloads: Vec<&str> = outbox.iter().map(|row| row.payload.as_str()).collect();
            let stamps: Vec<&str> = outbox.iter().map(|row| row.timestamp.as_str()).collect();
            let ids: Vec<&str> = outbox.iter().map(|row| row.message_id.as_str()).collect();
            tx.execute(
                "INSERT INTO outbox
                    (store, seq, message_type, payload, envelope_timestamp, message_id)
                 SELECT store, seq, message_type, payload, envelope_timestamp, message_id
                 FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[])
                    WITH ORDINALITY
                    AS rows (store, seq, message_type, payload, envelope_timestamp, message_id, n)
                 ORDER BY n",
                &[&stores, &seqs, &types, &payloads, &stamps, &ids],
            )
            .await
            .map_err(&sql)?;
        }
        if !plan.entities.is_empty() {
            let writes = &plan.entities;
            let stores: Vec<&str> = writes.iter().map(|w| w.key.0.as_str()).collect();
            let kinds: Vec<&str> = writes.iter().map(|w| w.key.1.as_str()).collect();
            let ids: Vec<&str> = writes.iter().map(|w| w.key.2.as_str()).collect();
            let states: Vec<Option<Value>> = writes
                .iter()
                .map(|w| w.stored.state.clone().map(Value::Object))
                .collect();
            let seqs: Vec<i64> = writes.iter().map(|w| w.seq).collect();
            let clocks: Vec<i64> = writes.iter().map(|w| w.stored.clock).collect();
            tx.execute(
                "INSERT INTO entities (store, entity, id, state, seq, clock)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::json[],
                                      $5::int8[], $6::int8[])
                 ON CONFLICT (store, entity, id) DO UPDATE
                 SET state = excluded.state, seq = excluded.seq, clock = excluded.clock",
                &[&stores, &kinds, &ids, &states, &seqs, &clocks],
            )
            .await
            .map_err(&sql)?;
        }
        if !plan.checksums.is_empty() {
            let (keys, rows): (Vec<_>, Vec<_>) = plan
                .checksums
                .iter()
                .map(|(key, checksum)| (key, checksums::to_row(*checksum)))
                .unzip();
            let stores: Vec<&str> = keys.iter().map(|key| key.0.as_str()).collect();
            let kinds: Vec<&str> = keys.iter().map(|key| key.1.as_str()).collect();
            let (sums, counts): (Vec<i64>, Vec<i64>) = rows.into_iter().unzip();
            tx.execute(
                "INSERT INTO checksums (store, entity, digest_sum, entity_count)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[])
                 ON CONFLICT (store, entity) DO UPDATE
                 SET digest_sum = excluded.digest_sum, entity_count = excluded.entity_count",
                &[&stores, &kinds, &sums, &counts],
            )
            .await
            .map_err(&sql)?;
        }
        if !plan.log.is_empty() {
            log_checksums(&tx, &plan.log).await?;
        }
        if !plan.heads.is_empty() {
            let (stores, heads): (Vec<&str>, Vec<i64>) = plan
                .heads
                .iter()
                .map(|(store, head)| (store.as_str(), *head))
                .unzip();
            tx.execute(
                "UPDATE stores SET head = moved.head
                 FROM unnest($1::text[], $2::int8[]) AS moved (store, head)
                 WHERE stores.store = moved.store",
                &[&stores, &heads],
            )
            .await
            .map_err(&sql)?;
        }
        if !plan.type_clocks.is_empty() {
            let stores: Vec<&str> = plan.type_clocks.iter().map(|(k, _)| k.0.as_str()).collect();
            let types: Vec<&str> = plan.type_clocks.iter().map(|(k, _)| k.1.as_str()).collect();
            let clocks: Vec<i64> = plan.type_clocks.iter().map(|(_, clock)| *clock).collect();
            tx.execute(
                "INSERT INTO type_clocks (store, message_type, clock)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[])
                 ON CONFLICT (store, message_type) DO UPDATE SET clock = excluded.clock",
                &[&stores, &types, &clocks],
            )
            .await
            .map_err(&sql)?;
        }
        if let Some(key) = &key {
            let answer = answer::encode(&plan.accepted)?;
            tx.execute(
                "UPDATE idempotency SET answer = $3 WHERE client = $1 AND key = $2",
                &[&key.client, &key.key, &answer],
            )
            .await
            .map_err(&sql)?;
        }
        tx.commit().await.map_err(&sql)?;
        Ok(Submitted {
            accepted: plan.accepted,
            replayed: false,
        })
    }

    async fn sync_checksums(
        &self,
        spec: &ChecksumSpec,
    ) -> Result<Option<Recomputed>, StorageError> {
        let sql = failed("cannot compute the checksums again");
        let fingerprint = spec.fingerprint();
        let mut client = self.client().await?;
        // Most starts find them kept under `spec`: asked before any lock.
        if stored_fingerprint(&client).await? == fingerprint {
            return Ok(None);
        }
        let tx = client.transaction().await.map_err(&sql)?;
        // Every submission writes its stores' rows first: this waits for
        // those under way to commit and holds back the next ones (and
        // another process's recomputing) until this commits, so no
        // submission's checksums are lost under the new ones. Reads go on.
        tx.batch_execute("LOCK TABLE stores IN SHARE ROW EXCLUSIVE MODE")
            .await
            .map_err(&sql)?;
        if stored_fingerprint(&tx).await? == fingerprint {
            return Ok(None);
        }
        let kinds: Vec<&str> = spec.kinds().collect();
        let params: [&(dyn ToSql + Sync); 1] = [&kinds];
        let rows = tx
            .query_raw(
                "SELECT store, entity, id, state FROM entities
                 WHERE state IS NOT NULL AND entity = ANY($1)",
                params,
            )
            .await
            .map_err(&sql)?;
        let mut rows = std::pin::pin!(rows);
        let mut tally = Tally::new(spec);
        while let Some(row) = rows.try_next().await.map_err(&sql)? {
            let (store, kind, id): (String, String, String) =
                (col(&row, 0)?, col(&row, 1)?, col(&row, 2)?);
            tally.add(&store, &kind, &id, &parse_state(col(&row, 3)?)?);
        }
        let (sums, recomputed) = tally.finish();
        tx.execute("DELETE FROM checksums", &[])
            .await
            .map_err(&sql)?;
        let stores: Vec<&str> = sums.keys().map(|key| key.0.as_str()).collect();
        let kinds: Vec<&str> = sums.keys().map(|key| key.1.as_str()).collect();
        let (digests, counts): (Vec<i64>, Vec<i64>) = sums
            .values()
            .map(|checksum| checksums::to_row(*checksum))
            .unzip();
        tx.execute(
            "INSERT INTO checksums (store, entity, digest_sum, entity_count)
             SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[])",
            &[&stores, &kinds, &digests, &counts],
        )
        .await
        .map_err(&sql)?;
        // The log starts again: every kind of every store at its head, as
        // the checksums table now holds them (no row: zero).
        let kinds: Vec<&str> = spec.kinds().collect();
        tx.batch_execute("DELETE FROM checksum_log")
            .await
            .map_err(&sql)?;
        tx.execute(
            "INSERT INTO checksum_log (store, entity, seq, digest_sum, entity_count)
             SELECT stores.store, kinds.entity, stores.head,
                coalesce(kept.digest_sum, 0), coalesce(kept.entity_count, 0)
             FROM stores CROSS JOIN unnest($1::text[]) AS kinds (entity)
             LEFT JOIN checksums AS kept
                ON kept.store = stores.store AND kept.entity = kinds.entity",
            &[&kinds],
        )
        .await
        .map_err(&sql)?;
        tx.execute("UPDATE checksum_spec SET fingerprint = $1", &[&fingerprint])
            .await
            .map_err(&sql)?;
        tx.commit().await.map_err(&sql)?;
        Ok(Some(recomputed))
    }

    async fn checkpoint(
        &self,
        store: &str,
        spec: &ChecksumSpec,
    ) -> Result<StoreCheckpoint, StorageError> {
        let client = self.client().await?;
        // One statement: one snapshot, in which the head, the outbox and
        // the checksums agree. One row, with the checksum columns NULL,
        // when the store has none.
        let rows = client
            .query(
                "SELECT (SELECT head FROM stores WHERE store = $1),
                    (SELECT max(seq) FROM outbox WHERE store = $1 AND NOT published),
                    spec.fingerprint, kept.entity, kept.digest_sum, kept.entity_count
                 FROM checksum_spec AS spec
                 LEFT JOIN checksums AS kept ON kept.store = $1",
                &[&store],
            )
            .await
            .map_err(failed("cannot read the store's checkpoint"))?;
        let first = rows.first().ok_or_else(|| {
            StorageError::Database(
                "the table checksum_spec is empty; the database was changed by hand".into(),
            )
        })?;
        let head: Option<i64> = col(first, 0)?;
        let highest_unpublished: Option<i64> = col(first, 1)?;
        let fingerprint: String = col(first, 2)?;
        let checksums = if fingerprint == spec.fingerprint() {
            let mut kept = Vec::with_capacity(rows.len());
            for row in &rows {
                let kind: Option<String> = col(row, 3)?;
                if let Some(kind) = kind {
                    kept.push((kind, checksums::from_row(col(row, 4)?, col(row, 5)?)));
                }
            }
            Some(checksums::of_store(spec, kept))
        } else {
            None
        };
        Ok(StoreCheckpoint {
            head: head.unwrap_or(0),
            highest_unpublished,
            checksums,
        })
    }

    async fn checkpoint_at(
        &self,
        store: &str,
        up_to: i64,
        spec: &ChecksumSpec,
    ) -> Result<Option<ChecksumsAt>, StorageError> {
        let client = self.client().await?;
        let kinds: Vec<&str> = spec.kinds().collect();
        // One statement: one snapshot. Each kind's latest row at or below
        // `up_to`: the highest of them is the boundary, and each is its
        // kind's latest at or below it too. One row, with NULLs, when the
        // spec has no kind.
        let rows = client
            .query(
                "SELECT spec.fingerprint, kinds.entity,
                    latest.seq, latest.digest_sum, latest.entity_count
                 FROM checksum_spec AS spec
                 LEFT JOIN unnest($2::text[]) AS kinds (entity) ON true
                 LEFT JOIN LATERAL (
                    SELECT seq, digest_sum, entity_count FROM checksum_log AS log
                    WHERE log.store = $1 AND log.entity = kinds.entity AND log.seq <= $3
                    ORDER BY log.seq DESC LIMIT 1) AS latest ON true",
                &[&store, &kinds, &up_to],
            )
            .await
            .map_err(failed("cannot read the checksum log"))?;
        let first = rows.first().ok_or_else(|| {
            StorageError::Database(
                "the table checksum_spec is empty; the database was changed by hand".into(),
            )
        })?;
        let fingerprint: String = col(first, 0)?;
        if fingerprint != spec.fingerprint() {
            return Ok(None);
        }
        let mut found = Vec::with_capacity(rows.len());
        for row in &rows {
            let kind: Option<String> = col(row, 1)?;
            let seq: Option<i64> = col(row, 2)?;
            if let (Some(kind), Some(seq)) = (kind, seq) {
                let checksum = checksums::from_row(col(row, 3)?, col(row, 4)?);
                found.push((kind, seq, checksum));
            }
        }
        Ok(checksums::at_boundary(spec, found))
    }

    async fn prune_checksum_log(&self, store: &str, below: i64) -> Result<u64, StorageError> {
        let sql = failed("cannot trim the checksum log");
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(&sql)?;
        // The store's row, as a submission writes it first: this waits for
        // the store's submissions under way (and a recomputing), whose
        // trims of the same rows would otherwise deadlock with this one.
        tx.execute("UPDATE stores SET head = head WHERE store = $1", &[&store])
            .await
            .map_err(&sql)?;
        let removed = tx
            .execute(
                "DELETE FROM checksum_log AS log
                 WHERE log.store = $1 AND log.seq < $2 AND log.seq <
                    (SELECT max(kept.seq) FROM checksum_log AS kept
                     WHERE kept.store = $1 AND kept.entity = log.entity AND kept.seq <= $2)",
                &[&store, &below],
            )
            .await
            .map_err(&sql)?;
        tx.commit().await.map_err(&sql)?;
        Ok(removed)
    }

    async fn unpublished(&self, limit_rows: usize) -> Result<Vec<OutboxRow>, StorageError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT store, seq, message_type, payload, envelope_timestamp, message_id
                 FROM outbox WHERE NOT published ORDER BY id LIMIT $1",
                &[&limit(limit_rows)],
            )
            .await
            .map_err(failed("cannot read the outbox"))?;
        rows.iter().map(outbox_row).collect()
    }

    async fn mark_published(&self, rows: &[(String, i64)]) -> Result<(), StorageError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (stores, seqs): (Vec<&str>, Vec<i64>) = rows
            .iter()
            .map(|(store, seq)| (store.as_str(), *seq))
            .unzip();
        let client = self.client().await?;
        client
            .execute(
                "UPDATE outbox SET published = true, published_at = now()
                 FROM unnest($1::text[], $2::int8[]) AS confirmed (store, seq)
                 WHERE outbox.store = confirmed.store AND outbox.seq = confirmed.seq
                   AND NOT outbox.published",
                &[&stores, &seqs],
            )
            .await
            .map_err(failed("cannot mark outbox rows published"))?;
        Ok(())
    }

    async fn lead_relay(&self) -> Result<bool, StorageError> {
        let mut leader = self.leader.lock().await;
        if let Some(client) = leader.as_ref() {
            if holds_relay_lock(client).await {
                return Ok(true);
            }
            // The connection ended, hangs, or no longer holds the lock (a
            // server restart, a terminated backend): whoever takes it now
            // leads. Dropping the client ends its connection.
            tracing::warn!(
                event = "relay_lock_lost",
                "the relay's lock is lost; another backend may relay now"
            );
            *leader = None;
        }
        let sql = failed("cannot take the relay's lock");
        let (client, connection) = self.config.connect(NoTls).await.map_err(&sql)?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::warn!(
                    event = "relay_lock_lost",
                    error = %describe(&err),
                    "the connection holding the relay's lock ended; another backend may relay now"
                );
            }
        });
        let row = tokio::time::timeout(
            LOCK_CHECK_TIMEOUT,
            client.query_one("SELECT pg_try_advisory_lock($1)", &[&RELAY_LOCK]),
        )
        .await
        .map_err(|_| {
            StorageError::Database(format!(
                "PostgreSQL did not answer within {} s while taking the relay's lock",
                LOCK_CHECK_TIMEOUT.as_secs()
            ))
        })?
        .map_err(&sql)?;
        let locked: bool = col(&row, 0)?;
        if locked {
            *leader = Some(client);
        }
        Ok(locked)
    }

    async fn prune_keys(&self, older_than: Duration) -> Result<u64, StorageError> {
        let seconds = older_than.as_secs_f64();
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM idempotency
                 WHERE created_at < now() - make_interval(secs => $1) AND answer IS NOT NULL",
                &[&seconds],
            )
            .await
            .map_err(failed("cannot forget old idempotency keys"))
    }

    async fn catalog(&self, store: &str) -> Result<Vec<CatalogEntry>, StorageError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT entity, id, state, seq FROM entities
                 WHERE store = $1 AND state IS NOT NULL ORDER BY entity, id",
                &[&store],
            )
            .await
            .map_err(failed("cannot read the catalog"))?;
        rows.iter().map(catalog_entry).collect()
    }

    async fn catalog_page(
        &self,
        store: &str,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<CatalogPage, StorageError> {
        let client = self.client().await?;
        let sql = failed("cannot read the catalog");
        // The head first: the page, read after it, holds every change up to it.
        let head: i64 = client
            .query_opt("SELECT head FROM stores WHERE store = $1", &[&store])
            .await
            .map_err(&sql)?
            .map(|row| col(&row, 0))
            .transpose()?
            .unwrap_or(0);
        let (entity, id) = after.unwrap_or_default();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // COLLATE "C": byte order, as the terminal and SQLite compare.
        let rows = client
            .query(
                r#"SELECT entity, id, state, seq FROM entities
                 WHERE store = $1 AND (entity COLLATE "C", id COLLATE "C") > ($2, $3)
                   AND state IS NOT NULL
                 ORDER BY entity COLLATE "C", id COLLATE "C" LIMIT $4"#,
                &[&store, &entity, &id, &limit],
            )
            .await
            .map_err(&sql)?;
        let entries = rows
            .iter()
            .map(catalog_entry)
            .collect::<Result<_, StorageError>>()?;
        // Read after the states: it bounds the changes they show.
        let settled: i64 = client
            .query_opt("SELECT head FROM stores WHERE store = $1", &[&store])
            .await
            .map_err(&sql)?
            .map(|row| col(&row, 0))
            .transpose()?
            .unwrap_or(0);
        Ok(CatalogPage {
            head,
            settled,
            entries,
        })
    }

    async fn changes_after(
        &self,
        store: &str,
        after: i64,
        limit_rows: usize,
    ) -> Result<Vec<Change>, StorageError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT store, seq, message_type, payload, envelope_timestamp, message_id, published
                 FROM outbox WHERE store = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&store, &after, &limit(limit_rows)],
            )
            .await
            .map_err(failed("cannot read a store's changes"))?;
        rows.iter()
            .map(|row| {
                Ok(Change {
                    row: outbox_row(row)?,
                    published: col(row, 6)?,
                })
            })
            .collect()
    }

    async fn catalog_id(&self) -> Result<String, StorageError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT id FROM catalog_identity", &[])
            .await
            .map_err(failed("cannot read the catalog's id"))?;
        col(&row, 0)
    }

    async fn heads(&self) -> Result<Vec<StoreHead>, StorageError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT store, head,
                    (SELECT count(*) FROM outbox
                     WHERE outbox.store = stores.store AND NOT published)
                 FROM stores WHERE head > 0 ORDER BY store",
                &[],
            )
            .await
            .map_err(failed("cannot read the stores' heads"))?;
        rows.iter()
            .map(|row| {
                Ok(StoreHead {
                    store: col(row, 0)?,
                    head: col(row, 1)?,
                    unpublished: col(row, 2)?,
                })
            })
            .collect()
    }

    async fn create_token(&self, token: TokenRecord) -> Result<(), StorageError> {
        let client = self.client().await?;
        let inserted = client
            .execute(
                "INSERT INTO tokens (name, hash, stores, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO NOTHING",
                &[&token.name, &token.hash, &token.stores, &token.created_at],
            )
            .await
            .map_err(failed("cannot store the token"))?;
        if inserted == 0 {
            return Err(StorageError::TokenExists(token.name));
        }
        Ok(())
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StorageError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT name, hash, stores, created_at FROM tokens ORDER BY name",
                &[],
            )
            .await
            .map_err(failed("cannot read the tokens"))?;
        rows.iter().map(token).collect()
    }

    async fn revoke_token(&self, name: &str) -> Result<bool, StorageError> {
        let client = self.client().await?;
        let removed = client
            .execute("DELETE FROM tokens WHERE name = $1", &[&name])
            .await
            .map_err(failed("cannot revoke the token"))?;
        Ok(removed > 0)
    }

    async fn record_upstream(
        &self,
        messages: Vec<UpstreamRecord>,
    ) -> Result<Vec<bool>, StorageError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let sql = failed("cannot record upstream messages");
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(&sql)?;
        // One recording at a time, across backend processes: cursors then
        // commit in their order, so a reader following them never passes
        // one still to commit.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&UPSTREAM_LOCK])
            .await
            .map_err(&sql)?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO upstream (store, terminal, message_type, message_id, created_at,
                    received_ms, payload)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (store, terminal, message_id) DO NOTHING",
            )
            .await
            .map_err(&sql)?;
        let now = possync_core::unix_now_ms();
        let mut new = Vec::with_capacity(messages.len());
        for m in &messages {
            let inserted = tx
                .execute(
                    &insert,
                    &[
                        &m.store,
                        &m.terminal,
                        &m.message_type,
                        &m.message_id,
                        &m.created_at,
                        &now,
                        &m.payload,
                    ],
                )
                .await
                .map_err(&sql)?;
            new.push(inserted > 0);
        }
        tx.commit().await.map_err(&sql)?;
        Ok(new)
    }

    async fn upstream_after(
        &self,
        store: &str,
        message_type: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Received>, StorageError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_upstream(
            "WHERE store = $1 AND cursor > $2 AND ($3::text IS NULL OR message_type = $3)
             ORDER BY cursor LIMIT $4",
            &[&store, &after, &message_type, &limit],
        )
        .await
    }

    async fn upstream_since(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Received>, StorageError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_upstream(
            "WHERE cursor > $1 ORDER BY cursor LIMIT $2",
            &[&after, &limit],
        )
        .await
    }

    async fn record_receipts(&self, receipts: Vec<ReceiptRecord>) -> Result<(), StorageError> {
        if receipts.is_empty() {
            return Ok(());
        }
        let sql = failed("cannot record receipts");
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(&sql)?;
        let upsert = tx
            .prepare_cached(
                "INSERT INTO fleet (store, terminal, first_seen_ms, last_seen_ms, applied_up_to,
                    highest_applied, quarantined, outbox, applied_changed_ms, stopping, run, n,
                    verified_seq, gap)
                 VALUES ($1, $2, $3, $3, $4, $5, $6, $7, $3, $8, $9, $10, $11, $12)
                 ON CONFLICT (store, terminal) DO UPDATE SET
                    last_seen_ms = GREATEST(fleet.last_seen_ms, excluded.last_seen_ms),
                    applied_changed_ms = CASE WHEN excluded.applied_up_to <> fleet.applied_up_to
                        THEN excluded.last_seen_ms ELSE fleet.applied_changed_ms END,
                    applied_up_to = excluded.applied_up_to,
                    highest_applied = excluded.highest_applied,
                    quarantined = excluded.quarantined,
                    outbox = excluded.outbox,
                    stopping = excluded.stopping,
                    run = excluded.run,
                    n = excluded.n,
                    verified_seq = excluded.verified_seq,
                    gap = excluded.gap
                 WHERE excluded.run <> fleet.run OR excluded.n > fleet.n",
            )
            .await
            .map_err(&sql)?;
        for r in &receipts {
            let receipt = &r.receipt;
            tx.execute(
                &upsert,
                &[
                    &r.store,
                    &r.terminal,
                    &r.seen_ms,
                    &receipt.applied_up_to,
                    &receipt.highest_applied,
                    &i64::try_from(receipt.quarantined).unwrap_or(i64::MAX),
                    &i64::try_from(receipt.outbox).unwrap_or(i64::MAX),
                    &receipt.stopping,
                    &receipt.run,
                    &i64::try_from(receipt.n).unwrap_or(i64::MAX),
                    &receipt.verified_seq,
                    &receipt.gap,
                ],
            )
            .await
            .map_err(&sql)?;
        }
        tx.commit().await.map_err(&sql)
    }

    async fn fleet(&self, store: Option<&str>) -> Result<Vec<TerminalRecord>, StorageError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT fleet.store, terminal, first_seen_ms, last_seen_ms, applied_up_to,
                    highest_applied, quarantined, outbox, applied_changed_ms, stopping,
                    (extract(epoch FROM outbox.published_at) * 1000)::bigint, verified_seq, gap
                 FROM fleet LEFT JOIN outbox
                    ON outbox.store = fleet.store AND outbox.seq = fleet.applied_up_to + 1
                 WHERE $1::text IS NULL OR fleet.store = $1 ORDER BY fleet.store, terminal",
                &[&store],
            )
            .await
            .map_err(failed("cannot read the fleet"))?;
        rows.iter()
            .map(|row| {
                Ok(TerminalRecord {
                    store: col(row, 0)?,
                    terminal: col(row, 1)?,
                    first_seen_ms: col(row, 2)?,
                    last_seen_ms: col(row, 3)?,
                    applied_up_to: col(row, 4)?,
                    highest_applied: col(row, 5)?,
                    quarantined: col(row, 6)?,
                    outbox: col(row, 7)?,
                    applied_changed_ms: col(row, 8)?,
                    stopping: col(row, 9)?,
                    behind_since_ms: col(row, 10)?,
                    verified_seq: col(row, 11)?,
                    gap: col(row, 12)?,
                })
            })
            .collect()
    }

    async fn forget_terminal(&self, store: &str, terminal: &str) -> Result<bool, StorageError> {
        let client = self.client().await?;
        let removed = client
            .execute(
                "DELETE FROM fleet WHERE store = $1 AND terminal = $2",
                &[&store, &terminal],
            )
            .await
            .map_err(failed("cannot forget the terminal"))?;
        Ok(removed > 0)
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StorageError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT name, hash, stores, created_at FROM tokens WHERE hash = $1",
                &[&hash],
            )
            .await
            .map_err(failed("cannot look the token up"))?;
        row.as_ref().map(token).transpose()
    }
}

/// The fingerprint the checksums are kept under.
async fn stored_fingerprint(
    client: &impl deadpool_postgres::GenericClient,
) -> Result<String, StorageError> {
    let row = client
        .query_one("SELECT fingerprint FROM checksum_spec", &[])
        .await
        .map_err(failed("cannot read the checksums' spec"))?;
    col(&row, 0)
}

/// The stored checksums a submission under `spec` may move, if they are
/// kept under it; if not, marks them stale (see [`STALE`]) and leaves
/// them. Read after the submission's stores are locked: their checksums
/// are written only by the submissions that hold those locks.
async fn stored_checksums(
    tx: &deadpool_postgres::Transaction<'_>,
    changes: &[NewChange],
    spec: &ChecksumSpec,
) -> Result<Option<HashMap<checksums::ChecksumKey, possync_core::Checksum>>, StorageError> {
    let sql = failed("cannot read the checksums");
    let keys = plan::checksum_keys(changes, spec);
    let (stores, kinds): (Vec<&str>, Vec<&str>) = keys
        .iter()
        .map(|(store, kind)| (store.as_str(), kind.as_str()))
        .unzip();
    // One round trip: the fingerprint, beside the rows (none: NULLs).
    let rows = tx
        .query(
            "SELECT spec.fingerprint, kept.store, kept.entity, kept.digest_sum, kept.entity_count
             FROM checksum_spec AS spec
             LEFT JOIN (SELECT * FROM checksums
                        WHERE (store, entity) IN
                            (SELECT * FROM unnest($1::text[], $2::text[]))) AS kept ON true",
            &[&stores, &kinds],
        )
        .await
        .map_err(&sql)?;
    let stored: String = match rows.first() {
        Some(row) => col(row, 0)?,
        None => STALE.to_owned(),
    };
    if stored != spec.fingerprint() {
        if stored != STALE {
            tx.execute("UPDATE checksum_spec SET fingerprint = $1", &[&STALE])
                .await
                .map_err(&sql)?;
        }
        return Ok(None);
    }
    let mut kept = HashMap::new();
    for row in &rows {
        let store: Option<String> = col(row, 1)?;
        let kind: Option<String> = col(row, 2)?;
        if let (Some(store), Some(kind)) = (store, kind) {
            kept.insert(
                (store, kind),
                checksums::from_row(col(row, 3)?, col(row, 4)?),
            );
        }
    }
    Ok(Some(kept))
}

/// Writes a submission's checksum log rows, each trimmed of its rows more
/// than [`checksums::LOG_WINDOW`] seqs older and below the store's
/// unpublished changes (but the latest of those). One
/// statement: the trim sees the log as it was before the insert, which
/// it never reaches.
async fn log_checksums(
    tx: &deadpool_postgres::Transaction<'_>,
    rows: &[checksums::LogRow],
) -> Result<(), StorageError> {
    let stores: Vec<&str> = rows.iter().map(|(key, _, _)| key.0.as_str()).collect();
    let kinds: Vec<&str> = rows.iter().map(|(key, _, _)| key.1.as_str()).collect();
    let seqs: Vec<i64> = rows.iter().map(|(_, seq, _)| *seq).collect();
    let (sums, counts): (Vec<i64>, Vec<i64>) = rows
        .iter()
        .map(|(_, _, checksum)| checksums::to_row(*checksum))
        .unzip();
    tx.execute(
        "WITH logged AS (
            INSERT INTO checksum_log (store, entity, seq, digest_sum, entity_count)
            SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[])
            ON CONFLICT (store, entity, seq) DO UPDATE
            SET digest_sum = excluded.digest_sum, entity_count = excluded.entity_count
            RETURNING store, entity, seq)
         DELETE FROM checksum_log AS log
         USING (SELECT logged.store, logged.entity,
                    (SELECT max(kept.seq) FROM checksum_log AS kept
                     WHERE kept.store = logged.store AND kept.entity = logged.entity
                       AND kept.seq <= least(logged.seq - $6,
                            coalesce((SELECT min(outbox.seq) FROM outbox
                                      WHERE outbox.store = logged.store AND NOT outbox.published),
                                     logged.seq + 1) - 1)) AS keep
                FROM logged) AS bound
         WHERE log.store = bound.store AND log.entity = bound.entity AND log.seq < bound.keep",
        &[
            &stores,
            &kinds,
            &seqs,
            &sums,
            &counts,
            &checksums::LOG_WINDOW,
        ],
    )
    .await
    .map_err(failed("cannot log the checksums"))?;
    Ok(())
}

/// A catalog row `(entity, id, state, seq)` as an entry.
fn catalog_entry(row: &Row) -> Result<CatalogEntry, StorageError> {
    Ok(CatalogEntry {
        entity: col(row, 0)?,
        id: col(row, 1)?,
        state: parse_state(col(row, 2)?)?,
        seq: col(row, 3)?,
    })
}
