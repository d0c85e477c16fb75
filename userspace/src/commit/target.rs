//! What a commit writes into, and what changed there since the committing branch's fork
//! point.
//!
//! - [`Target::Host`]: a root branch commits into the host workspace. The fork point is the
//!   root's base layer: a path changed on the host if it differs from its hard link there
//!   (another inode, or a change time after the base was built).
//!   The change times compared are exact values read back from the files, never the clock:
//!   with multigrain timestamps a file's change time can be ahead of the coarse clock.
//! - [`Target::Branch`]: a child commits into its running parent's view, written through the
//!   parent's own overlay mount (`/proc/<init>/root/<workspace>`) and read from the parent's
//!   upper directory: a path changed there if its upper entry differs from what the fork's
//!   snapshot recorded (kind and change time), or is gone since.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use super::{Fingerprint, ctime_ns};
use crate::layers::scan::{EntryKind, kind_of, scan};

/// Paths a commit wrote, as it left them.
pub type Ours = BTreeMap<PathBuf, Option<Fingerprint>>;

/// What a branch commits into.
#[derive(Clone, Debug)]
pub enum Target {
    Host {
        dir: PathBuf,
        /// The root branch's base layer (the workspace as it was at `run`).
        base: PathBuf,
        /// The latest change time of anything linked into the base layer: a later change of
        /// a shared file has a later one (see [`crate::layers::base`]).
        base_ns: i128,
        /// For a base copied from another filesystem: each host entry's inode and change
        /// time when it was copied (empty for a base of hard links).
        copied_from: BTreeMap<PathBuf, (u64, i128)>,
    },
    Branch {
        name: String,
        /// The parent's workspace as its processes see it.
        view: PathBuf,
        /// The parent's upper directory.
        upper: PathBuf,
        /// When the parent was snapshotted for the fork.
        fork_ns: i128,
        /// The parent's upper directory at the fork: kinds and change times.
        fork_manifest: BTreeMap<PathBuf, (EntryKind, Option<i128>)>,
    },
}

impl Target {
    /// Where operations apply.
    pub fn root(&self) -> &Path {
        match self {
            Target::Host { dir, .. } => dir,
            Target::Branch { view, .. } => view,
        }
    }

    /// Where the fingerprints of applied paths are read.
    pub fn baseline(&self) -> &Path {
        match self {
            Target::Host { dir, .. } => dir,
            Target::Branch { upper, .. } => upper,
        }
    }

    /// For messages: `the host workspace /x` or `branch main`.
    pub fn describe(&self) -> String {
        match self {
            Target::Host { dir, .. } => format!("the host workspace {}", dir.display()),
            Target::Branch { name, .. } => format!("branch {name}"),
        }
    }

    fn base_path(&self, rel: &Path) -> PathBuf {
        match self {
            Target::Host { base, .. } => base.join(rel),
            Target::Branch { upper, .. } => upper.join(rel),
        }
    }

    /// Whether `rel` itself changed in the target since the fork point (directories count
    /// only when they appeared, disappeared, changed type or were replaced whole).
    pub fn changed(&self, rel: &Path, ours: &Ours) -> bool {
        let now = Fingerprint::of(&self.baseline().join(rel));
        if let Some(expected) = ours.get(rel) {
            return !Fingerprint::matches(expected, &now);
        }
        // Below a directory a commit removed or created, everything came from commits.
        let from_commits = rel
            .ancestors()
            .skip(1)
            .find_map(|a| ours.get(a))
            .is_some_and(|fp| fp.is_none_or(|f| f.fresh));
        if from_commits {
            return now.is_some();
        }
        match self {
            Target::Host {
                dir, copied_from, ..
            } if !copied_from.is_empty() => {
                let now = fs::symlink_metadata(dir.join(rel)).ok();
                match (now, copied_from.get(rel)) {
                    // Directories are not in the list: the base tells whether one was there.
                    (None, None) => fs::symlink_metadata(self.base_path(rel)).is_ok(),
                    (Some(n), None) => {
                        !n.is_dir() || fs::symlink_metadata(self.base_path(rel)).is_err()
                    }
                    (None, Some(_)) => true,
                    (Some(n), Some((ino, c))) => {
                        !n.is_dir()
                            && (std::os::unix::fs::MetadataExt::ino(&n) != *ino
                                || ctime_ns(&n) != *c)
                    }
                }
            }
            Target::Host {
                dir, base, base_ns, ..
            } => {
                let now = fs::symlink_metadata(dir.join(rel)).ok();
                let then = fs::symlink_metadata(base.join(rel)).ok();
                match (now, then) {
                    (None, None) => false,
                    (Some(_), None) | (None, Some(_)) => true,
                    (Some(n), Some(t)) => {
                        if n.is_dir() && t.is_dir() {
                            false
                        } else if n.file_type() != t.file_type() {
                            true
                        } else {
                            std::os::unix::fs::MetadataExt::ino(&n)
                                != std::os::unix::fs::MetadataExt::ino(&t)
                                || ctime_ns(&n) > *base_ns
                        }
                    }
                }
            }
            Target::Branch {
                upper,
                fork_ns,
                fork_manifest,
                ..
            } => {
                let p = upper.join(rel);
                match fs::symlink_metadata(&p) {
                    Err(_) => fork_manifest.contains_key(rel),
                    Ok(m) => match kind_of(&p, &m) {
                        EntryKind::Dir { opaque: false } => false,
                        EntryKind::Dir { opaque: true } => {
                            fork_manifest.get(rel).map(|(k, _)| *k)
                                != Some(EntryKind::Dir { opaque: true })
                        }
                        kind => match fork_manifest.get(rel) {
                            Some((k, Some(c))) => *k != kind || *c != ctime_ns(&m),
                            _ => ctime_ns(&m) >= *fork_ns,
                        },
                    },
                }
            }
        }
    }

    /// The paths below `rel` (not `rel` itself) that changed in the target since the fork
    /// point.
    pub fn changed_under(&self, rel: &Path, ours: &Ours) -> Vec<PathBuf> {
        let mut candidates: BTreeSet<PathBuf> = ours
            .keys()
            .filter(|p| p.starts_with(rel) && p.as_path() != rel)
            .cloned()
            .collect();
        let mut add_tree = |root: &Path| {
            if fs::symlink_metadata(root).is_ok_and(|m| m.is_dir()) {
                for e in scan(root).unwrap_or_default() {
                    candidates.insert(rel.join(e.path));
                }
            }
        };
        match self {
            Target::Host { dir, base, .. } => {
                add_tree(&dir.join(rel));
                add_tree(&base.join(rel));
            }
            Target::Branch {
                upper,
                fork_manifest,
                ..
            } => {
                add_tree(&upper.join(rel));
                candidates.extend(
                    fork_manifest
                        .keys()
                        .filter(|p| p.starts_with(rel) && p.as_path() != rel)
                        .cloned(),
                );
            }
        }
        candidates
            .into_iter()
            .filter(|p| self.changed(p, ours))
            .collect()
    }
}
