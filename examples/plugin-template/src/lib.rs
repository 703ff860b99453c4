//! An example possync plugin: keeps the store's restaurant tables in the
//! terminal's database.
//!
//! Messages (routing key `license.<KEY>.table_update`):
//!
//! ```json
//! {"type": "table_update", "license_key": "KEY", "payload": {"table_id": "T1", "name": "Window", "seats": 4}}
//! {"type": "table_delete", "license_key": "KEY", "payload": {"table_id": "T1"}}
//! ```

use possync_sdk::host::{self, Level};
use possync_sdk::{
    Envelope, HandlerError, MessageHandler, Migration, Registrar, Store, Version, async_trait,
};
use serde::Deserialize;

/// The plugin's tables. Never change a released migration; add a new one
/// (`tables/2`, ...) instead: possync records which ids ran.
const MIGRATIONS: &[Migration] = &[Migration::new(
    "tables/1",
    "CREATE TABLE IF NOT EXISTS restaurant_tables (
        id           TEXT PRIMARY KEY NOT NULL,
        name         TEXT NOT NULL,
        seats        INTEGER NOT NULL,
        sync_version INTEGER NOT NULL DEFAULT 0
    );",
)];

#[derive(Debug, Deserialize)]
struct TableUpdate {
    table_id: String,
    name: String,
    seats: u32,
}

#[derive(Debug, Deserialize)]
struct TableDelete {
    table_id: String,
}

/// Optional `[plugins.tables.settings]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Tables with more seats are refused.
    #[serde(default = "default_max_seats")]
    max_seats: u32,
}

fn default_max_seats() -> u32 {
    40
}

#[derive(Debug)]
struct TablesHandler {
    max_seats: u32,
}

impl TablesHandler {
    /// The checks a table must pass; kept apart from the database so unit
    /// tests need no terminal.
    fn check(&self, table: &TableUpdate) -> Result<(), HandlerError> {
        if table.table_id.trim().is_empty() {
            return Err(HandlerError::permanent("table_id must not be empty"));
        }
        if table.seats == 0 || table.seats > self.max_seats {
            return Err(HandlerError::permanent(format!(
                "seats must be 1 to {}, not {}",
                self.max_seats, table.seats
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl MessageHandler for TablesHandler {
    fn name(&self) -> &str {
        "tables"
    }

    fn message_types(&self) -> &[&str] {
        &["table_update", "table_delete"]
    }

    fn description(&self) -> &str {
        "restaurant tables"
    }

    fn migrations(&self) -> &[Migration] {
        MIGRATIONS
    }

    async fn handle(&self, envelope: &Envelope, store: &mut dyn Store) -> Result<(), HandlerError> {
        // Drop changes older than what the row holds (redeliveries, late arrivals).
        let version = envelope.order();
        if envelope.message_type == "table_delete" {
            let delete: TableDelete = envelope.payload_as()?;
            store.execute(
                "DELETE FROM restaurant_tables WHERE id = ?1",
                &[delete.table_id.into()],
            )?;
            return Ok(());
        }
        let table: TableUpdate = envelope.payload_as()?;
        self.check(&table)?;
        let stored = ["SELECT sync_version FROM restaurant_tables WHERE id = ?1"];
        if !possync_sdk::is_newer(store, &stored, &table.table_id, version)? {
            return Ok(());
        }
        store.execute(
            "INSERT INTO restaurant_tables (id, name, seats, sync_version) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, seats = excluded.seats,
                 sync_version = excluded.sync_version",
            &[
                table.table_id.into(),
                table.name.into(),
                i64::from(table.seats).into(),
                Version::column(version),
            ],
        )?;
        Ok(())
    }
}

/// Called once when possync loads the library.
fn register(registrar: &mut Registrar) -> Result<(), String> {
    let settings: Settings = registrar.settings()?;
    host::log(
        Level::Info,
        "tables",
        &format!("tables of up to {} seats", settings.max_seats),
    );
    registrar.register(TablesHandler {
        max_seats: settings.max_seats,
    });
    Ok(())
}

possync_sdk::declare_plugin!(register);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_needs_an_id_and_a_sensible_number_of_seats() {
        let handler = TablesHandler { max_seats: 8 };
        let table = |id: &str, seats| TableUpdate {
            table_id: id.into(),
            name: "Window".into(),
            seats,
        };
        assert!(handler.check(&table("T1", 4)).is_ok());
        assert!(handler.check(&table("", 4)).is_err());
        assert!(handler.check(&table("T1", 0)).is_err());
        assert!(handler.check(&table("T1", 9)).is_err());
    }
}
