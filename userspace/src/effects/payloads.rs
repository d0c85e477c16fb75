//! Large recorded payloads, kept as files next to the journal (`<state>/effects/NAME.bin`)
//! instead of in SQLite: a request body goes to the page cache once, not to SQLite's WAL
//! and then again to its database file by a checkpoint (which made the recording proxy run
//! at a sixth of a direct connection's speed), and the proxy writes it as it arrives
//! ([`PayloadFile`]), so writing overlaps receiving. Small payloads stay in the rows.
//!
//! A payload file is written before the row that names it: a daemon killed in between
//! leaves a file no row names, removed when the journal is opened again.

use std::{
    collections::HashSet,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::error::{IoContext, Result};

/// Payloads larger than this go to files.
pub const INLINE_MAX: usize = 64 * 1024;

/// The directory of payload files.
pub struct PayloadDir {
    dir: PathBuf,
    next: AtomicU64,
}

/// A payload file being written; removed if dropped before [`PayloadFile::finish`].
pub struct PayloadFile {
    dir: Arc<PayloadDir>,
    pub name: String,
    file: Option<std::fs::File>,
    pub len: u64,
}

impl PayloadFile {
    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let path = self.dir.path(&self.name);
        let f = self.file.as_mut().expect("open until finished");
        f.write_all(bytes).at(&path)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Closes the file; the caller records its name next.
    pub fn finish(mut self) -> Result<(String, u64)> {
        drop(self.file.take());
        Ok((std::mem::take(&mut self.name), self.len))
    }
}

impl Drop for PayloadFile {
    fn drop(&mut self) {
        if !self.name.is_empty() {
            self.dir.remove(&self.name);
        }
    }
}

impl PayloadDir {
    /// Opens (creating) `<state>/effects`.
    pub fn open(state: &Path) -> Result<PayloadDir> {
        let dir = state.join("effects");
        std::fs::create_dir_all(&dir).at(&dir)?;
        Ok(PayloadDir {
            dir,
            next: AtomicU64::new(0),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.bin"))
    }

    /// A new, empty payload file.
    pub fn create(self: &Arc<Self>) -> Result<PayloadFile> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!("{now:x}-{}", self.next.fetch_add(1, Ordering::Relaxed));
        let path = self.path(&name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .at(&path)?;
        Ok(PayloadFile {
            dir: self.clone(),
            name,
            file: Some(file),
            len: 0,
        })
    }

    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.path(name);
        std::fs::read(&path).at(&path)
    }

    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.path(name));
    }

    /// Removes the files no row names (`named`): a daemon killed between a file and its row.
    pub fn sweep(&self, named: &HashSet<String>) -> usize {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let name = file.strip_suffix(".bin").unwrap_or(&file);
            if !named.contains(name) && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}
