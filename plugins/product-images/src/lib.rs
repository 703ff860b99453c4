//! Product-image sync, loaded by possync from a path in config:
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
//! An image is checked against its SHA-256, written under `images_dir` as
//! `<sha256>.<ext>` through a temporary file and a rename (so no reader ever
//! sees half an image), and recorded in
//! `product_images(product_id, path, sha256, content_type)`.
//!
//! Files follow the database: a new file is written before the commit (so a
//! committed row never points at a missing file) and removed again if the
//! writes roll back; a file no row refers to any more is removed only after
//! the commit.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use possync_product_images_types::{DEFAULT_MAX_IMAGE_BYTES, ImageDelete, ImageUpdate, sha256_hex};
use possync_sdk::host::{self, Level};
use possync_sdk::{
    Envelope, HandlerError, MessageHandler, Migration, Registrar, Store, Value, Version,
    WireMessage, async_trait,
};
use serde::Deserialize;

const MIGRATIONS: &[Migration] = &[Migration::new(
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
)];

/// `[plugins.product_images.settings]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Where image files go; created if missing.
    images_dir: PathBuf,
    /// Larger images are refused (dead-lettered), never written.
    #[serde(default = "default_max_image_bytes")]
    max_image_bytes: usize,
}

fn default_max_image_bytes() -> usize {
    DEFAULT_MAX_IMAGE_BYTES
}

/// Applies image messages.
#[derive(Debug)]
pub struct ProductImagesHandler {
    images_dir: PathBuf,
    max_image_bytes: usize,
    removals: Removals,
}

/// Files to remove once the transaction commits. A later message of the
/// same batch that refers to one again takes it off the list.
#[derive(Debug, Clone, Default)]
struct Removals(Arc<Mutex<HashSet<String>>>);

impl Removals {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // A panic while holding the lock leaves a plain set behind: still usable.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Removes `path` after the commit, unless something refers to it again by then.
    fn schedule(&self, store: &mut dyn Store, path: String) {
        if !self.set().insert(path.clone()) {
            return;
        }
        let undo = self.clone();
        let undone = path.clone();
        store.on_rollback(Box::new(move || {
            undo.set().remove(&undone);
        }));
        let removals = self.clone();
        store.after_commit(Box::new(move || {
            if removals.set().remove(&path) {
                remove_file(&path);
            }
        }));
    }

    /// `path` is referred to again: keep it.
    fn keep(&self, store: &mut dyn Store, path: &str) {
        if !self.set().remove(path) {
            return;
        }
        let redo = self.clone();
        let path = path.to_owned();
        store.on_rollback(Box::new(move || {
            redo.set().insert(path);
        }));
    }
}

#[async_trait]
impl MessageHandler for ProductImagesHandler {
    fn name(&self) -> &str {
        "product_images"
    }

    fn message_types(&self) -> &[&str] {
        &[ImageUpdate::TYPE, ImageDelete::TYPE]
    }

    fn description(&self) -> &str {
        "product pictures, written as files and recorded in product_images"
    }

    fn migrations(&self) -> &[Migration] {
        MIGRATIONS
    }

