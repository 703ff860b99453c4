/// Why a handler did not apply a message.
///
/// The runtime acts on the kind: a permanent error dead-letters the message
/// at once (retrying cannot help), a transient one returns it to the queue to
/// be tried again.
///
/// ```
/// use possync_sdk::HandlerError;
///
/// fn seats(count: i64) -> Result<i64, HandlerError> {
///     if count < 1 {
///         return Err(HandlerError::permanent(format!("seats {count}: must be 1 or more")));
///     }
///     Ok(count)
/// }
/// assert!(!seats(0).unwrap_err().is_transient());
/// assert!(HandlerError::transient("the printer is busy").is_transient());
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// The message can never apply: a payload that does not fit, a value out of range.
    #[error("{0}")]
    Permanent(String),
    /// The message may apply later: a busy database, a full disk.
    #[error("{0}")]
    Transient(String),
    /// The handler panicked (caught). Retried a bounded number of times,
    /// then dead-lettered like any message that fails every time.
    #[error("panicked: {0}")]
    Panicked(String),
    /// The terminal's own storage cannot take the handler's writes now (a
    /// full disk, a read-only file system): any message would fail. The
    /// runtime holds the whole batch and tries it again until it can, and
    /// never dead-letters a message for it.
    #[error("{0}")]
    Storage(String),
}

impl HandlerError {
    /// A message that can never apply, with the reason.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent(reason.into())
    }

    /// A message that may apply if tried again later, with the reason.
    pub fn transient(reason: impl Into<String>) -> Self {
        Self::Transient(reason.into())
    }

    /// Storage outside the database (files) that cannot take writes now,
    /// with the reason: the batch waits until it can.
    pub fn storage(reason: impl Into<String>) -> Self {
        Self::Storage(reason.into())
    }

    /// Whether trying the same message again may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Transient(_) | Self::Panicked(_) | Self::Storage(_)
        )
    }
}

/// A failed database operation, as reported through [`Store`](crate::Store).
/// `?` turns it into a [`HandlerError`] of the same kind.
///
/// ```
/// use possync_sdk::{HandlerError, StoreError};
///
/// let locked = StoreError::transient("database is locked");
/// assert!(HandlerError::from(locked).is_transient());
/// let bad_sql = StoreError::permanent("no such table: tabels");
/// assert!(!HandlerError::from(bad_sql).is_transient());
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("database: {message}")]
pub struct StoreError {
    message: String,
    transient: bool,
}

impl StoreError {
    /// An error that will recur on every try (bad SQL, a constraint).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            transient: false,
        }
    }

    /// An error that may pass (database busy or locked, disk full, I/O).
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            transient: true,
        }
    }

    /// Whether the same operation may succeed later.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// What the database said, without the `database:` its display adds.
    #[cfg_attr(not(feature = "host"), allow(dead_code))]
    pub(crate) fn message(&self) -> &str {
        &self.message
    }
}

impl From<StoreError> for HandlerError {
    fn from(err: StoreError) -> Self {
        if err.is_transient() {
            Self::Transient(err.to_string())
        } else {
            Self::Permanent(err.to_string())
        }
    }
}
