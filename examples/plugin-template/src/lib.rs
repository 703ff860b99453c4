//! An example possync plugin: keeps the store's restaurant tables in the
//! terminal's database.
//!
//! Messages (routing key `license.<KEY>.table_update`):
//!
//! ```json
//! {"type": "table_update", "license_key": "KEY", "payload": {"table_id": "T1", "name": "Window", "seats": 4}}
//! {"type": "table_delete", "license_key": "KEY", "payload": {"table_id": "T1"}}
//! ```

use possync_sdk::log::{self, Level};
use possync_sdk::{
    Context, Decision, HandlerError, Migration, Payload, Plugin, Settings, Store, TOMBSTONES,
    Version, Versioned,
};
use serde::{Deserialize, Serialize};

/// The plugin's tables: the SDK's tombstones first, then its own. Never
/// change a released migration; add a new one (`tables/2`, ...) instead:
/// possync records which ids ran.
const MIGRATIONS: &[Migration] = &[
    TOMBSTONES,
    Migration::new(
        "tables/1",
        "CREATE TABLE IF NOT EXISTS restaurant_tables (
            id           TEXT PRIMARY KEY NOT NULL,
            name         TEXT NOT NULL,
            seats        INTEGER NOT NULL,
            sync_version INTEGER NOT NULL DEFAULT 0
        );",
    ),
];

/// `restaurant_tables`: each row keeps the version of the change that
/// wrote it, and a delete leaves a tombstone, so a late update never
/// brings a deleted table back.
const TABLES: Versioned = Versioned::new("restaurant_tables", "id");

/// `table_update`: creates or replaces a table.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
// The entity it changes: the backend keeps its state, and a terminal
// draining a backlog skips updates a later one overwrites.
#[schemars(extend("x-possync-entity" = {"entity": "restaurant_table", "id": "table_id", "change": "replace"}))]
pub struct TableUpdate {
    /// The table's id (a string, or an integer on the wire).
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    pub table_id: String,
    /// What the POS shows.
    pub name: String,
    /// How many guests it seats.
    #[schemars(range(min = 1))]
    pub seats: u32,
}

impl Payload for TableUpdate {
    const TYPE: &'static str = "table_update";

    /// Rules of the message itself: a terminal dead-letters a payload that
    /// breaks them, and a publisher refuses to send it.
    fn validate(&self) -> Result<(), String> {
        if self.table_id.trim().is_empty() {
            return Err("table_id must not be empty".into());
        }
        if self.seats == 0 {
            return Err("seats must be 1 or more".into());
        }
        Ok(())
    }
}

/// `table_delete`: removes a table.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(extend("x-possync-entity" = {"entity": "restaurant_table", "id": "table_id", "change": "delete"}))]
pub struct TableDelete {
    /// The table's id (a string, or an integer on the wire).
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    pub table_id: String,
}

impl Payload for TableDelete {
    const TYPE: &'static str = "table_delete";
}

/// Optional `[plugins.tables.settings]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableSettings {
    /// Tables with more seats are refused.
    #[serde(default = "default_max_seats")]
    max_seats: u32,
}

fn default_max_seats() -> u32 {
    40
}

/// The plugin: called once when possync loads the library, with the
/// settings from config.
pub fn plugin(settings: &Settings) -> Result<Plugin, String> {
    let TableSettings { max_seats } = settings.get()?;
    log::log(
        Level::Info,
        "tables",
        &format!("tables of up to {max_seats} seats"),
    );
    Ok(Plugin::new("tables")
        .describe("restaurant tables")
        .migrations(MIGRATIONS)
        .on::<TableUpdate>(move |table, message, store| {
            apply_update(max_seats, table, message, store)
        })
        .on::<TableDelete>(apply_delete))
}

possync_sdk::export_plugin!(plugin);

