//! The payloads of `image_update` and `image_delete`.

use base64::Engine;
use possync_sdk::Payload;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The largest image the plugin takes unless `max_image_bytes` says
/// otherwise. Sent base64-encoded (4 bytes for every 3) inside JSON, it fits
/// the terminals' default `terminal.max_message_bytes`.
pub const DEFAULT_MAX_IMAGE_BYTES: usize = 5 * 1024 * 1024;

/// `image_update`: a product's picture, whole, with its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(extend("x-possync-entity" = {"entity": "product_image", "id": "product_id", "change": "replace"}))]
pub struct ImageUpdate {
    /// The product the picture shows (a string, or an integer on the wire).
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    pub product_id: String,
    /// `image/png`, `image/jpeg`, `image/webp` or `image/gif`; when absent,
    /// told from the image's first bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// SHA-256 of the decoded bytes, lowercase hex: checked when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The bytes, standard base64 (`possync publish` reads them from a file
    /// with `--file PICTURE` or `--data-base64 @PICTURE`).
    #[schemars(extend("contentEncoding" = "base64", "x-possync-file-option" = "file"))]
    pub data_base64: String,
}

impl ImageUpdate {
    /// The message for `bytes`, with the hash and encoding filled in.
    pub fn new(
        product_id: impl Into<String>,
        content_type: impl Into<String>,
        bytes: &[u8],
    ) -> Self {
        Self {
            product_id: product_id.into(),
            content_type: Some(content_type.into()),
            sha256: Some(sha256_hex(bytes)),
            data_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }

    /// The image's content type and file extension: as sent, or told from
    /// its first bytes.
    pub(crate) fn kind(&self) -> Result<(&str, &'static str), String> {
        let content_type = match &self.content_type {
            Some(sent) => sent.as_str(),
            None => sniff(&self.data_base64).ok_or(
                "content_type is missing and the data is not a PNG, JPEG, WebP or GIF image",
            )?,
        };
        let extension = match content_type {
            "image/png" => "png",
            "image/jpeg" => "jpg",
            "image/webp" => "webp",
            "image/gif" => "gif",
            other => {
                return Err(format!(
                    "content_type {other:?} is not an image type the POS shows (image/png, image/jpeg, image/webp, image/gif)"
                ));
            }
        };
        Ok((content_type, extension))
    }
}

impl Payload for ImageUpdate {
    const TYPE: &'static str = "image_update";

    /// The content type; the bytes are checked against the hash and the
    /// terminal's size limit when the image is applied.
    fn validate(&self) -> Result<(), String> {
        self.kind().map(drop)
    }
}

/// `image_delete`: removes a product's picture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(extend("x-possync-entity" = {"entity": "product_image", "id": "product_id", "change": "delete"}))]
pub struct ImageDelete {
    /// The product (a string, or an integer on the wire).
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    pub product_id: String,
}

impl Payload for ImageDelete {
    const TYPE: &'static str = "image_delete";
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The content type of base64 `data` by its first bytes (the formats' magic
/// numbers), decoding only the first few.
fn sniff(data: &str) -> Option<&'static str> {
    let head = data.get(..16).unwrap_or(data);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(head)
        .ok()?;
    match bytes.as_slice() {
        [0x89, b'P', b'N', b'G', ..] => Some("image/png"),
        [0xff, 0xd8, 0xff, ..] => Some("image/jpeg"),
        [b'G', b'I', b'F', b'8', ..] => Some("image/gif"),
        [
            b'R',
            b'I',
            b'F',
            b'F',
            _,
            _,
            _,
            _,
            b'W',
            b'E',
            b'B',
            b'P',
            ..,
        ] => Some("image/webp"),
        _ => None,
    }
}
