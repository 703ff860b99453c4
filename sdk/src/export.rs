/// How a plugin's tables hold one kind of entity, for the checksums that
/// prove a terminal holds what the back office holds (see
/// [`Plugin::export`](crate::Plugin::export)).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Export {
    /// The kind of entity, as its types' `x-possync-entity` names it.
    pub entity: String,
    /// The entity fields the checksum covers, under their entity names;
    /// the first is its id.
    pub fields: Vec<String>,
    /// One row per entity, its columns those fields in that order.
    pub query: String,
}
