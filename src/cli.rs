//! The command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use possync_core::{
    Admin, Config, Database, LicenseKey, LoadedConfig, Registry, StatusReport, Terminal,
    TerminalId, TerminalSettings, shutdown_signal,
};

use crate::demo::{self, DemoArgs};
use crate::notices::{self, NoticesCommand};
use crate::publish::{self, PublishCommand};
use crate::quarantine::{self, QuarantineCommand};

/// Keeps the local SQLite databases of point-of-sale terminals in sync with
/// their back office, in real time, over RabbitMQ.
///
/// Configuration comes from built-in defaults, then the TOML file given with
/// --config, then environment variables POSSYNC_<SECTION>__<KEY> (for example
/// POSSYNC_TERMINAL__LICENSE_KEY). Set POSSYNC_LOG=debug for more detail.
#[derive(Debug, Parser)]
#[command(name = "possync", version, max_term_width = 100)]
struct Cli {
    /// TOML config file (see config/ for examples); optional: the
    /// environment alone may configure everything.
    #[arg(
        long,
        short,
        global = true,
        value_name = "FILE",
        env = "POSSYNC_CONFIG"
    )]
    config: Option<PathBuf>,

    /// Log lines as readable text or as JSON objects (one per line).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "POSSYNC_LOG_FORMAT"
    )]
    log_format: LogFormatArg,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a terminal: apply this store's changes to the local database until
    /// SIGINT or SIGTERM, then stop cleanly.
    Terminal,
    /// Run the back office's catalog of record until SIGINT or SIGTERM: an
    /// HTTP API that accepts changes and answers once they are durable, each
    /// with its store's next sequence number; a relay that publishes them in
    /// order to the stores' terminals; and a consumer that records the
    /// changes other publishers send straight to the exchange. Its config
    /// (config/backend.toml) names the listen address, the database (a
    /// SQLite file or a postgres:// URL), the broker and the plugins.
    /// `possync backend token ...` manages the API's bearer tokens.
    Backend(BackendArgs),
    /// Publish changes to one or more stores; exits 0 only once the broker
    /// confirmed every message.
    #[command(subcommand)]
    Publish(PublishCommand),
    /// Show whether the configured terminal is Live or Offline, since when,
    /// and what it applied last; exits 0 only when it is live.
    Status,
    /// Check a terminal's setup, like the old settings screen's "Test
    /// connection" and more: config (and where each value came from), the
    /// broker, the exchange, the terminal's queue, the database and the
    /// plugins; one line per check with a fix for each failure. Exits 0
    /// only when all pass.
    Doctor,
    /// Show the handlers this binary has.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Provision and revoke broker users with the least permissions a
    /// terminal or publisher needs (RabbitMQ management API; admin
    /// credentials come from [admin] in config or POSSYNC_ADMIN__PASSWORD).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Show the effective configuration, passwords redacted.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show possync at work: a back office publishes to terminals of two
    /// stores, and each store's terminals apply only that store's changes.
    Demo(DemoArgs),
    /// The notices for the staff on this terminal (the `notice` message
    /// type): list them, acknowledge one. Works while the terminal runs.
    #[command(subcommand)]
    Notices(NoticesCommand),
    /// The messages this terminal could not apply: list them, show one,
    /// requeue them (applied again once their plugin is fixed or enabled),
    /// or drop them, from the table and the dead-letter queue. Works while
    /// the terminal runs.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
}

#[derive(Debug, clap::Args)]
struct BackendArgs {
    #[command(subcommand)]
    command: Option<BackendCommand>,
}

