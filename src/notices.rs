//! `possync notices ...`: the notices for the staff on this terminal, as
//! the POS app shows them, and acknowledging one.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use possync_core::Config;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

#[derive(Debug, Subcommand)]
pub(crate) enum NoticesCommand {
    /// The notices showing on this terminal (not expired, not acknowledged,
    /// for this terminal); with --all, every notice the store sent, and why
    /// those not showing do not.
    List {
        /// Every notice, not only those showing.
        #[arg(long)]
        all: bool,
    },
    /// Acknowledge a notice: it stops showing on this terminal. A notice
    /// sent again with the same id shows again.
    Ack {
        /// The notice's id, as `possync notices list` shows it.
        id: String,
    },
}

pub(crate) fn run(config: &Config, command: NoticesCommand) -> anyhow::Result<ExitCode> {
    let path = crate::cli::terminal_database(config)?;
    let flags = match command {
        NoticesCommand::List { .. } => OpenFlags::SQLITE_OPEN_READ_ONLY,
        NoticesCommand::Ack { .. } => OpenFlags::SQLITE_OPEN_READ_WRITE,
    };
    let connection = Connection::open_with_flags(path, flags)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // The terminal may be committing a batch: wait for it, not fail.
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    let has_notices: Option<String> = connection
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'notices'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    if has_notices.is_none() {
        anyhow::bail!(
            "{} has no notices table: the terminal has not run with the notices plugin (it is built in; is `[plugins] notices = false` set?)",
            path.display()
        );
    }
    match command {
        NoticesCommand::List { all } => list(&connection, all),
        NoticesCommand::Ack { id } => ack(&connection, &id),
    }
}

fn list(connection: &Connection, all: bool) -> anyhow::Result<ExitCode> {
    let mut statement = connection.prepare(
        "SELECT n.id, n.severity, coalesce(n.expires_at, ''),
                CASE
                    WHEN n.id IN (SELECT id FROM notices_active) THEN 'showing'
                    WHEN n.acknowledged_at IS NOT NULL THEN 'acknowledged ' || n.acknowledged_at
                    WHEN n.expires_at <= strftime('%Y-%m-%dT%H:%M:%SZ', 'now') THEN 'expired'
                    ELSE 'for other terminals'
                END,
                n.text
         FROM notices n
         WHERE ?1 OR n.id IN (SELECT id FROM notices_active)
         ORDER BY n.created_at, n.id",
    )?;
    let rows = statement
        .query_map([all], |row| {
            Ok([
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, String>(4)?,
            ])
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if rows.is_empty() {
        println!(
            "{}",
            if all {
                "no notices"
            } else {
                "no notices showing (`--all` lists expired and acknowledged ones)"
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    crate::cli::print_table(&["ID", "SEVERITY", "EXPIRES", "STATE", "TEXT"], &rows);
    Ok(ExitCode::SUCCESS)
}

fn ack(connection: &Connection, id: &str) -> anyhow::Result<ExitCode> {
    let changed = connection.execute(
        "UPDATE notices SET acknowledged_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')
         WHERE id = ?1 AND acknowledged_at IS NULL",
        [id],
    )?;
    if changed == 1 {
        println!("acknowledged notice {id}");
        return Ok(ExitCode::SUCCESS);
    }
    let known: Option<Option<String>> = connection
        .query_row(
            "SELECT acknowledged_at FROM notices WHERE id = ?1",
            [id],
            |row| row.get(0),
        )
        .optional()?;
    match known {
        Some(Some(at)) => {
            println!("notice {id} was acknowledged before, at {at}");
            Ok(ExitCode::SUCCESS)
        }
        _ => anyhow::bail!(
            "no notice {id:?} on this terminal: `possync notices list --all` lists them"
        ),
    }
}
