use crate::{Envelope, Version};

/// What a handler knows about the message it applies, besides its payload.
///
/// ```
/// # use possync_sdk::{Context, Envelope};
/// let envelope = Envelope::new("table_update", "STORE-1", serde_json::json!({}))
///     .with_message_id("m-1")
///     .with_version(42);
/// let message = Context::of(&envelope);
/// assert_eq!(message.license_key(), "STORE-1");
/// assert_eq!(message.order().map(|v| v.micros), Some(42));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context<'a> {
    message_type: &'a str,
    license_key: &'a str,
    message_id: Option<&'a str>,
    timestamp: Option<&'a str>,
    order: Option<Version>,
}

impl<'a> Context<'a> {
    /// The context of `envelope`.
    pub fn of(envelope: &'a Envelope) -> Self {
        Self {
            message_type: &envelope.message_type,
            license_key: &envelope.license_key,
            message_id: envelope.message_id.as_deref(),
            timestamp: envelope.timestamp.as_deref(),
            order: envelope.order(),
        }
    }

    /// A context from its parts, as a plugin's side of the dynamic-plugin
    /// boundary receives them.
    #[doc(hidden)]
    pub fn from_parts(
        message_type: &'a str,
        license_key: &'a str,
        message_id: Option<&'a str>,
        timestamp: Option<&'a str>,
        order: Option<Version>,
    ) -> Self {
        Self {
            message_type,
            license_key,
            message_id,
            timestamp,
            order,
        }
    }

    /// The envelope `type`.
    pub fn message_type(&self) -> &'a str {
        self.message_type
    }

    /// The store (license key) the message is for: this terminal's.
    pub fn license_key(&self) -> &'a str {
        self.license_key
    }

    /// The publisher's message id, if it sent one.
    pub fn message_id(&self) -> Option<&'a str> {
        self.message_id
    }

    /// When the back office made the change (RFC 3339), as sent; for an
    /// `updated_at` column.
    pub fn timestamp(&self) -> Option<&'a str> {
        self.timestamp
    }

    /// Where the change stands among the changes to its entity (its
    /// `version`, else its `timestamp`); `None` applies unconditionally, as
    /// the original system did. See [`Versioned`](crate::Versioned).
    pub fn order(&self) -> Option<Version> {
        self.order
    }
}
