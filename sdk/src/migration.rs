/// One schema change: an id that never changes once released, and the SQL.
/// A later change is a new migration with a new id, never an edit.
///
/// ```
/// use possync_sdk::Migration;
///
/// const MIGRATIONS: &[Migration] = &[
///     Migration::new("tables/1", "CREATE TABLE restaurant_tables (id TEXT PRIMARY KEY)"),
///     Migration::new("tables/2", "ALTER TABLE restaurant_tables ADD COLUMN seats INTEGER"),
/// ];
/// assert_eq!(MIGRATIONS[1].id, "tables/2");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Unique across all plugins, for example `catalog/1`. The runtime
    /// records which ids ran, so a migration runs once per database.
    pub id: &'static str,
    /// One or more SQL statements, run in one transaction.
    pub sql: &'static str,
}

impl Migration {
    /// A migration with the given id and SQL.
    pub const fn new(id: &'static str, sql: &'static str) -> Self {
        Self { id, sql }
    }
}
