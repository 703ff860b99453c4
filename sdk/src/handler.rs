use crate::{Envelope, HandlerError, Migration, Store};

/// Applies one or more message types to the terminal's database.
///
/// The runtime calls [`handle`](Self::handle) inside a database transaction
/// that it commits before acknowledging the message; if the handler returns
/// an error or panics, everything it wrote for that message is rolled back.
/// A handler must therefore only write through the `store` it is given.
///
/// Messages may be delivered more than once (after a reconnect, a crash):
/// the runtime drops exact duplicates by message id, and a handler should
/// make its writes idempotent and drop stale updates using
/// [`Envelope::order`].
#[async_trait::async_trait]
pub trait MessageHandler: Send + Sync + std::fmt::Debug {
    /// The name under which config enables or disables this handler
    /// (`[plugins] <name> = false`). Letters, digits and `_`.
    fn name(&self) -> &str;

    /// The envelope `type`s this handler applies, for example `["price_update"]`.
    fn message_types(&self) -> &[&str];

    /// A one-line description for `possync plugins list`.
    fn description(&self) -> &str {
        ""
    }

    /// Schema changes this handler needs, applied once each, in order, at
    /// startup. Several handlers may list the same migration (same id); it
    /// runs once.
    fn migrations(&self) -> &[Migration] {
        &[]
    }

    /// Applies one message.
    async fn handle(&self, envelope: &Envelope, store: &mut dyn Store) -> Result<(), HandlerError>;
}
