//! Image files, written and removed in step with the transaction.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use possync_sdk::log::{self, Level};
use possync_sdk::{HandlerError, Store};

/// Files to remove once the transaction commits. A later message of the
/// same batch that refers to one again takes it off the list.
#[derive(Debug, Clone, Default)]
pub(crate) struct Removals(Arc<Mutex<HashSet<String>>>);

impl Removals {
    fn set(&self) -> MutexGuard<'_, HashSet<String>> {
        // A panic while holding the lock leaves a plain set behind: still usable.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes `path` after the commit, unless something refers to it again by then.
    pub(crate) fn schedule(&self, store: &mut dyn Store, path: String) {
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
    pub(crate) fn keep(&self, store: &mut dyn Store, path: &str) {
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

/// Removes a file; one already gone is fine, any other failure is logged.
pub(crate) fn remove_file(path: &str) {
    if let Err(err) = fs::remove_file(path)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        log::log(
            Level::Warn,
            "product_images",
            &format!("could not remove unused image {path}: {err}"),
        );
    }
}

/// Writes `bytes` to `path` so that readers see the old file or the whole
/// new one, never a part: a temporary file in the same folder, flushed to
/// disk, then renamed over the target.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), HandlerError> {
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
