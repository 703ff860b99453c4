//! Notices: what the back office tells the staff at the tills ("price list
//! changes at 18:00", "item recalled"), as the message type `notice`.
//!
//! Each notice is a row of `notices`, kept until it expires or someone
//! acknowledges it. A notice may name the terminals it is for; every
//! terminal of the store keeps it all the same, and the view
//! `notices_active` holds those of the terminal it is read on that are
//! neither expired nor acknowledged: what the POS app shows.
//! `acknowledged_at` is the one column the POS app may write (and
//! `possync notices ack ID` does).
//!
//! A notice sent again with the same `notice_id` replaces it, and shows
//! again if it was acknowledged.

use possync_sdk::{
    Context, Decision, HandlerError, Migration, Payload, Plugin, Settings, Store, TOMBSTONES,
    Value, Version, Versioned,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The payload of `notice`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(extend("x-possync-entity" = {"entity": "notice", "id": "notice_id", "change": "replace"}))]
pub struct Notice {
    /// The notice's id: sending a notice of the same id replaces it.
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    pub notice_id: String,
    /// What the staff read.
    pub text: String,
    /// How it is shown: `info` (the default), `warning` or `critical`.
    #[serde(default)]
    pub severity: Severity,
    /// When it stops showing (RFC 3339, for example
    /// `2026-12-24T18:00:00+01:00`); without it, it shows until
    /// acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The terminals it is for, by terminal id (`["till-1", "till-3"]`);
    /// without it, every terminal of the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminals: Option<Vec<String>>,
}

/// How a notice is shown.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// For information.
    #[default]
    Info,
    /// Needs attention.
    Warning,
    /// Needs attention now.
    Critical,
}

impl Severity {
    /// The word stored in `notices.severity`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

impl Payload for Notice {
    const TYPE: &'static str = "notice";

    fn validate(&self) -> Result<(), String> {
        if self.notice_id.trim().is_empty() {
            return Err("notice_id must not be empty".into());
        }
        if self.text.trim().is_empty() {
            return Err("text must not be empty".into());
        }
        if let Some(expires_at) = &self.expires_at {
            expiry(expires_at)?;
        }
        if let Some(terminals) = &self.terminals
            && terminals.iter().any(|t| t.trim().is_empty())
        {
            return Err("terminals must not hold an empty terminal id".into());
        }
        Ok(())
    }
}

/// `expires_at` in UTC, to the second, as `notices.expires_at` keeps it:
/// in that form, text order is time order, which the view compares by.
fn expiry(expires_at: &str) -> Result<String, String> {
    let time = OffsetDateTime::parse(expires_at, &Rfc3339).map_err(|err| {
        format!("expires_at {expires_at:?} is not an RFC 3339 time (like 2026-12-24T18:00:00+01:00): {err}")
    })?;
    let refused = || format!("expires_at {expires_at:?} is out of range");
    let mut utc = time
        .checked_to_offset(time::UtcOffset::UTC)
        .ok_or_else(refused)?;
    // Kept to the second: a fraction rounds up, never expiring early.
    if utc.nanosecond() > 0 {
        utc = utc
            .replace_nanosecond(0)
            .ok()
            .and_then(|t| t.checked_add(time::Duration::SECOND))
            .ok_or_else(refused)?;
    }
    Ok(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        utc.year(),
        u8::from(utc.month()),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second()
    ))
}

/// The notices' table and the view of what shows on this terminal.
/// Released migrations never change; a change of schema is a new one.
pub const MIGRATIONS: &[Migration] = &[
    TOMBSTONES,
    Migration::new(
        "notices/1",
        "CREATE TABLE IF NOT EXISTS notices (
            id              TEXT PRIMARY KEY NOT NULL,
            text            TEXT NOT NULL,
            severity        TEXT NOT NULL,
            expires_at      TEXT,
            terminals       TEXT,
            created_at      TEXT,
            acknowledged_at TEXT,
            sync_version    INTEGER NOT NULL DEFAULT 0
        );
        CREATE VIEW IF NOT EXISTS notices_active AS
            SELECT n.id, n.text, n.severity, n.expires_at, n.created_at
            FROM notices n
            WHERE n.acknowledged_at IS NULL
              AND (n.expires_at IS NULL OR n.expires_at > strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
              AND (n.terminals IS NULL OR EXISTS (
                  SELECT 1 FROM json_each(n.terminals) AS t, possync_status AS s
                  WHERE t.value = s.terminal_id));",
    ),
];

/// `notices`, by `id`.
const NOTICES: Versioned = Versioned::new("notices", "id");

/// The `notices` plugin.
pub fn notices_plugin(_: &Settings) -> Result<Plugin, String> {
    Ok(Plugin::new("notices")
        .describe("notices for the staff at the tills, until they expire or are acknowledged")
        .migrations(MIGRATIONS)
        .on::<Notice>(apply_notice))
}

/// Applies a `notice` to `notices`.
pub fn apply_notice(
    notice: Notice,
    message: &Context<'_>,
    store: &mut dyn Store,
) -> Result<(), HandlerError> {
    let order = message.order();
    let decision = NOTICES.decide(store, &notice.notice_id, order)?;
    if decision == Decision::Stale {
        return Ok(());
    }
    let expires_at = notice
        .expires_at
        .as_deref()
        .map(expiry)
        .transpose()
        .map_err(HandlerError::permanent)?;
    let terminals = notice
        .terminals
        .map(|terminals| serde_json::Value::from(terminals).to_string());
    store.execute(
        "INSERT INTO notices (id, text, severity, expires_at, terminals, created_at,
                              acknowledged_at, sync_version)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7)
         ON CONFLICT (id) DO UPDATE SET
             text = excluded.text,
             severity = excluded.severity,
             expires_at = excluded.expires_at,
             terminals = excluded.terminals,
             created_at = excluded.created_at,
             -- The same notice again (a redelivery) stays acknowledged;
             -- a changed one shows again.
             acknowledged_at = CASE
                 WHEN text IS excluded.text AND severity IS excluded.severity
                      AND expires_at IS excluded.expires_at AND terminals IS excluded.terminals
                 THEN acknowledged_at END,
             sync_version = excluded.sync_version",
        &[
            notice.notice_id.as_str().into(),
            notice.text.into(),
            notice.severity.as_str().into(),
            expires_at.into(),
            terminals.into(),
            Value::from(message.timestamp()),
            Version::column(order),
        ],
    )?;
    NOTICES.revive(store, &notice.notice_id, decision)?;
    Ok(())
}

possync_sdk::register_builtin!(notices_plugin);
