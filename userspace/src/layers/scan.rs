//! Walking an overlay upper directory (or a layer): what each entry is, in overlayfs terms.

use std::{
    fs,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use crate::error::{IoContext, Result};

/// The xattr overlayfs sets on a directory that hides the same directory in lower layers.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What an entry of an upper directory means to overlayfs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EntryKind {
    /// A regular file (new, or a full copy-up of a lower file).
    File,
    /// A directory; `opaque` ones hide the same directory in the layers below.
    Dir {
        opaque: bool,
    },
    Symlink,
    /// A character device 0:0: the path is deleted in the merged view.
    Whiteout,
    /// A FIFO, socket or device node.
    Other,
}

/// One entry, with its path relative to the scanned root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub kind: EntryKind,
    /// Status change time in nanoseconds since the epoch (moves on every content, metadata,
    /// link or rename change, and cannot be set by the branch).
    pub ctime_ns: i128,
}

/// Whether `path` (a directory) carries the opaque xattr.
pub fn is_opaque(path: &Path) -> bool {
    super::xattr::get(path, OPAQUE_XATTR, false).as_deref() == Some(b"y")
}

/// The kind of the entry at `path` with metadata `meta` (from lstat).
pub fn kind_of(path: &Path, meta: &fs::Metadata) -> EntryKind {
    let ft = meta.file_type();
    if ft.is_file() {
        EntryKind::File
    } else if ft.is_dir() {
        EntryKind::Dir {
            opaque: is_opaque(path),
        }
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_char_device() && meta.rdev() == 0 {
        EntryKind::Whiteout
    } else {
        EntryKind::Other
    }
}

/// Every entry under `root`, parents before their children, in a stable (sorted) order.
pub fn scan(root: &Path) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out)?;
    Ok(out)
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<Entry>) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .at(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for name in names {
        let path = rel.join(&name);
        let full = root.join(&path);
        let meta = fs::symlink_metadata(&full).at(&full)?;
        let kind = kind_of(&full, &meta);
        let ctime_ns = meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128;
        out.push(Entry {
            path: path.clone(),
            kind,
            ctime_ns,
        });
        if let EntryKind::Dir { .. } = kind {
            walk(root, &path, out)?;
        }
    }
    Ok(())
}
