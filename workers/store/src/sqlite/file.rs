//! The SQLite database file a process opened, and whether it is still the file at its path.
//!
//! A process keeps working on a database file that was deleted or replaced under it (its
//! connections hold the old inode open): its writes would be acknowledged and then lost, and a
//! restarted process would open another, empty file beside it (attack round 7: a split brain,
//! then every write gone after a restart). So the first connection notes the file's identity
//! (device and inode), and every store operation checks, before and after it runs, that the
//! path still names that file; when it does not, the operation fails as unavailable, the
//! worker's store probe fails with it and the worker leaves rotation, and the operator is told
//! what to do.

use crate::StoreError;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The database file at `path`, with the identity it had when this process first opened it.
pub struct DatabaseFile {
    path: PathBuf,
    opened: Mutex<Option<(u64, u64)>>,
}

impl DatabaseFile {
    pub fn new(path: PathBuf) -> DatabaseFile {
        DatabaseFile {
            path,
            opened: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The (device, inode) now at the path, `None` when nothing is there.
    fn identity(&self) -> Result<Option<(u64, u64)>, StoreError> {
        match std::fs::metadata(&self.path) {
            Ok(meta) => Ok(Some((meta.dev(), meta.ino()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Unavailable(format!(
                "cannot read {}: {e}",
                self.path.display()
            ))),
        }
    }

    /// After a connection opened the path: the first one records the file, later ones must
    /// have opened the same file.
    pub fn opened(&self) -> Result<(), StoreError> {
        let now = self.identity()?;
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        match (*opened, now) {
            (None, Some(found)) => {
                *opened = Some(found);
                Ok(())
            }
            (Some(first), Some(found)) if first == found => Ok(()),
            _ => Err(self.gone()),
        }
    }

    /// Whether the path still names the file this process opened (before anything was opened,
    /// there is nothing to check).
    pub fn check(&self) -> Result<(), StoreError> {
        let opened = *self.opened.lock().unwrap_or_else(|e| e.into_inner());
        match opened {
            None => Ok(()),
            Some(first) if self.identity()? == Some(first) => Ok(()),
            Some(_) => Err(self.gone()),
        }
    }

    fn gone(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "the SQLite database {} was deleted or replaced while this worker had it open, so \
             what it wrote since would be lost: it writes nothing more. Put the file back, or \
             restart firemode to use the file now at that path (README: Backup and restore)",
            self.path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_or_replaced_file_is_noticed() {
        let dir = std::env::temp_dir().join(format!("firemode-dbfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let path = dir.join("db");
        std::fs::write(&path, "x").expect("a file");
        let file = DatabaseFile::new(path.clone());
        assert!(file.check().is_ok(), "nothing opened yet");
        file.opened().expect("the first open records the file");
        file.check().expect("still the same file");
        file.opened().expect("a second connection to the same file");
        // Held open, as the pool's connections hold it (so its inode is not reused).
        let _held = std::fs::File::open(&path).expect("open");
        std::fs::remove_file(&path).expect("delete");
        assert!(file.check().is_err(), "deleted");
        std::fs::write(&path, "y").expect("a new file at the path");
        assert!(file.check().is_err(), "replaced");
        assert!(file.opened().is_err(), "a connection to the new file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
