use crate::StoreError;

/// A value bound to or read from SQL.
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

/// The terminal's database, as a handler sees it: inside the transaction
/// of the message being applied.
///
/// SQL uses SQLite's dialect and numbered parameters (`?1`, `?2`, ...).
/// Statements are prepared once and cached by the runtime.
pub trait Store: Send {
    /// Runs one statement; returns the number of rows changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize, StoreError>;

    /// Runs a query and returns its first row, if any.
    fn query_row(&mut self, sql: &str, params: &[Value]) -> Result<Option<Vec<Value>>, StoreError>;
}

/// Whether a change at `order` to entity `id` is newer than what the
/// database holds. Each of `queries` selects a stored version by `?1` (the
/// entity's row, then its tombstone, say); the first that finds a row
/// decides. A message without an order, or an entity never seen, applies.
pub fn is_newer(
    store: &mut dyn Store,
    queries: &[&str],
    id: &str,
    order: Option<crate::Version>,
) -> Result<bool, StoreError> {
    let Some(order) = order else { return Ok(true) };
    for sql in queries {
        if let Some(row) = store.query_row(sql, &[id.into()])? {
            return Ok(order.supersedes(row.first().and_then(Value::as_i64).unwrap_or(0)));
        }
    }
    Ok(true)
}
