//! A root branch's base layer: a tree of hard links to the workspace as it is at `run`.
//!
//! Overlayfs leaves it undefined what a mounted overlay shows when a lower layer changes, so
//! no mounted branch may stand directly on the host workspace, which a commit changes. The
//! base layer has its own directories, and its files are hard links to the workspace's
//! files: building it costs one link per entry, not a copy of the data. A commit never
//! writes a workspace file in place (it installs new files by rename and moves removed ones
//! away), so the base layer, and every branch standing on it, keeps seeing the workspace as
//! it was. What stays shared is the inode of a file nobody committed: a host program that
//! rewrites such a file in place is seen by the branches too (the commit's conflict check
//! notices it: the file's change time is then later than any the base layer was built
//! with).
//!
//! Hard links need the base layer on the workspace's filesystem; on another one the files are
//! copied (by reflink where the filesystem can).

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::{
    scan::{EntryKind, kind_of},
    snapshot::{copy_attrs, copy_entry_from, copy_owner},
};
use crate::error::{Error, IoContext, Result};

/// What building a base layer did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BaseStats {
    /// Entries linked.
    pub linked: u64,
    /// Entries copied (the base is on another filesystem).
    pub copied: u64,
    /// Directories created.
    pub dirs: u64,
    /// The latest status change time among the linked entries (linking changes it), read
    /// back from the files. Once [`build_base`] returns, the coarse clock is past it, so a
    /// later change of a shared file gives it a later change time.
    pub max_ctime_ns: i128,
    /// When the base is a copy (another filesystem): each copied entry's host inode and
    /// change time at the copy, the fork point a commit compares the host with.
    pub copied_from: std::collections::BTreeMap<PathBuf, (u64, i128)>,
}

/// Builds at `base` (created, must not exist) a tree mirroring `workspace`: directories
/// created with the same mode, owner and times, everything else hard-linked (copied when
/// `base` is on another filesystem).
pub fn build_base(workspace: &Path, base: &Path) -> Result<BaseStats> {
    let same_fs = {
        let parent = base.parent().unwrap_or(Path::new("/"));
        fs::metadata(parent).at(parent)?.dev() == fs::metadata(workspace).at(workspace)?.dev()
    };
    let mut stats = BaseStats::default();
    fs::create_dir(base).at(base)?;
    mirror(workspace, base, Path::new(""), same_fs, &mut stats)?;
    copy_attrs(workspace, base)?;
    // Filesystems without fine-grained timestamps stamp changes with the coarse clock: wait
    // (one tick at most) until it is past every change time read above.
    let start = std::time::Instant::now();
    while super::snapshot::snapshot_clock_ns() <= stats.max_ctime_ns
        && start.elapsed() < std::time::Duration::from_millis(100)
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(stats)
}

fn mirror(
    src_root: &Path,
    dst_root: &Path,
    rel: &Path,
    same_fs: bool,
    stats: &mut BaseStats,
) -> Result<()> {
    let dir = src_root.join(rel);
    for entry in fs::read_dir(&dir).at(&dir)? {
        let entry = entry.at(&dir)?;
        let path: PathBuf = rel.join(entry.file_name());
        let (src, dst) = (src_root.join(&path), dst_root.join(&path));
        let meta = fs::symlink_metadata(&src).at(&src)?;
        match kind_of(&src, &meta) {
            EntryKind::Dir { .. } => {
                fs::create_dir(&dst).at(&dst)?;
                stats.dirs += 1;
                mirror(src_root, dst_root, &path, same_fs, stats)?;
                copy_attrs(&src, &dst)?;
            }
            kind => {
                if same_fs {
                    link(&src, &dst)?;
                    // Reading the change time back also makes a multigrain filesystem give
                    // the file's next change a strictly later one.
                    let m = fs::symlink_metadata(&dst).at(&dst)?;
                    stats.max_ctime_ns = stats.max_ctime_ns.max(crate::commit::ctime_ns(&m));
                    stats.linked += 1;
                } else {
                    copy_entry_from(&src, &dst, kind)?;
                    copy_owner(&src, &dst)?;
                    stats
                        .copied_from
                        .insert(path.clone(), (meta.ino(), crate::commit::ctime_ns(&meta)));
                    stats.copied += 1;
                }
            }
        }
    }
    Ok(())
}

/// Hard-links `src` (not following a symlink) at `dst`.
fn link(src: &Path, dst: &Path) -> Result<()> {
    fs::hard_link(src, dst).map_err(|e| {
        Error::Layer(format!(
            "linking {} into the base layer at {}: {e}",
            src.display(),
            dst.display()
        ))
    })
}
