//! `possync demo`: a back office publishes to terminals of two stores; each
//! terminal applies only its own store's changes into its own SQLite file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use possync_core::{
    BrokerError, Config, InProcessBroker, LicenseKey, PublishError, Publisher, Registry, Status,
    Terminal, TerminalId, TerminalSettings,
};
use possync_sdk::{Envelope, Payload};

use crate::backend_client::{BackendClient, Outgoing};
use tokio::sync::watch;

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Folder for the terminals' database files (created; old demo files in it are replaced).
    #[arg(long, value_name = "DIR", default_value = "possync-demo")]
    dir: PathBuf,
}

const CAFE: &str = "DEMO-CAFE";
const BAKERY: &str = "DEMO-BAKERY";
const TERMINALS: [(&str, &str); 3] = [(CAFE, "till-1"), (CAFE, "till-2"), (BAKERY, "till-1")];
const WAIT: Duration = Duration::from_secs(20);

struct Running {
    license: &'static str,
    terminal: &'static str,
    database: PathBuf,
    status: watch::Receiver<Status>,
    task: tokio::task::JoinHandle<Result<(), possync_core::TerminalError>>,
}

/// What carries the demo's messages.
enum Transport {
    Broker(Box<Publisher>),
    /// The config names a backend: changes go to its catalog, which
    /// sequences them and relays them to the broker the terminals read.
    Backend(Box<Publisher>, Arc<BackendClient>),
    /// No broker answered: possync's in-process stand-in.
    InProcess(InProcessBroker),
}

impl Transport {
    /// Publishes one store's changes; how many were sent, and how.
    async fn publish(&self, envelopes: Vec<Envelope>) -> anyhow::Result<(usize, String)> {
        match self {
            Self::Broker(publisher) => {
                let published = publisher.publish_envelopes(envelopes).await?;
                Ok((
                    published.len(),
                    "published and confirmed by the broker".into(),
                ))
            }
            Self::InProcess(broker) => {
                let published = broker.publish_envelopes(envelopes)?;
                Ok((published.len(), "published in-process".into()))
            }
            Self::Backend(_, client) => {
                let changes = envelopes
                    .into_iter()
                    .map(|envelope| Outgoing {
                        store: envelope.license_key,
                        message_type: envelope.message_type,
                        payload: envelope.payload,
                    })
                    .collect::<Vec<_>>();
                // One run's key: a retry of this request applies it once.
                let key = format!("demo-{}", uuid::Uuid::now_v7());
                let client = Arc::clone(client);
                let answered =
                    tokio::task::spawn_blocking(move || client.submit(&changes, &key)).await??;
                let seqs: Vec<i64> = answered.iter().filter_map(|a| a.seq).collect();
                let range = match (seqs.first(), seqs.last()) {
                    (Some(first), Some(last)) => format!(" as seq {first}..{last}"),
                    _ => String::new(),
                };
                Ok((
                    answered.len(),
                    format!(
                        "committed by the backend at {}{range}, relayed by it to the broker",
                        self.backend_url()
                    ),
                ))
            }
        }
    }

    fn backend_url(&self) -> &str {
        match self {
            Self::Backend(_, client) => client.url(),
            _ => "",
        }
    }
}

