//! `possync-terminal`: `possync terminal` alone, for a till. The same config,
//! plugins and behaviour, without the back office, publisher and admin
//! commands: only the code a terminal runs is linked, so a till keeps less
//! of the executable in memory.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use possync_core::{Config, Registry, Terminal, TerminalSettings, shutdown_signal};

// Referenced so the linker keeps its plugins' registrations, as in `possync`.
#[cfg(feature = "catalog")]
use possync_catalog as _;
#[cfg(feature = "notices")]
use possync_notices as _;
#[cfg(feature = "orders")]
use possync_orders as _;

/// Runs a possync terminal: applies this store's changes to the local
/// database until SIGINT or SIGTERM, then stops cleanly. The same as
/// `possync terminal`, in a smaller program for tills; `possync status`,
/// `possync doctor` and `possync quarantine` work beside it.
///
/// Configuration comes from built-in defaults, then the TOML file given with
/// --config, then environment variables POSSYNC_<SECTION>__<KEY> (for example
/// POSSYNC_TERMINAL__LICENSE_KEY). Set POSSYNC_LOG=debug for more detail.
#[derive(Debug, Parser)]
#[command(name = "possync-terminal", version, max_term_width = 100)]
struct Args {
    /// TOML config file (see config/terminal.toml); optional: the
    /// environment alone may configure everything.
    #[arg(long, short, value_name = "FILE", env = "POSSYNC_CONFIG")]
    config: Option<PathBuf>,

    /// Log lines as readable text or as JSON objects (one per line).
    #[arg(long, value_enum, default_value = "human", env = "POSSYNC_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    possync_core::init_logging(
        "info",
        match args.log_format {
            LogFormat::Human => possync_core::LogFormat::Human,
            LogFormat::Json => possync_core::LogFormat::Json,
        },
    );
    // One thread runs the terminal, as in `possync terminal`: it waits on the
    // broker and the disk far more than it computes.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Boxed: the terminal's state lives on the heap, not copied down the
    // main thread's stack, which then stays small for the till's lifetime.
    match runtime.block_on(Box::pin(run(args.config))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Option<PathBuf>) -> Result<(), Box<dyn std::error::Error>> {
    let loaded = Config::load(config.as_deref())?;
    let settings = TerminalSettings::from_config(loaded.config)?;
    let registry = Registry::from_config(&settings.config().plugins)?;
    let terminal = Terminal::new(settings, registry)?;
    terminal
        .run(shutdown_signal())
        .await
        .map_err(|err| format!("the terminal stopped: {err}"))?;
    Ok(())
}
