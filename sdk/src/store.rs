use crate::{StoreError, Version};

/// A value bound to or read from SQL. Most Rust values convert with `into()`.
///
/// ```
/// use possync_sdk::Value;
///
/// let params: [Value; 4] = ["T1".into(), 4_i64.into(), true.into(), None::<String>.into()];
/// assert_eq!(params[2], Value::Integer(1)); // SQLite has no boolean
/// assert_eq!(params[3], Value::Null);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl Value {
    /// The integer, if this is one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Self::Integer(v) => Some(*v),
            _ => None,
        }
    }

    /// The text, if this is text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Text(v) => Some(v),
            _ => None,
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Integer(v)
    }
}
/// SQLite has no boolean type: `true` is 1 and `false` is 0.
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Self::Integer(i64::from(v))
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Self::Real(v)
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Self::Blob(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Self::Null, Into::into)
    }
}

/// Work outside the database, such as writing or removing a file, that
/// must share the fate of a message's writes.
///
/// ```
/// use possync_sdk::{HandlerError, Store};
///
/// fn forget_picture(store: &mut dyn Store, path: String) -> Result<(), HandlerError> {
///     store.execute("DELETE FROM pictures WHERE path = ?1", &[path.as_str().into()])?;
///     // The file goes only if the row's removal is committed.
///     store.after_commit(Box::new(move || { let _ = std::fs::remove_file(path); }));
///     Ok(())
/// }
/// ```
pub type Effect = Box<dyn FnOnce()>;

/// The terminal's database, as a handler sees it: inside the transaction
/// of the message being applied.
///
/// SQL uses SQLite's dialect and numbered parameters (`?1`, `?2`, ...).
/// Statements are prepared once and cached by the runtime.
///
/// A failure of the database itself (locked by another program, disk full)
/// is the runtime's to handle: it holds the whole batch and tries it again
/// until it commits, whatever the handler returns.
///
/// ```
/// use possync_sdk::{HandlerError, Store, Value};
///
/// fn seats(store: &mut dyn Store, table: &str) -> Result<Option<i64>, HandlerError> {
///     let row = store.query_row("SELECT seats FROM restaurant_tables WHERE id = ?1", &[table.into()])?;
///     Ok(row.and_then(|columns| columns.first().and_then(Value::as_i64)))
/// }
/// ```
pub trait Store {
    /// Runs one statement; returns the number of rows changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize, StoreError>;

    /// Runs a query and returns its first row, if any.
    fn query_row(&mut self, sql: &str, params: &[Value]) -> Result<Option<Vec<Value>>, StoreError>;

    /// Runs `effect` once this message's writes are committed, and never if
    /// they are rolled back: for removing a file the database no longer
    /// refers to. Effects run in the order they were added.
    fn after_commit(&mut self, effect: Effect);

    /// Runs `effect` if this message's writes are rolled back: for undoing
    /// work done ahead of the commit, such as a file written so that the
    /// committed row never points at a missing one. Effects run in the
    /// reverse order they were added.
    fn on_rollback(&mut self, effect: Effect);

    /// Tells the runtime that the message changes nothing because entity
    /// `id` holds a newer change: stored at `stored`, the message at
    /// `incoming`. The runtime counts such messages by type and logs them,
    /// so a publisher whose clock runs behind is seen, not silently ignored.
    fn stale(&mut self, id: &str, incoming: Version, stored: i64);
}