pub(crate) async fn run(config: &Config, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let transport = match Publisher::connect(&config.broker).await {
        Ok(publisher) => {
            println!(
                "possync demo: broker {}, databases in {}/",
                publisher.broker(),
                args.dir.display()
            );
            let publisher =
                Box::new(publisher.with_max_message_bytes(config.terminal.max_message_bytes));
            match &config.backend {
                Some(link) => {
                    let client = BackendClient::new(link);
                    println!(
                        "possync demo: the back office goes through the backend at {}",
                        client.url()
                    );
                    Transport::Backend(publisher, Arc::new(client))
                }
                None => {
                    hint_at_a_running_backend().await;
                    Transport::Broker(publisher)
                }
            }
        }
        Err(PublishError::Broker(
            BrokerError::Unreachable { .. } | BrokerError::Timeout { .. },
        )) => {
            println!(
                "possync demo: no broker answers at {}, so the demo runs on possync's in-process \
                 transport: the same topic routing (license.<KEY>.<type>), inside this process, \
                 kept in memory only. Start RabbitMQ (`rabbitmq-server -detached`) and run the \
                 demo again to sync through the broker.\npossync demo: databases in {}/",
                config.broker.redacted_urls(),
                args.dir.display()
            );
            Transport::InProcess(InProcessBroker::new())
        }
        Err(err) => return Err(err).context("cannot publish the demo's changes"),
    };

    let (stop, stopped) = watch::channel(false);
    let mut terminals = Vec::new();
    for (license, terminal) in TERMINALS {
        terminals.push(start_terminal(
            config,
            &transport,
            &args.dir,
            license,
            terminal,
            stopped.clone(),
        )?);
    }
    for running in &mut terminals {
        wait_for(&mut running.status, "to go live", Status::is_live).await?;
    }
    println!("3 terminals live: {CAFE} till-1 and till-2, {BAKERY} till-1\n");

    let started = Instant::now();
    let mut per_store = std::collections::BTreeMap::new();
    for (license, envelopes) in [(CAFE, cafe_changes()?), (BAKERY, bakery_changes()?)] {
        per_store.insert(license, envelopes.len() as u64);
        let (count, how) = transport
            .publish(envelopes)
            .await
            .context("publishing the demo's changes")?;
        println!("back office -> {license}: {count} changes {how}");
    }
    if let Transport::Broker(publisher) | Transport::Backend(publisher, _) = transport {
        publisher.close().await;
    }

    for running in &mut terminals {
        let expected = per_store[running.license];
        wait_for(&mut running.status, "to apply its store's changes", |s| {
            s.applied >= expected
        })
        .await?;
    }
    println!(
        "all terminals applied their store's changes in {} ms\n",
        started.elapsed().as_millis()
    );

    let _ = stop.send(true);
    for mut running in terminals {
        (&mut running.task)
            .await
            .context("a demo terminal failed")??;
        show(&running)?;
    }
    println!(
        "Each store's terminals hold that store's catalog only. Inspect with: sqlite3 {}/<file> 'SELECT * FROM products'",
        args.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Tells how to take the demo through a backend that answers on its
/// default address while the config names none.
async fn hint_at_a_running_backend() {
    const DEFAULT: &str = "127.0.0.1:8480";
    let probe = tokio::net::TcpStream::connect(DEFAULT);
    if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), probe).await {
        println!(
            "possync demo: something answers on {DEFAULT}, possibly `possync backend`; to go \
             through it, run the demo with POSSYNC_BACKEND__URL=http://{DEFAULT} and \
             POSSYNC_BACKEND__TOKEN=$(possync backend --config config/backend.toml token create demo)"
        );
    }
}

fn start_terminal(
    config: &Config,
    transport: &Transport,
    dir: &Path,
    license: &'static str,
    terminal: &'static str,
    mut stopped: watch::Receiver<bool>,
) -> anyhow::Result<Running> {
    let database = dir.join(format!("{license}-{terminal}.db").to_lowercase());
    for suffix in ["", "-wal", "-shm"] {
        let mut path = database.clone().into_os_string();
        path.push(suffix);
        let _ = std::fs::remove_file(path);
    }
    let mut config = config.clone();
    config.terminal.database = database.clone();
    // Demo queues should not outlive the demo by much.
    config.terminal.queue_expiry_days = 1;
    let registry = Registry::from_config(&config.plugins)?;
    let settings = TerminalSettings::new(
        LicenseKey::new(license)?,
        TerminalId::new(terminal)?,
        config,
    );
    let terminal_runtime = Terminal::new(settings, registry)?;
    let status = terminal_runtime.status();
    let shutdown = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let task = match transport {
        Transport::Broker(_) | Transport::Backend(..) => {
            tokio::spawn(terminal_runtime.run(shutdown))
        }
        Transport::InProcess(broker) => {
            let broker = broker.clone();
            tokio::spawn(async move { terminal_runtime.run_in_process(&broker, shutdown).await })
        }
    };
    Ok(Running {
        license,
        terminal,
        database,
        status,
        task,
    })
}

