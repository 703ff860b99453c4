//! The plugin's table and how its messages change it and the files.

use std::path::PathBuf;

use base64::Engine;
use possync_sdk::{Context, HandlerError, Migration, Store, TOMBSTONES, Value, Version, Versioned};

use crate::files::{self, Removals};
use crate::{ImageDelete, ImageUpdate, sha256_hex};

/// The plugin's schema. Released migrations never change.
pub const MIGRATIONS: &[Migration] = &[
    TOMBSTONES,
    Migration::new(
        "product_images/1",
        "CREATE TABLE IF NOT EXISTS product_images (
            product_id   TEXT PRIMARY KEY NOT NULL,
            path         TEXT NOT NULL,
            sha256       TEXT NOT NULL,
            content_type TEXT NOT NULL,
            sync_version INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE IF NOT EXISTS product_image_tombstones (
            product_id   TEXT PRIMARY KEY NOT NULL,
            sync_version INTEGER NOT NULL
        ) WITHOUT ROWID;",
    ),
    // Moves the tombstones into the SDK's table, where `Versioned` finds them.
    Migration::new(
        "product_images/2",
        "INSERT INTO possync_tombstones (entity, id, sync_version)
            SELECT 'product_images', product_id, sync_version FROM product_image_tombstones WHERE true
            ON CONFLICT (entity, id) DO UPDATE
                SET sync_version = max(sync_version, excluded.sync_version);
        DROP TABLE product_image_tombstones;",
    ),
];

const IMAGES: Versioned = Versioned::new("product_images", "product_id");

/// Applies image messages: the plugin's settings, and the files to remove
/// once the batch commits.
#[derive(Debug)]
pub(crate) struct Images {
    images_dir: PathBuf,
    max_image_bytes: usize,
    removals: Removals,
}

impl Images {
    pub(crate) fn new(images_dir: PathBuf, max_image_bytes: usize) -> Self {
        Self {
            images_dir,
            max_image_bytes,
            removals: Removals::default(),
        }
    }

    /// Applies an `image_update`: the file first, then the row that points at it.
    pub(crate) fn update(
        &self,
        image: ImageUpdate,
        message: &Context<'_>,
        store: &mut dyn Store,
    ) -> Result<(), HandlerError> {
        let (content_type, extension) = image
            .kind()
            .map(|(content_type, extension)| (content_type.to_owned(), extension))
            .map_err(HandlerError::permanent)?;
        // Refuse before decoding: base64 is 4 bytes for every 3.
        if image.data_base64.len() / 4 * 3 > self.max_image_bytes + 3 {
            return Err(self.too_large(image.data_base64.len() / 4 * 3));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(image.data_base64.as_bytes())
            .map_err(|err| {
                HandlerError::permanent(format!("data_base64 is not valid base64: {err}"))
            })?;
        if bytes.len() > self.max_image_bytes {
            return Err(self.too_large(bytes.len()));
        }
        let actual = sha256_hex(&bytes);
        if let Some(sent) = &image.sha256
            && *sent.to_ascii_lowercase() != actual
        {
            return Err(HandlerError::permanent(format!(
                "sha256 mismatch: the message says {sent}, the data hashes to {actual}"
            )));
        }
        let order = message.order();
        let decision = IMAGES.decide(store, &image.product_id, order)?;
        if decision == possync_sdk::Decision::Stale {
            return Ok(());
        }
        let path = self.images_dir.join(format!("{actual}.{extension}"));
        let path_text = path.to_string_lossy().into_owned();
        self.removals.keep(store, &path_text);
        // Named by content: if the file is there, it holds these bytes.
        if !path.exists() {
            let written = path_text.clone();
            store.on_rollback(Box::new(move || files::remove_file(&written)));
            files::write_atomically(&path, &bytes)?;
        }
        let old = current_path(store, &image.product_id)?;
        store.execute(
            "INSERT INTO product_images (product_id, path, sha256, content_type, sync_version) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (product_id) DO UPDATE SET path = excluded.path, sha256 = excluded.sha256,
                 content_type = excluded.content_type, sync_version = excluded.sync_version",
            &[
                image.product_id.as_str().into(),
                path_text.as_str().into(),
                actual.into(),
                content_type.into(),
                Version::column(order),
            ],
        )?;
        IMAGES.revive(store, &image.product_id, decision)?;
        if let Some(old) = old.filter(|old| *old != path_text) {
            self.remove_if_unused(store, old)?;
        }
        Ok(())
    }

    /// Applies an `image_delete`: the row goes now, the file after the commit.
    pub(crate) fn delete(
        &self,
        delete: ImageDelete,
        message: &Context<'_>,
        store: &mut dyn Store,
    ) -> Result<(), HandlerError> {
        if !IMAGES.is_newer(store, &delete.product_id, message.order())? {
            return Ok(());
        }
        let old = current_path(store, &delete.product_id)?;
        IMAGES.delete(store, &delete.product_id, message.order())?;
        if let Some(old) = old {
            self.remove_if_unused(store, old)?;
        }
        Ok(())
    }

    /// Removes an image file no product refers to any more (two products
    /// may share one picture, and so one file), once the commit is done.
    fn remove_if_unused(&self, store: &mut dyn Store, path: String) -> Result<(), HandlerError> {
        let used = store.query_row(
            "SELECT 1 FROM product_images WHERE path = ?1 LIMIT 1",
            &[path.as_str().into()],
        )?;
        if used.is_none() {
            self.removals.schedule(store, path);
        }
        Ok(())
    }

    fn too_large(&self, size: usize) -> HandlerError {
        HandlerError::permanent(format!(
            "image is {size} bytes, over the limit of {} (settings.max_image_bytes)",
            self.max_image_bytes
        ))
    }
}

fn current_path(store: &mut dyn Store, product_id: &str) -> Result<Option<String>, HandlerError> {
    let row = store.query_row(
        "SELECT path FROM product_images WHERE product_id = ?1",
        &[product_id.into()],
    )?;
    Ok(row
        .and_then(|r| r.into_iter().next())
        .and_then(|v| match v {
            Value::Text(path) => Some(path),
            _ => None,
        }))
}
