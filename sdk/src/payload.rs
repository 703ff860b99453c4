use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Envelope;

/// The payload of one message type: the type names its wire `type` once,
/// and the framework decodes it, routes by it and checks it.
///
/// ```
/// use possync_sdk::Payload;
///
/// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// struct TableUpdate { table_id: String, seats: u32 }
///
/// impl Payload for TableUpdate {
///     const TYPE: &'static str = "table_update";
///
///     fn validate(&self) -> Result<(), String> {
///         if self.seats == 0 { return Err("seats must be 1 or more".into()); }
///         Ok(())
///     }
/// }
/// ```
///
/// The JSON Schema (from `schemars`) tells publishers what the payload looks
/// like: `possync publish table_update table_id=T1 seats=4` types each field
/// by it. [`validate`](Self::validate) runs before the handler on a
/// terminal and before sending in `possync publish`, so a bad payload is
/// refused where it is made and dead-lettered if it arrives anyway.
pub trait Payload: Serialize + DeserializeOwned + schemars::JsonSchema + 'static {
    /// The envelope `type`, for example `price_update`.
    const TYPE: &'static str;

    /// Rules the payload's shape cannot say (a finite price, an id that is
    /// not empty). The reason is the dead-letter reason.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// The envelope that carries this payload to the store `license_key`.
    fn to_envelope(&self, license_key: &str) -> Result<Envelope, serde_json::Error> {
        Ok(Envelope::with_raw_payload(
            Self::TYPE,
            license_key,
            serde_json::value::to_raw_value(self)?,
        ))
    }
}
