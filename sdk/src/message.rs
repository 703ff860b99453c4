use serde::Serialize;

use crate::Envelope;

/// A typed payload of one message type, for publishing without writing JSON
/// by hand. The handler of the type usually decodes the same struct.
pub trait WireMessage: Serialize {
    /// The envelope `type` of this payload, for example `price_update`.
    const TYPE: &'static str;

    /// The envelope that carries this payload to the store `license_key`.
    fn to_envelope(&self, license_key: &str) -> Result<Envelope, serde_json::Error> {
        Ok(Envelope::with_raw_payload(
            Self::TYPE,
            license_key,
            serde_json::value::to_raw_value(self)?,
        ))
    }
}
