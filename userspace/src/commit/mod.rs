//! Commit: applying what a branch changed since its fork point (or its previous commit) to
//! its parent's view, three-way and crash-atomic.
//!
//! - [`target`]: what the branch commits into (the host workspace, or a running parent
//!   branch's view) and how to tell what changed there since the branch's fork point;
//! - [`plan`]: the branch's changes as operations, and the paths changed on both sides;
//! - [`journal`]: staging, the redo journal, applying, and finishing a commit a crash
//!   interrupted.
//!
//! The branch's changes are read from its upper directory: everything there whose change
//! time or kind differs from what the previous commit recorded ([`CommitState::manifest`]).
//! The target's changes are read against the fork point: for the host workspace, the root
//! branch's base layer (hard links to the workspace at `run`, see [`crate::layers::base`]);
//! for a parent branch, its upper directory's entries changed after the fork. Paths the
//! commit itself wrote are remembered ([`CommitState::ours`]) so they do not count as the
//! target's changes next time.

pub mod journal;
pub mod plan;
pub mod target;

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{IoContext, Result},
    layers::scan::EntryKind,
};

/// `root/rel`, if every directory on the way from `root` to it is a directory and not a
/// symbolic link (and `rel` names no `..`). The daemon walks commit targets as root, from
/// its own root directory: a link on the way (one a parent branch's processes made, whose
/// `/` is theirs, or one made on the host) would take the path out of the workspace.
pub fn within(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    let mut parts = rel.components().peekable();
    while let Some(part) = parts.next() {
        let std::path::Component::Normal(name) = part else {
            return None;
        };
        path.push(name);
        if parts.peek().is_some() && !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            return None;
        }
    }
    Some(path)
}

/// Who wins a path changed on both sides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefer {
    /// Refuse the commit and list the paths (the default).
    #[default]
    None,
    /// Apply the branch's version.
    Branch,
    /// Keep the target's version: the branch's change to that path is dropped.
    Target,
}

impl std::str::FromStr for Prefer {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "branch" => Ok(Prefer::Branch),
            "target" => Ok(Prefer::Target),
            _ => Err(format!("{s:?}: expected `branch` or `target`")),
        }
    }
}

/// Identity of a path as a commit left it in the target: enough to tell later whether
/// someone else changed it since.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub ino: u64,
    /// Status change time; not compared for directories (it moves when entries do).
    pub ctime_ns: i128,
    pub dir: bool,
    /// A directory the commit created: everything below it came from commits too.
    #[serde(default)]
    pub fresh: bool,
}

impl Fingerprint {
    /// The fingerprint of `path` now (`None`: it does not exist).
    pub fn of(path: &Path) -> Option<Fingerprint> {
        let m = fs::symlink_metadata(path).ok()?;
        Some(Fingerprint {
            ino: m.ino(),
            ctime_ns: ctime_ns(&m),
            dir: m.is_dir(),
            fresh: false,
        })
    }

    /// Whether `now` is still what the commit left.
    pub fn matches(expected: &Option<Fingerprint>, now: &Option<Fingerprint>) -> bool {
        match (expected, now) {
            (None, None) => true,
            (Some(e), Some(n)) => {
                e.ino == n.ino && e.dir == n.dir && (e.dir || e.ctime_ns == n.ctime_ns)
            }
            _ => false,
        }
    }
}

/// A file's status change time in nanoseconds.
pub fn ctime_ns(m: &fs::Metadata) -> i128 {
    m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128
}

/// What a branch's commits so far recorded (kept in `<branch dir>/commit-state.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitState {
    /// The branch's upper directory as of its last commit: path → (kind, change time).
    pub manifest: BTreeMap<PathBuf, (EntryKind, i128)>,
    /// Paths in the target as the commits left them (`None`: removed).
    pub ours: BTreeMap<PathBuf, Option<Fingerprint>>,
    /// Commits made so far.
    pub commits: u64,
    /// The clock when the last commit scanned the branch (kept for diagnosis).
    #[serde(default)]
    pub scan_ns: i128,
}

impl CommitState {
    pub fn file(branch_dir: &Path) -> PathBuf {
        branch_dir.join("commit-state.json")
    }

    /// Loads the state. Before the first commit it holds the files the fork copied for the
    /// clones ([`crate::procfork::open_copies::ForkCopies`]): as they were at the fork
    /// point, they are no change until the branch writes them.
    pub fn load(branch_dir: &Path) -> Result<Self> {
        let f = Self::file(branch_dir);
        match fs::read_to_string(&f) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| crate::Error::State(format!("{}: {e}", f.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self {
                manifest: crate::procfork::open_copies::ForkCopies::load(branch_dir)
                    .0
                    .into_iter()
                    .map(|(path, ctime)| (path, (EntryKind::File, ctime)))
                    .collect(),
                ..Self::default()
            }),
            Err(e) => Err(e).at(&f),
        }
    }

    /// Saves the state durably (write, fsync, rename, fsync the directory).
    pub fn save(&self, branch_dir: &Path) -> Result<()> {
        self.replace(branch_dir, true)?;
        sync_dir(branch_dir)
    }

    /// Writes the state (write, rename) without any sync: the caller makes it durable (a
    /// commit does with a `syncfs`, see [`journal`]).
    pub fn write(&self, branch_dir: &Path) -> Result<()> {
        self.replace(branch_dir, false)
    }

    /// Writes the state to a temporary file, fsynced if asked, and renames it into place.
    fn replace(&self, branch_dir: &Path, fsync: bool) -> Result<()> {
        use std::io::Write;
        let text = serde_json::to_string(self).map_err(std::io::Error::from)?;
        let path = Self::file(branch_dir);
        let tmp = path.with_extension("tmp");
        {
            let mut f = fs::File::create(&tmp).at(&tmp)?;
            f.write_all(text.as_bytes()).at(&tmp)?;
            if fsync {
                f.sync_all().at(&tmp)?;
            }
        }
        fs::rename(&tmp, &path).at(&path)
    }
}

/// The device of the filesystem holding `path` (`None`: it cannot be read).
pub fn device_of(path: &Path) -> Option<u64> {
    fs::metadata(path).map(|m| m.dev()).ok()
}

/// fsyncs a directory (so the entries created or renamed in it are durable).
pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Where a commit's time went, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitPhases {
    /// Freezing the branch (and a parent branch it commits into).
    pub freeze_us: u64,
    /// Reading both sides' changes and checking for conflicts.
    pub plan_us: u64,
    /// Copying the branch's files next to the target and making them durable.
    pub stage_us: u64,
    /// Writing the journal, applying it, making it durable.
    pub apply_us: u64,
    pub thaw_us: u64,
}
