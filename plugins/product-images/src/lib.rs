//! Product-image sync: a dynamic plugin, and the payload types of its
//! messages.
//!
//! An image is checked against its SHA-256, written under `images_dir` as
//! `<sha256>.<ext>` through a temporary file and a rename (so no reader ever
//! sees half an image), and recorded in
//! `product_images(product_id, path, sha256, content_type)`.
//!
//! Files follow the database: a new file is written before the commit (so a
//! committed row never points at a missing file) and removed again if the
//! writes roll back; a file no row refers to any more is removed only after
//! the commit.
//!
//! A terminal loads the library built with the `dynamic` feature:
//!
//! ```sh
//! cargo build --release -p possync-plugin-product-images --features dynamic
//! ```
//!
//! ```toml
//! [plugins.product_images]
//! path = "target/release/libpossync_plugin_product_images.so"
//!
//! [plugins.product_images.settings]
//! images_dir = "/var/lib/pos/images"   # required
//! max_image_bytes = 5242880            # default 5 MiB
//! ```
//!
//! A publisher depends on this crate without the feature, for the types.

mod apply;
mod files;
mod payload;

pub use apply::MIGRATIONS;
pub use payload::{DEFAULT_MAX_IMAGE_BYTES, ImageDelete, ImageUpdate, sha256_hex};

use std::path::PathBuf;
use std::sync::Arc;

use possync_sdk::log::{self, Level};
use possync_sdk::{Plugin, Settings};

use crate::apply::Images;

/// `[plugins.product_images.settings]`
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageSettings {
    /// Where image files go; created if missing. Required on a terminal; a
    /// publisher, which only checks payloads, needs none.
    images_dir: Option<PathBuf>,
    /// Larger images are refused (dead-lettered), never written.
    #[serde(default = "default_max_image_bytes")]
    max_image_bytes: usize,
}

fn default_max_image_bytes() -> usize {
    DEFAULT_MAX_IMAGE_BYTES
}

/// The `product_images` plugin, with its settings.
pub fn plugin(settings: &Settings) -> Result<Plugin, String> {
    let applies = settings.applies();
    let settings: ImageSettings = settings.get()?;
    let images_dir = match settings.images_dir {
        Some(dir) if applies => {
            std::fs::create_dir_all(&dir)
                .map_err(|err| format!("cannot create images_dir {}: {err}", dir.display()))?;
            log::log(
                Level::Info,
                "product_images",
                &format!("images go to {}", dir.display()),
            );
            dir
        }
        None if applies => {
            return Err(
                "[plugins.product_images.settings] needs images_dir, the folder image files go to"
                    .into(),
            );
        }
        // Only checking payloads: no image is ever written.
        _ => PathBuf::new(),
    };
    let images = Arc::new(Images::new(images_dir, settings.max_image_bytes));
    let deletes = Arc::clone(&images);
    Ok(Plugin::new("product_images")
        .describe("product pictures, written as files and recorded in product_images")
        .migrations(apply::MIGRATIONS)
        // Which products have a picture: the file's checksum is the
        // terminal's own when a sender left it out.
        .export(
            "product_image",
            &["product_id"],
            "SELECT product_id FROM product_images",
        )
        .on::<ImageUpdate>(move |image, message, store| images.update(image, message, store))
        .on::<ImageDelete>(move |delete, message, store| deletes.delete(delete, message, store)))
}

#[cfg(feature = "dynamic")]
possync_sdk::export_plugin!(plugin);