    async fn handle(&self, envelope: &Envelope, store: &mut dyn Store) -> Result<(), HandlerError> {
        let order = envelope.order();
        if envelope.message_type == ImageDelete::TYPE {
            let delete: ImageDelete = envelope.payload_as()?;
            if possync_sdk::is_newer(store, VERSION_QUERIES, &delete.product_id, order)? {
                let old = current_path(store, &delete.product_id)?;
                store.execute(
                    "DELETE FROM product_images WHERE product_id = ?1",
                    &[delete.product_id.as_str().into()],
                )?;
                store.execute(
                    "INSERT INTO product_image_tombstones (product_id, sync_version) VALUES (?1, ?2)
                     ON CONFLICT (product_id) DO UPDATE SET sync_version = max(sync_version, excluded.sync_version)",
                    &[delete.product_id.into(), Version::column(order)],
                )?;
                if let Some(old) = old {
                    self.remove_if_unused(store, old)?;
                }
            }
            return Ok(());
        }
        let image: ImageUpdate = envelope.payload_as()?;
        let extension = extension(&image.content_type)?;
        // Refuse before decoding: base64 is 4 bytes for every 3.
        if image.data_base64.len() / 4 * 3 > self.max_image_bytes + 3 {
            return Err(too_large(
                image.data_base64.len() / 4 * 3,
                self.max_image_bytes,
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(image.data_base64.as_bytes())
            .map_err(|err| {
                HandlerError::permanent(format!("data_base64 is not valid base64: {err}"))
            })?;
        if bytes.len() > self.max_image_bytes {
            return Err(too_large(bytes.len(), self.max_image_bytes));
        }
        let actual = sha256_hex(&bytes);
        if actual != image.sha256.to_ascii_lowercase() {
            return Err(HandlerError::permanent(format!(
                "sha256 mismatch: the message says {}, the data hashes to {actual}",
                image.sha256
            )));
        }
        if !possync_sdk::is_newer(store, VERSION_QUERIES, &image.product_id, order)? {
            return Ok(());
        }
        let path = self.images_dir.join(format!("{actual}.{extension}"));
        let path_text = path.to_string_lossy().into_owned();
        self.removals.keep(store, &path_text);
        // Named by content: if the file is there, it holds these bytes.
        if !path.exists() {
            let written = path_text.clone();
            store.on_rollback(Box::new(move || remove_file(&written)));
            write_atomically(&path, &bytes)?;
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
                image.content_type.into(),
                Version::column(order),
            ],
        )?;
        store.execute(
            "DELETE FROM product_image_tombstones WHERE product_id = ?1",
            &[image.product_id.into()],
        )?;
        if let Some(old) = old.filter(|old| *old != path_text) {
            self.remove_if_unused(store, old)?;
        }
        Ok(())
    }
}

impl ProductImagesHandler {
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
}

fn remove_file(path: &str) {
    if let Err(err) = fs::remove_file(path)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        host::log(
            Level::Warn,
            "product_images",
            &format!("could not remove unused image {path}: {err}"),
        );
    }
}

fn too_large(size: usize, limit: usize) -> HandlerError {
    HandlerError::permanent(format!(
        "image is {size} bytes, over the limit of {limit} (settings.max_image_bytes)"
    ))
}

fn extension(content_type: &str) -> Result<&'static str, HandlerError> {
    match content_type {
        "image/png" => Ok("png"),
        "image/jpeg" => Ok("jpg"),
        "image/webp" => Ok("webp"),
        "image/gif" => Ok("gif"),
        other => Err(HandlerError::permanent(format!(
            "content_type {other:?} is not an image type the POS shows (image/png, image/jpeg, image/webp, image/gif)"
        ))),
    }
}

/// Writes `bytes` to `path` so that readers see the old file or the whole
/// new one, never a part: a temporary file in the same folder, flushed to
/// disk, then renamed over the target.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), HandlerError> {
    // The images folder, not the message, is at fault: hold the batch.
    let failed = |err: std::io::Error| {
        HandlerError::storage(format!("cannot write {}: {err}", path.display()))
    };
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = File::create(&temporary).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(err) = written.and_then(|()| fs::rename(&temporary, path)) {
        let _ = fs::remove_file(&temporary);
        return Err(failed(err));
    }
    if let Some(folder) = path.parent() {
        // The rename itself must reach the disk before the commit that points at it.
        File::open(folder)
            .and_then(|dir| dir.sync_all())
            .map_err(failed)?;
    }
    Ok(())
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

/// Where a stored version is found: the row, then its tombstone.
const VERSION_QUERIES: &[&str] = &[
    "SELECT sync_version FROM product_images WHERE product_id = ?1",
    "SELECT sync_version FROM product_image_tombstones WHERE product_id = ?1",
];

fn register(registrar: &mut Registrar) -> Result<(), String> {
    let settings: Settings = registrar.settings()?;
    fs::create_dir_all(&settings.images_dir).map_err(|err| {
        format!(
            "cannot create images_dir {}: {err}",
            settings.images_dir.display()
        )
    })?;
    host::log(
        Level::Info,
        "product_images",
        &format!("images go to {}", settings.images_dir.display()),
    );
    registrar.register(ProductImagesHandler {
        images_dir: settings.images_dir,
        max_image_bytes: settings.max_image_bytes,
        removals: Removals::default(),
    });
    Ok(())
}

possync_sdk::declare_plugin!(register);
