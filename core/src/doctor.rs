//! `possync doctor`: the "Test connection" button of the settings screen
//! this replaces, and more: each check on one line, with what to do when it
//! fails.

use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use crate::config::{Config, LoadedConfig, TerminalSettings};
use crate::connection;
use crate::redact::redact_url;
use crate::registry::Registry;
use crate::status::State;
use crate::store::Database;
use crate::topology::TerminalTopology;

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do about a failure.
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Where each setting that matters came from, passwords redacted.
pub fn config_sources(loaded: &LoadedConfig) -> Vec<(String, String, String)> {
    let config = &loaded.config;
    let show = |key: &str, value: String| (key.to_owned(), value, loaded.source_of(key));
    vec![
        show("broker.url", config.broker.redacted_urls()),
        show("broker.exchange", config.broker.exchange.clone()),
        show(
            "broker.queue_type",
            format!("{:?}", config.broker.queue_type).to_lowercase(),
        ),
        show(
            "broker.declare_topology",
            config.broker.declare_topology.to_string(),
        ),
        show(
            "terminal.license_key",
            config
                .terminal
                .license_key
                .as_ref()
                .map_or("(not set)".into(), ToString::to_string),
        ),
        show(
            "terminal.terminal_id",
            config
                .terminal
                .terminal_id
                .as_ref()
                .map_or("(not set)".into(), ToString::to_string),
        ),
        show(
            "terminal.database",
            config.terminal.database.display().to_string(),
        ),
        show(
            "terminal.delivery",
            format!("{:?}", config.terminal.delivery).to_lowercase(),
        ),
    ]
}

/// Runs every check for the terminal `config` describes.
pub async fn diagnose(config: &Config) -> Vec<Check> {
    let mut checks = Vec::new();
    let terminal = match TerminalSettings::from_config(config.clone()) {
        Ok(terminal) => {
            checks.push(Check::pass(
                "identity",
                format!(
                    "terminal {} of store {}",
                    terminal.terminal_id(),
                    terminal.license_key()
                ),
            ));
            Some(terminal)
        }
        Err(err) => {
            checks.push(Check::fail(
                "identity",
                err.to_string(),
                "set terminal.license_key and terminal.terminal_id",
            ));
            None
        }
    };

    match Registry::from_config(&config.plugins) {
        Ok(registry) => {
            let plugins = registry.plugins();
            let enabled: Vec<String> = plugins
                .iter()
                .filter(|p| p.enabled)
                .map(|p| p.name.clone())
                .collect();
            checks.push(Check::pass(
                "plugins",
                format!(
                    "{} available, enabled: {}",
                    plugins.len(),
                    enabled.join(", ")
                ),
            ));
            for unloaded in plugins
                .iter()
                .filter(|p| p.message_types.is_empty() && !p.enabled)
            {
                checks.push(Check::fail(
                    format!("plugin {}", unloaded.name),
                    unloaded.description.clone(),
                    "fix the path or rebuild the plugin, or remove it from [plugins]",
                ));
            }
        }
        Err(err) => checks.push(Check::fail(
            "plugins",
            err.to_string(),
            "fix [plugins] as the message says",
        )),
    }

    checks.push(database_check(config));

    for url in &config.broker.urls {
        let name = format!("broker {}", redact_url(url));
        let connection = match connection::connect(&config.broker, url, "possync doctor").await {
            Ok(connection) => {
                checks.push(Check::pass(&name, "connected"));
                connection
            }
            Err(err) => {
                checks.push(Check::fail(
                    &name,
                    err.to_string(),
                    "fix broker.url (host, port, user, password) or start the broker",
                ));
                continue;
            }
        };
        checks.extend(topology_checks(config, &connection, terminal.as_ref()).await);
        // A close can hang when the broker is gone (lapin #409): bounded too.
        let _ = connection::within(
            config.broker.confirm_timeout_secs,
            "closing",
            url,
            connection.close(200, "doctor done".into()),
        )
        .await;
        break;
    }
    checks
}

