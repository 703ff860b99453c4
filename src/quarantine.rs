//! `possync quarantine ...`: what this terminal could not apply, and what
//! its operator does about it: look, apply again, or drop. Works while the
//! terminal runs.

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
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// One quarantined message whole: why, where from, and its body.
    Show {
        /// Its id, as `possync quarantine list` shows it.
        id: i64,
    },
    /// Apply quarantined messages again through the normal path, once
    /// their plugin is fixed or enabled: the running terminal takes them
    /// within a second while it reaches its broker (else once it does, or
    /// the next one to start), and one that fails again stays quarantined
    /// with the new reason. Their copies leave the dead-letter queue.
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
            list(&Database::open_read_only(&path)?, limit as usize)?;
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
    // A row with its whole body is marked at once: a copy left behind in
    // the dead-letter queue harms nothing.
    let mut requeued = 0;
    let mut cut = std::collections::HashMap::new();
    for entry in &entries {
        if entry.is_cut() {
            cut.insert(entry.message.body_sha256.clone(), entry.id);
        } else if database.mark_requeued(entry.id, None)? {
            requeued += 1;
        }
    }
    // A row that kept only the first part of its body gets the whole back
    // from the dead-letter queue, and is marked, before that copy goes.
    let mut failed_writes = Vec::new();
    let taken = dead_letters(config, &entries, &mut |digest, body| {
        let Some(&id) = cut.get(digest) else {
            return true;
        };
        match database.mark_requeued(id, Some(body)) {
            Ok(_) => {
                cut.remove(digest);
                requeued += 1;
                true
            }
            Err(err) => {
                failed_writes.push(format!("message {id}: {err}"));
                false
            }
        }
    })
    .await;
    match &taken {
        Ok(taken) => report_dead_letters(taken, &entries),
        Err(err) => eprintln!(
            "possync: cannot take the copies out of the dead-letter queue: {err:#}; they stay there"
        ),
    }
    for failure in &failed_writes {
        eprintln!("possync: cannot keep the whole body of {failure}; not requeued");
    }
    for id in cut.values() {
        eprintln!(
            "possync: message {id} keeps only the first 64 KiB of its body in the table, and the whole was not taken from the dead-letter queue: not requeued"
        );
    }
    if requeued > 0 {
        println!(
            "requeued {requeued} message(s): the terminal applies them within a second while it runs and reaches its broker, else once it does; `possync quarantine list` shows any quarantined again"
        );
    }
    Ok(if cut.is_empty() && failed_writes.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
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
    // The copies go first: stopped half way, the rows are still there to
    // drop again.
    if !table_only {
        let taken = dead_letters(config, &entries, &mut |_, _| true).await.context(
            "cannot take the copies out of the dead-letter queue, so nothing was dropped; to drop from the table only, add --table-only",
        )?;
        report_dead_letters(&taken, &entries);
    }
    let mut dropped = 0;
    for entry in &entries {
        if database.drop_quarantined(entry.id)? {
            dropped += 1;
        }
    }
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

/// Takes the copies of `entries` out of the terminal's dead-letter queue,
/// each handed to `found` first.
async fn dead_letters(
    config: &Config,
    entries: &[QuarantineEntry],
    found: &mut (dyn FnMut(&str, &[u8]) -> bool + Send),
) -> anyhow::Result<TakenDeadLetters> {
    let settings = TerminalSettings::from_config(config.clone())?;
    let digests: Vec<String> = entries
        .iter()
        .map(|entry| entry.message.body_sha256.clone())
        .filter(|digest| !digest.is_empty())
        .collect();
    Ok(take_dead_letters(
        config,
        settings.license_key(),
        settings.terminal_id(),
        &digests,
        found,
    )
    .await?)
}

fn report_dead_letters(taken: &TakenDeadLetters, entries: &[QuarantineEntry]) {
    let missing = (entries.len() as u64).saturating_sub(taken.taken);
    println!(
        "took {} copy(ies) out of dead-letter queue {} (looked at {} message(s)){}",
        taken.taken,
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

/// `text`'s first `chars` characters, with `...` if cut.
fn cut(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}...", &text[..end]),
    }
}
