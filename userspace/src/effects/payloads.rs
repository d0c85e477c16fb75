//! Large recorded payloads, kept in segment files next to the journal
//! (`<state>/effects/NAME.bin`) instead of in SQLite: a request body goes to the page cache
//! once, not to SQLite's WAL and then again to its database file by a checkpoint, and the
//! proxy writes it as it arrives ([`PayloadFile`]). Small payloads stay in the rows.
//!
//! Payloads are appended to the current segment (a new one every [`SEGMENT_BYTES`]) rather
//! than given a file each: on ext4, creating a file (an inode-bitmap search that skips
//! recently deleted inodes) cost more than writing a MiB into it, and it was the recording
//! proxy's largest cost. A payload's row names its segment, offset and length
//! ([`Location`]). A payload is written before the row that names it; a released payload's
//! range is punched out of its segment (its disk space freed), and a segment that holds no
//! payload any more is removed, so nothing is left once no effect is held. A daemon killed
//! between a payload and its row leaves bytes no row names: their segment goes when its
//! other payloads do, or when the journal is opened again if it holds none.

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::error::{Error, IoContext, Result};

/// Payloads larger than this go to segment files.
pub const INLINE_MAX: usize = 64 * 1024;
/// A new segment is started when the current one would grow past this.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Disk space allocated ahead of the payloads in the current segment: writing into
/// allocated blocks skips ext4's per-block delayed-allocation bookkeeping (150 instead of
/// 210 us per MiB here).
const ALLOCATE_AHEAD: u64 = 8 << 20;

/// Where a payload is: its segment, offset and length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub segment: String,
    pub offset: u64,
    pub len: u64,
}

/// The directory of segment files.
pub struct PayloadDir {
    dir: PathBuf,
    next: AtomicU64,
    segments: Mutex<Segments>,
}

#[derive(Default)]
struct Segments {
    /// The segment new payloads are appended to.
    current: Option<Current>,
    /// Per segment: the payloads in it, recorded or being written. At 0 it is removed.
    users: HashMap<String, usize>,
}

struct Current {
    name: String,
    file: Arc<File>,
    /// Where the next payload goes.
    end: u64,
    /// Bytes allocated on disk from the start (see [`ALLOCATE_AHEAD`]).
    allocated: u64,
}

/// A payload being written, in a range of a segment reserved for it; its range is punched
/// out if it is dropped before [`PayloadFile::recorded`].
pub struct PayloadFile {
    dir: Arc<PayloadDir>,
    file: Arc<File>,
    segment: String,
    offset: u64,
    reserved: u64,
    len: u64,
    recorded: bool,
}

impl PayloadFile {
    /// Appends `bytes` (at most the length reserved at [`PayloadDir::create`]).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if self.len + bytes.len() as u64 > self.reserved {
            return Err(Error::Invalid(format!(
                "payload longer than the {} bytes announced",
                self.reserved
            )));
        }
        // (The path only for an error: this runs for every chunk of a request.)
        self.file
            .write_all_at(bytes, self.offset + self.len)
            .map_err(|cause| Error::Io {
                path: self.dir.path(&self.segment),
                cause,
            })?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Where the bytes written so far are.
    pub fn location(&self) -> Location {
        Location {
            segment: self.segment.clone(),
            offset: self.offset,
            len: self.len,
        }
    }

    /// The payload's row is written: from now on [`PayloadDir::release`] frees it.
    pub fn recorded(mut self) {
        self.recorded = true;
    }
}

impl Drop for PayloadFile {
    fn drop(&mut self) {
        if !self.recorded {
            self.dir
                .free(&self.segment, Some(&self.file), self.offset, self.reserved);
        }
    }
}

impl PayloadDir {
    /// Opens (creating) `<state>/effects`; `named` counts the payloads each segment holds
    /// according to the journal. Segments no payload is in are removed (see the module
    /// doc); returns the directory and how many were.
    pub fn open(state: &Path, named: HashMap<String, usize>) -> Result<(PayloadDir, usize)> {
        let dir = state.join("effects");
        std::fs::create_dir_all(&dir).at(&dir)?;
        let mut removed = 0;
        for entry in std::fs::read_dir(&dir).at(&dir)?.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let name = file.strip_suffix(".bin").unwrap_or(&file);
            if !named.contains_key(name) && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        let segments = Segments {
            current: None,
            users: named,
        };
        Ok((
            PayloadDir {
                dir,
                next: AtomicU64::new(0),
                segments: Mutex::new(segments),
            },
            removed,
        ))
    }

    fn path(&self, segment: &str) -> PathBuf {
        self.dir.join(format!("{segment}.bin"))
    }

    fn segments(&self) -> std::sync::MutexGuard<'_, Segments> {
        self.segments.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Room for a payload of `len` bytes at the end of the current segment (a new one if it
    /// would grow past [`SEGMENT_BYTES`]).
    pub fn create(self: &Arc<Self>, len: u64) -> Result<PayloadFile> {
        let mut s = self.segments();
        let full = s
            .current
            .as_ref()
            .is_none_or(|c| c.end > 0 && c.end + len > SEGMENT_BYTES);
        if full {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let name = format!("{now:x}-{}", self.next.fetch_add(1, Ordering::Relaxed));
            let path = self.path(&name);
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .at(&path)?;
            s.current = Some(Current {
                name,
                file: Arc::new(file),
                end: 0,
                allocated: 0,
            });
        }
        let c = s.current.as_mut().expect("made just above");
        let (segment, file, offset) = (c.name.clone(), c.file.clone(), c.end);
        c.end += len;
        if c.end > c.allocated {
            let more = (c.end - c.allocated).max(ALLOCATE_AHEAD);
            // Best effort: without it (a file system that cannot, a full disk), writes
            // allocate as they go, and fail with a clear error if the disk is full.
            let _ = nix::fcntl::fallocate(
                &*c.file,
                nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                c.allocated as i64,
                more as i64,
            );
            c.allocated += more;
        }
        *s.users.entry(segment.clone()).or_default() += 1;
        Ok(PayloadFile {
            dir: self.clone(),
            file,
            segment,
            offset,
            reserved: len,
            len: 0,
            recorded: false,
        })
    }

    /// The bytes at `at`.
    pub fn read(&self, at: &Location) -> Result<Vec<u8>> {
        let path = self.path(&at.segment);
        let file = File::open(&path).at(&path)?;
        let mut bytes = vec![0; at.len as usize];
        file.read_exact_at(&mut bytes, at.offset).at(&path)?;
        Ok(bytes)
    }

    /// Frees a recorded payload (its row is gone).
    pub fn release(&self, at: &Location) {
        let path = self.path(&at.segment);
        let file = File::options().write(true).open(&path);
        self.free(&at.segment, file.as_ref().ok(), at.offset, at.len);
    }

    /// Punches `len` bytes at `offset` out of `segment` (through `file`, when it could be
    /// opened) and removes the segment if no payload is left in it.
    fn free(&self, segment: &str, file: Option<&File>, offset: u64, len: u64) {
        use nix::fcntl::{FallocateFlags, fallocate};
        // Best effort: a file system that cannot punch holes frees the space with the segment.
        if let Some(file) = file {
            let _ = fallocate(
                file,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            );
        }
        let mut s = self.segments();
        let left = match s.users.get_mut(segment) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left == 0 {
            s.users.remove(segment);
            if s.current.as_ref().is_some_and(|c| c.name == segment) {
                s.current = None;
            }
            let _ = std::fs::remove_file(self.path(segment));
        }
    }
}