async fn wait_for(
    status: &mut watch::Receiver<Status>,
    what: &str,
    done: impl Fn(&Status) -> bool,
) -> anyhow::Result<()> {
    let reached = matches!(
        tokio::time::timeout(WAIT, status.wait_for(|s| done(s))).await,
        Ok(Ok(_))
    );
    if !reached {
        bail!(
            "a demo terminal did not manage {what} within {} s: {:?}",
            WAIT.as_secs(),
            status.borrow().state
        );
    }
    Ok(())
}

fn envelope<M: Payload>(license: &str, message: M) -> anyhow::Result<Envelope> {
    Ok(message.to_envelope(license)?)
}

fn category(license: &str, id: &str, name: &str, icon: &str) -> anyhow::Result<Envelope> {
    envelope(
        license,
        possync_catalog::CategoryUpdate {
            category_id: id.into(),
            category_name: name.into(),
            icon_name: Some(icon.into()),
        },
    )
}

fn product(
    license: &str,
    id: &str,
    name: &str,
    price: f64,
    category: &str,
) -> anyhow::Result<Envelope> {
    envelope(
        license,
        possync_catalog::ProductUpdate {
            product_id: id.into(),
            product_name: name.into(),
            price,
            category_id: Some(category.into()),
            icon_name: None,
        },
    )
}

fn price(license: &str, id: &str, new_price: f64) -> anyhow::Result<Envelope> {
    envelope(
        license,
        possync_catalog::PriceUpdate {
            product_id: id.into(),
            new_price,
            product_name: None,
        },
    )
}

fn cafe_changes() -> anyhow::Result<Vec<Envelope>> {
    Ok(vec![
        category(CAFE, "coffee", "Coffee", "cup")?,
        category(CAFE, "pastry", "Pastries", "croissant")?,
        product(CAFE, "CAP", "Cappuccino", 3.20, "coffee")?,
        product(CAFE, "LAT", "Latte", 3.50, "coffee")?,
        product(CAFE, "CRO", "Croissant", 2.10, "pastry")?,
        price(CAFE, "CAP", 3.40)?,
        envelope(
            CAFE,
            possync_catalog::ProductDelete {
                product_id: "LAT".into(),
            },
        )?,
    ])
}

fn bakery_changes() -> anyhow::Result<Vec<Envelope>> {
    Ok(vec![
        category(BAKERY, "bread", "Bread", "loaf")?,
        product(BAKERY, "SOU", "Sourdough", 4.90, "bread")?,
        product(BAKERY, "BAG", "Baguette", 2.30, "bread")?,
        price(BAKERY, "BAG", 2.50)?,
    ])
}

fn show(running: &Running) -> anyhow::Result<()> {
    let db = rusqlite::Connection::open(&running.database)
        .with_context(|| format!("cannot open {}", running.database.display()))?;
    println!(
        "{} {}  ({})",
        running.license,
        running.terminal,
        running.database.display()
    );
    let mut statement = db.prepare(
        "SELECT p.id, p.name, p.price, coalesce(c.name, '-') FROM products p
         LEFT JOIN categories c ON c.id = p.category_id ORDER BY p.id",
    )?;
    let rows = statement.query_map([], |row| {
        Ok([
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            format!("{:.2}", row.get::<_, f64>(2)?),
            row.get::<_, String>(3)?,
        ])
    })?;
    let rows: Vec<[String; 4]> = rows.collect::<Result<_, _>>()?;
    crate::cli::print_table(
        &["  ID", "NAME", "PRICE", "CATEGORY"],
        &rows
            .into_iter()
            .map(|[a, b, c, d]| [format!("  {a}"), b, c, d])
            .collect::<Vec<_>>(),
    );
    println!();
    Ok(())
}