async fn topology_checks(
    config: &Config,
    connection: &lapin::Connection,
    terminal: Option<&TerminalSettings>,
) -> Vec<Check> {
    let seconds = config.broker.confirm_timeout_secs;
    let mut checks = Vec::new();
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    // A failed passive declare closes its channel: one channel per probe.
    let exchange = async {
        let channel = bounded(seconds, connection.create_channel()).await?;
        bounded(
            seconds,
            channel.exchange_declare(
                config.broker.exchange.as_str().into(),
                ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            ),
        )
        .await
    };
    match exchange.await {
        Ok(()) => checks.push(Check::pass("exchange", format!("{} exists", config.broker.exchange))),
        Err(err) => checks.push(Check::fail(
            "exchange",
            format!("{}: {err}", config.broker.exchange),
            "start a terminal or publisher once (they declare it), or provision with `possync admin`",
        )),
    }
    let Some(terminal) = terminal else {
        return checks;
    };
    let topology = TerminalTopology::new(config, terminal.license_key(), terminal.terminal_id());
    let queue = async {
        let channel = bounded(seconds, connection.create_channel()).await?;
        bounded(
            seconds,
            channel.queue_declare(
                topology.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
    };
    match queue.await {
        Ok(queue) => {
            checks.push(Check::pass(
                "terminal queue",
                format!(
                    "{} exists: {} message(s) waiting, {} consumer(s) (binding {})",
                    topology.queue,
                    queue.message_count(),
                    queue.consumer_count(),
                    topology.binding_key
                ),
            ));
            checks.push(running_check(config, queue.consumer_count()));
        }
        Err(err) => checks.push(Check::fail(
            "terminal queue",
            format!("{}: {err}", topology.queue),
            if config.broker.declare_topology {
                "start the terminal once: it declares and binds its queue (changes published before that are not kept)"
            } else {
                "provision it with `possync admin provision-terminal`"
            },
        )),
    }
    checks
}

/// Whether a process already runs as this terminal, here or elsewhere: the
/// broker lets only one consume the terminal's queue.
fn running_check(config: &Config, consumers: u32) -> Check {
    const NAME: &str = "terminal process";
    if consumers == 0 {
        return Check::pass(NAME, "no process runs as this terminal; it may start");
    }
    let here = Database::open_read_only(&config.terminal.database)
        .and_then(|db| db.status_record())
        .ok()
        .flatten()
        // Only a live (or stalled) terminal holds the queue's consumer.
        .filter(|status| matches!(status.state, State::Live { .. } | State::Stalled { .. }))
        .and_then(|status| status.pid)
        .filter(|pid| crate::status::process_exists(*pid));
    match here {
        Some(pid) => Check::pass(
            NAME,
            format!(
                "running here as process {pid}; a second process as this terminal would be refused"
            ),
        ),
        None => Check::fail(
            NAME,
            "another process is already running as this terminal (its queue has a consumer, and no live terminal on this machine wrote this database): starting one here will be refused",
            "stop the other process, or give this one its own terminal.terminal_id (a cloned disk or a copied config keeps the old one)",
        ),
    }
}

/// The broker's answer, or why there was none within `seconds`.
async fn bounded<T>(
    seconds: u64,
    operation: impl Future<Output = lapin::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(std::time::Duration::from_secs(seconds), operation).await {
        Ok(answer) => answer.map_err(|err| err.to_string()),
        Err(_) => Err(format!("the broker did not answer within {seconds} s")),
    }
}

fn database_check(config: &Config) -> Check {
    let path = &config.terminal.database;
    if !path.exists() {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        return if parent.is_dir() {
            Check::pass(
                "database",
                format!(
                    "{} will be created at the terminal's first start",
                    path.display()
                ),
            )
        } else {
            Check::fail(
                "database",
                format!("{}: its folder does not exist", path.display()),
                "create the folder or fix terminal.database",
            )
        };
    }
    match Database::open_read_only(path).and_then(|db| db.status_record()) {
        Ok(Some(status)) => Check::pass(
            "database",
            format!(
                "{}: {} messages applied all time, {} quarantined",
                path.display(),
                status.applied_total,
                status.quarantined_total
            ),
        ),
        Ok(None) => Check::pass(
            "database",
            format!("{} opens; no terminal has run on it yet", path.display()),
        ),
        Err(err) => Check::fail(
            "database",
            err.to_string(),
            "check the file's permissions, or move a damaged file aside",
        ),
    }
}