fn apply_update(
    max_seats: u32,
    table: TableUpdate,
    message: &Context<'_>,
    store: &mut dyn Store,
) -> Result<(), HandlerError> {
    // A rule of this terminal's config: the message can never apply here.
    if table.seats > max_seats {
        return Err(HandlerError::permanent(format!(
            "seats must be 1 to {max_seats}, not {}",
            table.seats
        )));
    }
    // Skip a change older than what the row (or its tombstone) holds:
    // redeliveries, late arrivals. possync counts it as stale.
    let decision = TABLES.decide(store, &table.table_id, message.order())?;
    if decision == Decision::Stale {
        return Ok(());
    }
    store.execute(
        "INSERT INTO restaurant_tables (id, name, seats, sync_version) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET name = excluded.name, seats = excluded.seats,
             sync_version = excluded.sync_version",
        &[
            table.table_id.as_str().into(),
            table.name.into(),
            i64::from(table.seats).into(),
            Version::column(message.order()),
        ],
    )?;
    // A table deleted before this newer change is back: its tombstone goes.
    TABLES.revive(store, &table.table_id, decision)?;
    Ok(())
}

fn apply_delete(
    table: TableDelete,
    message: &Context<'_>,
    store: &mut dyn Store,
) -> Result<(), HandlerError> {
    // The delete leaves a tombstone at its version, so an update older than
    // it cannot bring the table back.
    if TABLES.is_newer(store, &table.table_id, message.order())? {
        TABLES.delete(store, &table.table_id, message.order())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use possync_sdk::Settings;
    use possync_testkit::{Applied, TestTerminal, message};
    use serde_json::json;

    use super::*;

    fn table(id: &str, seats: u32) -> TableUpdate {
        TableUpdate {
            table_id: id.into(),
            name: "Window".into(),
            seats,
        }
    }

    fn delete(id: &str) -> TableDelete {
        TableDelete {
            table_id: id.into(),
        }
    }

    #[test]
    fn a_table_is_created_replaced_and_deleted() -> Result<(), Box<dyn std::error::Error>> {
        let mut till = TestTerminal::new(plugin)?;
        till.apply(message(&table("T1", 4)))?;
        till.apply(message(&table("T1", 6)))?;
        assert_eq!(
            till.query("SELECT id, name, seats FROM restaurant_tables")?,
            [json!(["T1", "Window", 6])]
        );
        till.apply(message(&delete("T1")))?;
        assert!(till.query("SELECT * FROM restaurant_tables")?.is_empty());
        Ok(())
    }

    #[test]
    fn a_late_update_does_not_bring_a_deleted_table_back() -> Result<(), Box<dyn std::error::Error>>
    {
        let mut till = TestTerminal::new(plugin)?;
        till.apply(message(&table("T1", 4)).with_version(10))?;
        till.apply(message(&delete("T1")).with_version(30))?;
        // Published before the delete, arriving after it.
        let late = till.apply(message(&table("T1", 6)).with_version(20))?;
        assert!(matches!(late, Applied::Stale(_)), "{late:?}");
        assert!(till.query("SELECT * FROM restaurant_tables")?.is_empty());
        // A change made after the delete brings it back.
        till.apply(message(&table("T1", 8)).with_version(40))?;
        assert_eq!(
            till.query("SELECT seats FROM restaurant_tables")?,
            [json!([8])]
        );
        Ok(())
    }

    #[test]
    fn a_table_needs_an_id_and_a_sensible_number_of_seats() -> Result<(), Box<dyn std::error::Error>>
    {
        let settings = Settings::new("tables", json!({ "max_seats": 8 }));
        let mut till = TestTerminal::with_settings(plugin, settings)?;
        assert_eq!(till.apply(message(&table("T1", 8)))?, Applied::Changed);
        for (bad, reason) in [
            (table("", 4), "table_id must not be empty"),
            (table("T2", 0), "seats must be 1 or more"),
            (table("T2", 9), "seats must be 1 to 8, not 9"),
        ] {
            let refused = till.apply(message(&bad)).expect_err(reason);
            assert!(refused.to_string().contains(reason), "{refused}");
        }
        Ok(())
    }

    #[test]
    fn a_misspelt_setting_stops_the_plugin_with_its_name() {
        let settings = Settings::new("tables", json!({ "max_seat": 8 }));
        let err = TestTerminal::with_settings(plugin, settings).expect_err("a typo");
        assert!(err.to_string().contains("max_seat"), "{err}");
    }
}