#[derive(Debug, Subcommand)]
enum BackendCommand {
    /// Manage the bearer tokens back office apps call the HTTP API with
    /// (`Authorization: Bearer <token>`), in the database the backend's
    /// config names; the backend need not be running.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token for a client and print it: the only time it is shown
    /// (the database keeps its hash).
    Create {
        /// The client's name (letters, digits, '-', '_', '.'), unique.
        name: String,
        /// A store the token may touch; repeat for several. Without any,
        /// the token may touch every store.
        #[arg(long = "store", value_name = "KEY")]
        stores: Vec<String>,
    },
    /// List the tokens: names, stores and when each was made (never the token).
    List,
    /// Revoke a client's token: requests with it are refused from now on.
    Revoke {
        /// The client's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Create a broker user for one terminal that may read its own queue and
    /// nothing else, declare and bind that queue, and write the terminal's
    /// config file (mode 600; it holds the password, which is never printed).
    ProvisionTerminal {
        /// The store's license key.
        #[arg(long = "license", value_name = "KEY")]
        license: LicenseKey,
        /// The terminal's id within the store.
        #[arg(long, value_name = "ID")]
        terminal_id: TerminalId,
        /// Where to write the terminal's config; it must not exist, and is
        /// checked before anything changes on the broker.
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
        /// The database path to put in that config.
        #[arg(long, value_name = "PATH", default_value = "possync.db")]
        database: PathBuf,
    },
    /// Create a broker user for a back office that may only publish
    /// well-formed license.<KEY>.<type> messages, and write its config.
    ProvisionPublisher {
        /// A name for the publisher (letters, digits, '-', '_').
        #[arg(long, value_name = "NAME")]
        name: TerminalId,
        /// Where to write the publisher's config; it must not exist, and is
        /// checked before anything changes on the broker.
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Delete a terminal's broker user and close its connections.
    RevokeTerminal {
        /// The store's license key.
        #[arg(long = "license", value_name = "KEY")]
        license: LicenseKey,
        /// The terminal's id within the store.
        #[arg(long, value_name = "ID")]
        terminal_id: TerminalId,
        /// Delete its queue and dead-letter queue too.
        #[arg(long)]
        delete_queue: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the configuration possync would use, as TOML, with every
    /// password replaced by *** (and plugin settings whose names say
    /// password, secret, token or key).
    Show,
}

#[derive(Debug, Subcommand)]
enum PluginsCommand {
    /// Every handler: its name, message types, whether config enables it,
    /// and where it comes from.
    List,
}

pub(crate) fn main() -> ExitCode {
    // `publish --help` lists the message types the built-in plugins know (a
    // plugin library adds its own: `possync publish types`). Listing them
    // builds the plugins and their schemas, so only a publish command does.
    let mut command = Cli::command();
    if std::env::args_os().any(|arg| arg == "publish") {
        command = command.mut_subcommand("publish", |publish| publish.after_help(publish_help()));
    }
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|err| err.exit());
    // The demo and one-shot commands print their own results; only trouble should add to them.
    let format = match cli.log_format {
        LogFormatArg::Human => possync_core::LogFormat::Human,
        LogFormatArg::Json => possync_core::LogFormat::Json,
    };
    possync_core::init_logging(
        if matches!(
            cli.command,
            Command::Terminal | Command::Backend(BackendArgs { command: None })
        ) {
            "info"
        } else {
            "warn"
        },
        format,
    );
    // A till runs one terminal, which waits on the broker and the disk far
    // more than it computes: one thread runs it (its applier takes a thread
    // of its own for SQLite), where a worker per core would each keep a
    // stack and a malloc arena resident.
    let mut builder = if matches!(cli.command, Command::Terminal) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Terminal => terminal(load(cli.config.as_deref())?).await,
        Command::Backend(args) => backend(cli.config.as_deref(), args.command).await,
        Command::Publish(command) => {
            publish::run(&load(cli.config.as_deref())?.config, command).await
        }
        Command::Status => status(&load(cli.config.as_deref())?.config),
        Command::Doctor => doctor(cli.config.as_deref()).await,
        Command::Plugins(PluginsCommand::List) => {
            plugins_list(&load(cli.config.as_deref())?.config)
        }
        Command::Admin(command) => admin(load(cli.config.as_deref())?.config, command).await,
        Command::Config(ConfigCommand::Show) => {
            print!("{}", load(cli.config.as_deref())?.config.to_redacted_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(&load(cli.config.as_deref())?.config, args).await,
        Command::Notices(command) => notices::run(&load(cli.config.as_deref())?.config, command),
        Command::Quarantine(command) => {
            quarantine::run(load(cli.config.as_deref())?.config, command).await
        }
    }
}

/// The message types of the built-in plugins, for `possync publish --help`.
fn publish_help() -> String {
    match Registry::for_publishing(&Default::default()) {
        Ok(registry) => format!(
            "Message types (possync publish <TYPE> --help shows one; possync publish types adds those of plugin libraries in [plugins]):\n{}",
            publish::types_help(&registry)
        ),
        Err(err) => format!("The built-in plugins did not load: {err}"),
    }
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<LoadedConfig> {
    Config::load(path).map_err(|err| {
        with_hint(
            err.to_string(),
            &["service", "relay", "direct"],
            "this is a backend's config (as config/backend.toml): `possync backend --config FILE` reads it; this command needs a terminal's or publisher's config (as config/terminal.toml)",
        )
    })
}

/// `message`, followed by `hint` when it names one of `fields` as unknown:
/// the config file was written for another command.
fn with_hint(message: String, fields: &[&str], hint: &str) -> anyhow::Error {
    let other = message.contains("unknown field")
        && fields.iter().any(|field| {
            message.contains(&format!("`{field}`,")) || message.contains(&format!("`{field}` "))
        });
    if other {
        anyhow::anyhow!("{message}\n  hint: {hint}")
    } else {
        anyhow::anyhow!(message)
    }
}

async fn terminal(loaded: LoadedConfig) -> anyhow::Result<ExitCode> {
    let settings = TerminalSettings::from_config(loaded.config)?;
    let registry = Registry::from_config(&settings.config().plugins)?;
    let terminal = Terminal::new(settings, registry)?;
    terminal
        .run(shutdown_signal())
        .await
        .context("the terminal stopped")?;
    Ok(ExitCode::SUCCESS)
}

async fn backend(
    path: Option<&std::path::Path>,
    command: Option<BackendCommand>,
) -> anyhow::Result<ExitCode> {
    let config = possync_backend::ServiceConfig::load(path).map_err(|err| {
        with_hint(
            err.to_string(),
            &["terminal", "status", "admin", "backend"],
            "this is a terminal's or publisher's config (as config/terminal.toml); `possync backend` needs a backend config (as config/backend.toml)",
        )
    })?;
    let Some(BackendCommand::Token(command)) = command else {
        possync_backend::run(config, shutdown_signal())
            .await
            .context("the backend stopped")?;
        return Ok(ExitCode::SUCCESS);
    };
    let location = config.service.database_location();
    let cannot_open = || format!("cannot open the backend's database {location}");
    match &location {
        possync_backend::DatabaseLocation::Sqlite(path) => {
            // A relative service.database is relative to the current
            // directory: say which file holds the tokens, so that one run
            // elsewhere does not go unnoticed.
            let shown = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            let existed = path.exists();
            let storage = possync_backend::SqliteStorage::open(path)
                .await
                .with_context(cannot_open)?;
            if existed {
                eprintln!("tokens in the catalog database {}", shown.display());
            } else {
                eprintln!(
                    "created a new catalog database at {} (service.database {:?} is read from the current directory; the backend must use this file to know these tokens)",
                    shown.display(),
                    config.service.database
                );
            }
            token(&storage, command).await
        }
        possync_backend::DatabaseLocation::Postgres(url) => {
            let storage = possync_backend::PostgresStorage::connect(url)
                .await
                .with_context(cannot_open)?;
            eprintln!("tokens in the catalog database {location}");
            token(&storage, command).await
        }
    }
}

async fn token<S: possync_backend::Storage>(
    storage: &S,
    command: TokenCommand,
) -> anyhow::Result<ExitCode> {
    use possync_backend::token;
    match command {
        TokenCommand::Create { name, stores } => {
            let created = token::create_token(storage, &name, &stores).await?;
            let scope = match &created.stores {
                Some(stores) => format!("stores {}", stores.join(", ")),
                None => "every store".into(),
            };
            eprintln!(
                "created token {:?} for {scope}; it is shown only now, keep it secret:",
                created.name
            );
            println!("{}", created.token);
        }
        TokenCommand::List => {
            let tokens = token::list_tokens(storage).await?;
            if tokens.is_empty() {
                eprintln!("no tokens: create one with `possync backend token create NAME`");
            }
            for info in tokens {
                println!("{info}");
            }
        }
        TokenCommand::Revoke { name } => {
            token::revoke_token(storage, &name).await?;
            println!("revoked token {name:?}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn doctor(path: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let loaded = match Config::load(path) {
        Ok(loaded) => loaded,
        Err(err) => {
            println!("FAIL config: {err}");
            println!("     fix: correct the key the message names");
            return Ok(ExitCode::FAILURE);
        }
    };
    println!(
        "ok   config: {}",
        path.map_or("environment and defaults only".into(), |p| p
            .display()
            .to_string())
    );
    for (key, value, source) in possync_core::config_sources(&loaded) {
        println!("       {key} = {value}  ({source})");
    }
    let checks = possync_core::diagnose(&loaded.config).await;
    for check in &checks {
        println!(
            "{} {}: {}",
            if check.ok { "ok  " } else { "FAIL" },
            check.name,
            check.detail
        );
        if let Some(fix) = &check.fix {
            println!("     fix: {fix}");
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed == 0 {
        println!("all {} checks passed", checks.len() + 1);
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{failed} of {} checks failed", checks.len() + 1);
        Ok(ExitCode::FAILURE)
    }
}

async fn admin(config: Config, command: AdminCommand) -> anyhow::Result<ExitCode> {
    // The management API client blocks; keep it off the async workers.
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let admin = Admin::new(&config)?;
        match command {
            AdminCommand::ProvisionTerminal {
                license,
                terminal_id,
                output,
                database,
            } => {
                let done = admin.provision_terminal(&license, &terminal_id, &database, &output)?;
                println!("created {}", done.summary);
                println!(
                    "wrote {} (mode 600): start the terminal with `possync terminal --config {}`",
                    output.display(),
                    output.display()
                );
            }
            AdminCommand::ProvisionPublisher { name, output } => {
                let done = admin.provision_publisher(&name, &output)?;
                println!("created {}", done.summary);
                println!(
                    "wrote {} (mode 600): publish with `possync publish --config {} ...`",
                    output.display(),
                    output.display()
                );
            }
            AdminCommand::RevokeTerminal {
                license,
                terminal_id,
                delete_queue,
            } => {
                let done = admin.revoke_terminal(&license, &terminal_id, delete_queue)?;
                if done.existed {
                    println!(
                        "deleted broker user {}; closed {} connection(s)",
                        done.user, done.connections_closed
                    );
                } else {
                    println!(
                        "broker user {} did not exist; closed {} connection(s)",
                        done.user, done.connections_closed
                    );
                }
                if done.queue_deleted {
                    println!("deleted its queue and dead-letter queue");
                }
            }
        }
        Ok(())
    })
    .await
    .context("the admin task failed")??;
    Ok(ExitCode::SUCCESS)
}

/// The terminal's database, which `possync terminal` must have made.
pub(crate) fn terminal_database(config: &Config) -> anyhow::Result<&std::path::Path> {
    let path = &config.terminal.database;
    if !path.exists() {
        anyhow::bail!(
            "no terminal database at {}: has `possync terminal` run with this config? (terminal.database)",
            path.display()
        );
    }
    Ok(path)
}

fn status(config: &Config) -> anyhow::Result<ExitCode> {
    let path = terminal_database(config)?;
    let database = Database::open_read_only(path)?;
    let stored = database.status_record()?.with_context(|| {
        format!(
            "{} holds no terminal status: the terminal has not run on it yet",
            path.display()
        )
    })?;
    let report = StatusReport::new(&stored, possync_core::unix_now_ms());
    print!("{}", report.text);
    Ok(if report.live {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn plugins_list(config: &Config) -> anyhow::Result<ExitCode> {
    let registry = Registry::from_config(&config.plugins)?;
    let plugins = registry.plugins();
    let rows: Vec<[String; 6]> = plugins
        .iter()
        .map(|p| {
            [
                p.name.clone(),
                if p.message_types.is_empty() {
                    "-".into()
                } else {
                    p.message_types.join(", ")
                },
                if p.enabled { "yes".into() } else { "no".into() },
                p.version.clone(),
                p.origin.to_string(),
                p.description.clone(),
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "MESSAGE TYPES",
            "ENABLED",
            "VERSION",
            "FROM",
            "DESCRIPTION",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints rows under a header, columns padded to their widest cell.
pub(crate) fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
