use crate::{Migration, Store, StoreError, Value, Version};

/// The table where deletes of every [`Versioned`] table leave their
/// tombstones. List it in your plugin's migrations before your own.
///
/// ```
/// use possync_sdk::{Migration, TOMBSTONES};
///
/// const MIGRATIONS: &[Migration] = &[
///     TOMBSTONES,
///     Migration::new("tables/1", "CREATE TABLE restaurant_tables (
///         id TEXT PRIMARY KEY, seats INTEGER, sync_version INTEGER NOT NULL DEFAULT 0)"),
/// ];
/// ```
pub const TOMBSTONES: Migration = Migration::new(
    "possync/tombstones/1",
    "CREATE TABLE IF NOT EXISTS possync_tombstones (
        entity       TEXT NOT NULL,
        id           TEXT NOT NULL,
        sync_version INTEGER NOT NULL,
        PRIMARY KEY (entity, id)
    ) WITHOUT ROWID;",
);

/// A table whose rows keep the version of the change that wrote them (an
/// `INTEGER sync_version` column) and whose deletes leave a tombstone, so
/// that a late or redelivered update never undoes a newer change and never
/// brings a deleted row back.
///
/// ```
/// # use possync_sdk::{Context, HandlerError, Store, Versioned, Decision};
/// const TABLES: Versioned = Versioned::new("restaurant_tables", "id");
///
/// fn delete_table(id: &str, message: &Context, store: &mut dyn Store) -> Result<(), HandlerError> {
///     if TABLES.decide(store, id, message.order())? != Decision::Stale {
///         TABLES.delete(store, id, message.order())?;
///     }
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versioned {
    table: &'static str,
    id_column: &'static str,
}

/// What to do with a change to one row of a [`Versioned`] table.
///
/// ```
/// # use possync_sdk::{Context, Decision, HandlerError, Store, Versioned};
/// const TABLES: Versioned = Versioned::new("restaurant_tables", "id");
///
/// fn set_seats(id: &str, seats: i64, message: &Context, store: &mut dyn Store) -> Result<(), HandlerError> {
///     let decision = TABLES.decide(store, id, message.order())?;
///     if decision == Decision::Stale {
///         return Ok(()); // a newer change is already here
///     }
///     store.execute(
///         "INSERT OR REPLACE INTO restaurant_tables (id, seats, sync_version) VALUES (?1, ?2, ?3)",
///         &[id.into(), seats.into(), possync_sdk::Version::column(message.order())],
///     )?;
///     TABLES.revive(store, id, decision)?; // it may have been deleted before
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Older than what the database holds: change nothing. The runtime was
    /// told (see [`Store::stale`]).
    Stale,
    /// Apply it. `revives` says the row was deleted before this newer
    /// change: write the row, then call [`Versioned::revive`].
    Apply {
        /// Whether a tombstone of the row exists.
        revives: bool,
    },
}

impl Versioned {
    /// The table `table`, its rows found by `id_column`. Both are SQL
    /// identifiers written in your code, never input.
    pub const fn new(table: &'static str, id_column: &'static str) -> Self {
        Self { table, id_column }
    }

    /// Whether a change at `order` to row `id` is newer than what the
    /// database holds: the row's version, or else its tombstone's. A change
    /// without an order applies (and brings a deleted row back), except
    /// over a row or tombstone a sequenced change wrote: only a higher
    /// `seq` replaces that, or a change without an order could let an
    /// older `seq` arriving late overwrite a newer one.
    pub fn decide(
        &self,
        store: &mut dyn Store,
        id: &str,
        order: Option<Version>,
    ) -> Result<Decision, StoreError> {
        let row = store.query_row(
            &format!(
                "SELECT sync_version FROM {} WHERE {} = ?1",
                self.table, self.id_column
            ),
            &[id.into()],
        )?;
        // An existing row has no tombstone: deletes remove the row.
        let (stored, revives) = match row {
            Some(row) => (first_i64(&row), false),
            None => match store.query_row(
                "SELECT sync_version FROM possync_tombstones WHERE entity = ?1 AND id = ?2",
                &[self.table.into(), id.into()],
            )? {
                Some(row) => (first_i64(&row), true),
                None => return Ok(Decision::Apply { revives: false }),
            },
        };
        match order {
            Some(order) if !order.supersedes(stored) => {
                store.stale(id, order, stored);
                Ok(Decision::Stale)
            }
            None if Version::seq_of(stored).is_some() => {
                let unordered = Version {
                    micros: 0,
                    exact: false,
                };
                store.stale(id, unordered, stored);
                Ok(Decision::Stale)
            }
            _ => Ok(Decision::Apply { revives }),
        }
    }

    /// [`decide`](Self::decide), as a yes or no.
    pub fn is_newer(
        &self,
        store: &mut dyn Store,
        id: &str,
        order: Option<Version>,
    ) -> Result<bool, StoreError> {
        Ok(self.decide(store, id, order)? != Decision::Stale)
    }

    /// Deletes row `id` and records its tombstone at `order`, so updates
    /// older than the delete cannot bring it back. Returns whether a row was
    /// deleted. Check [`decide`](Self::decide) first.
    pub fn delete(
        &self,
        store: &mut dyn Store,
        id: &str,
        order: Option<Version>,
    ) -> Result<bool, StoreError> {
        let deleted = store.execute(
            &format!("DELETE FROM {} WHERE {} = ?1", self.table, self.id_column),
            &[id.into()],
        )?;
        store.execute(
            "INSERT INTO possync_tombstones (entity, id, sync_version) VALUES (?1, ?2, ?3)
             ON CONFLICT (entity, id) DO UPDATE SET sync_version = max(sync_version, excluded.sync_version)",
            &[self.table.into(), id.into(), Version::column(order)],
        )?;
        Ok(deleted > 0)
    }

    /// Removes the tombstone of a row that a newer change brought back, if
    /// `decision` says it had one.
    pub fn revive(
        &self,
        store: &mut dyn Store,
        id: &str,
        decision: Decision,
    ) -> Result<(), StoreError> {
        if decision == (Decision::Apply { revives: true }) {
            store.execute(
                "DELETE FROM possync_tombstones WHERE entity = ?1 AND id = ?2",
                &[self.table.into(), id.into()],
            )?;
        }
        Ok(())
    }
}

fn first_i64(row: &[Value]) -> i64 {
    row.first().and_then(Value::as_i64).unwrap_or(0)
}
