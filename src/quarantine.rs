//! `possync quarantine ...`: what this terminal could not apply, and what
//! its operator does about it: look, apply again, or drop. Works while the
//! terminal runs.

use std::collections::HashSet;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use possync_core::{
    Config, Database, QuarantineEntry, Rows, TakenDeadLetters, TerminalSettings, moment_text,
    take_dead_letters, unix_now_ms,
};

#[derive(Debug, Subcommand)]
pub(crate) enum QuarantineCommand {
    /// The messages this terminal could not apply, newest first, with why;
    /// `requeued` ones wait for the terminal to apply them again.
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One quarantined message whole: why, where from, and its body.
    Show {
        /// Its id, as `possync quarantine list` shows it.
        id: i64,
    },
    /// Apply quarantined messages again through the normal path, once
    /// their plugin is fixed or enabled: the running terminal takes them
    /// within a second (or the next one to start), and one that fails
    /// again is quarantined again with the new reason. Their copies leave
    /// the dead-letter queue.
    Requeue {
        /// The message's id, as `possync quarantine list` shows it.
        #[arg(required_unless_present = "all")]
        id: Option<i64>,
        /// Every quarantined message.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Remove quarantined messages for good: from the table and from the
    /// dead-letter queue.
    Drop {
        /// The message's id, as `possync quarantine list` shows it.
        #[arg(required_unless_present = "all")]
        id: Option<i64>,
        /// Every quarantined message.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// Drop from the table only, leaving the dead-letter queue as it is
        /// (when the broker cannot be reached).
        #[arg(long)]
        table_only: bool,
    },
}

fn rows(id: Option<i64>, all: bool) -> Rows {
    match id {
        Some(id) if !all => Rows::One(id),
        _ => Rows::All,
    }
}

pub(crate) async fn run(config: Config, command: QuarantineCommand) -> anyhow::Result<ExitCode> {
    let path = crate::cli::terminal_database(&config)?.to_owned();
    match command {
        QuarantineCommand::List { limit } => {
            list(&Database::open_read_only(&path)?, limit)?;
            Ok(ExitCode::SUCCESS)
        }
        QuarantineCommand::Show { id } => show(&Database::open_read_only(&path)?, id),
        QuarantineCommand::Requeue { id, all } => {
            // Opened for writing, which also adds the requeue mark to the
            // table of a database an older terminal made.
            let mut database = Database::open(&path)?;
            requeue(&config, &mut database, rows(id, all)).await
        }
        QuarantineCommand::Drop {
            id,
            all,
            table_only,
        } => {
            let mut database = Database::open(&path)?;
            drop_rows(&config, &mut database, rows(id, all), table_only).await
        }
    }
}

fn list(database: &Database, limit: usize) -> anyhow::Result<()> {
    let entries = database.quarantine_entries(limit)?;
    if entries.is_empty() {
        println!("nothing quarantined");
        return Ok(());
    }
    let now = unix_now_ms();
    let rows: Vec<[String; 6]> = entries
        .iter()
        .map(|entry| {
            let message = &entry.message;
            [
                entry.id.to_string(),
                moment_text(entry.received_at * 1000, now),
                message.message_type.clone().unwrap_or_else(|| "-".into()),
                message.message_id.clone().unwrap_or_else(|| "-".into()),
                if entry.requeued_at.is_some() {
                    "requeued".into()
                } else {
                    "quarantined".into()
                },
                cut(&message.reason, 80),
            ]
        })
        .collect();
    crate::cli::print_table(
        &["ID", "QUARANTINED", "TYPE", "MESSAGE ID", "STATE", "REASON"],
        &rows,
    );
    println!(
        "\n`possync quarantine show ID` shows one whole; `requeue ID|--all` applies again, `drop ID|--all` removes."
    );
    Ok(())
}

fn show(database: &Database, id: i64) -> anyhow::Result<ExitCode> {
    let Some(entry) = database.quarantine_rows(Rows::One(id))?.pop() else {
        anyhow::bail!("no quarantined message has id {id}; `possync quarantine list` shows them");
    };
    let message = &entry.message;
    let now = unix_now_ms();
    println!("id:           {}", entry.id);
    println!(
        "quarantined:  {}",
        moment_text(entry.received_at * 1000, now)
    );
    if let Some(at) = entry.requeued_at {
        println!(
            "requeued:     {} (the terminal applies it when it runs)",
            moment_text(at * 1000, now)
        );
    }
    println!("routing key:  {}", message.routing_key);
    println!(
        "type:         {}",
        message.message_type.as_deref().unwrap_or("-")
    );
    println!(
        "message id:   {}",
        message.message_id.as_deref().unwrap_or("-")
    );
    println!("reason:       {}", message.reason);
    println!(
        "body:         {} bytes, sha256 {}",
        message.body_bytes, message.body_sha256
    );
    if entry.is_cut() {
        println!(
            "              (the table keeps its first {} bytes; the whole is in the dead-letter queue)",
            message.body.len()
        );
    }
    println!();
    match serde_json::from_slice::<serde_json::Value>(&message.body) {
        Ok(json) => println!("{}", serde_json::to_string_pretty(&json)?),
        Err(_) => println!("{}", String::from_utf8_lossy(&message.body)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn requeue(config: &Config, database: &mut Database, rows: Rows) -> anyhow::Result<ExitCode> {
    let entries = chosen(database, rows)?;
    if entries.is_empty() {
        println!("nothing quarantined");
        return Ok(ExitCode::SUCCESS);
    }
    let taken = match dead_letters(config, &entries).await {
        Ok(taken) => Some(taken),
        Err(err) => {
            eprintln!(
                "possync: cannot take the copies out of the dead-letter queue: {err:#}; they stay there"
            );
            None
        }
    };
    let mut requeued = 0;
    let mut failed = false;
    for entry in &entries {
        let whole = if entry.is_cut() {
            match taken
                .as_ref()
                .and_then(|taken| taken.bodies.get(&entry.message.body_sha256))
            {
                Some(body) => Some(body.as_slice()),
                None => {
                    eprintln!(
                        "possync: message {} keeps only its first {} bytes in the table and its whole body was not found in the dead-letter queue: not requeued",
                        entry.id,
                        entry.message.body.len()
                    );
                    failed = true;
                    continue;
                }
            }
        } else {
            None
        };
        if database.mark_requeued(entry.id, whole)? {
            requeued += 1;
        }
    }
    report_dead_letters(taken.as_ref(), &entries);
    println!(
        "requeued {requeued} message(s): a running terminal applies them within a second, else the next one to start; `possync quarantine list` shows any quarantined again"
    );
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn drop_rows(
    config: &Config,
    database: &mut Database,
    rows: Rows,
    table_only: bool,
) -> anyhow::Result<ExitCode> {
    let entries = chosen(database, rows)?;
    if entries.is_empty() {
        println!("nothing quarantined");
        return Ok(ExitCode::SUCCESS);
    }
    let taken = if table_only {
        None
    } else {
        Some(dead_letters(config, &entries).await.context(
            "cannot take the copies out of the dead-letter queue, so nothing was dropped; to drop from the table only, add --table-only",
        )?)
    };
    let mut dropped = 0;
    for entry in &entries {
        if database.drop_quarantined(entry.id)? {
            dropped += 1;
        }
    }
    report_dead_letters(taken.as_ref(), &entries);
    println!("dropped {dropped} message(s) from the quarantine");
    Ok(ExitCode::SUCCESS)
}

/// The rows `rows` names; an id that names none is an error.
fn chosen(database: &Database, rows: Rows) -> anyhow::Result<Vec<QuarantineEntry>> {
    let entries = database.quarantine_rows(rows)?;
    if let (Rows::One(id), true) = (rows, entries.is_empty()) {
        anyhow::bail!("no quarantined message has id {id}; `possync quarantine list` shows them");
    }
    Ok(entries)
}

async fn dead_letters(
    config: &Config,
    entries: &[QuarantineEntry],
) -> anyhow::Result<TakenDeadLetters> {
    let settings = TerminalSettings::from_config(config.clone())?;
    let digests: HashSet<String> = entries
        .iter()
        .map(|entry| entry.message.body_sha256.clone())
        .filter(|digest| !digest.is_empty())
        .collect();
    Ok(take_dead_letters(
        config,
        settings.license_key(),
        settings.terminal_id(),
        &digests,
    )
    .await?)
}

fn report_dead_letters(taken: Option<&TakenDeadLetters>, entries: &[QuarantineEntry]) {
    if let Some(taken) = taken {
        let missing = entries.len() - taken.bodies.len().min(entries.len());
        println!(
            "took {} copy(ies) out of dead-letter queue {} (looked at {} message(s)){}",
            taken.bodies.len(),
            taken.queue,
            taken.searched,
            if missing > 0 {
                format!(
                    "; {missing} had none there (past the queue's limits, or quarantined while its dead letter could not be written)"
                )
            } else {
                String::new()
            }
        );
    }
}

/// `text`'s first `chars` characters, with `...` if cut.
fn cut(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}...", &text[..end]),
    }
}
