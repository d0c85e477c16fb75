//! Planning a commit: the branch's changes since its previous commit as operations on the
//! target, and the paths the target changed too (conflicts).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{CommitState, Prefer, target::Target};
use crate::{
    error::{Error, IoContext, Result},
    layers::{
        diff::{Change, ChangeKind, visible_below},
        scan::{EntryKind, scan},
    },
};

/// One step of applying a commit to the target. Each is idempotent, so a journal of them can
/// be replayed after a crash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Removes the target's entry (a whole tree for a directory) if it is still inode `ino`.
    Remove { path: PathBuf, ino: u64 },
    /// Creates a directory if there is none.
    Mkdir { path: PathBuf },
    /// Renames the staged entry `staged` over `path`; done once `staged` is gone.
    Install { path: PathBuf, staged: String },
    /// Sets a directory's mode and owner, and its times when it is new.
    Attrs {
        path: PathBuf,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: Option<(i64, i64)>,
    },
}

impl Op {
    pub fn path(&self) -> &Path {
        match self {
            Op::Remove { path, .. }
            | Op::Mkdir { path }
            | Op::Install { path, .. }
            | Op::Attrs { path, .. } => path,
        }
    }
}

/// An entry of the branch to copy into the staging directory before the journal is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub src: PathBuf,
    pub staged: String,
    pub kind: EntryKind,
}

/// A planned commit.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// In the order they apply: removals, new directories, installs, directory attributes
    /// (deepest first).
    pub ops: Vec<Op>,
    pub stage: Vec<Stage>,
    /// What the commit changes, as `diff` would show it.
    pub changes: Vec<Change>,
    /// Paths changed on both sides (what `Prefer` decided about).
    pub conflicts: Vec<PathBuf>,
    /// The branch's upper directory as the commit saw it (its next base).
    pub manifest: BTreeMap<PathBuf, (EntryKind, i128)>,
    /// The coarse clock reading taken before that scan.
    pub scan_ns: i128,
}

/// Plans committing the branch whose upper directory is `upper` (and lower layers `lowers`,
/// topmost first) into `target`. Fails with [`Error::Conflicts`] when both sides changed a
/// path and `prefer` is [`Prefer::None`].
pub fn plan(
    upper: &Path,
    lowers: &[PathBuf],
    state: &CommitState,
    target: &Target,
    prefer: Prefer,
) -> Result<Plan> {
    let scan_ns = crate::layers::snapshot::snapshot_clock_ns();
    let entries = scan(upper)?;
    let manifest: BTreeMap<PathBuf, (EntryKind, i128)> = entries
        .iter()
        .map(|e| (e.path.clone(), (e.kind, e.ctime_ns)))
        .collect();
    let root = target.root();
    // (A path under a symbolic link in the target is not in the workspace: not there.)
    let exists = |rel: &Path| super::within(root, rel).and_then(|p| fs::symlink_metadata(p).ok());

    let mut removes: Vec<(PathBuf, u64, bool)> = Vec::new(); // path, ino, was a directory
    let mut mkdirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut installs: Vec<(PathBuf, EntryKind)> = Vec::new();
    let mut attrs: Vec<Op> = Vec::new();
    let mut changes = Vec::new();
    let remove = |rel: &Path, removes: &mut Vec<(PathBuf, u64, bool)>| {
        if let Some(m) = exists(rel) {
            removes.push((rel.to_path_buf(), m.ino(), m.is_dir()));
        }
    };

    // Entries the previous commit saw that are gone: the branch removed them since.
    for gone in state.manifest.keys().filter(|p| !manifest.contains_key(*p)) {
        let parent_gone = gone
            .ancestors()
            .skip(1)
            .any(|a| state.manifest.contains_key(a) && !manifest.contains_key(a));
        if !parent_gone && exists(gone).is_some() {
            remove(gone, &mut removes);
            changes.push(Change::new(gone.clone(), ChangeKind::Deleted));
        }
    }
    for e in &entries {
        if state.manifest.get(&e.path) == Some(&(e.kind, e.ctime_ns)) {
            continue; // committed already and unchanged since
        }
        let src = upper.join(&e.path);
        let there = exists(&e.path);
        let below = visible_below(lowers, &e.path);
        match e.kind {
            EntryKind::Whiteout => {
                if there.is_some() {
                    remove(&e.path, &mut removes);
                    changes.push(Change::new(e.path.clone(), ChangeKind::Deleted));
                }
            }
            EntryKind::Dir { opaque } => {
                let newly_opaque = opaque
                    && state.manifest.get(&e.path).map(|(k, _)| *k)
                        != Some(EntryKind::Dir { opaque: true });
                let meta = fs::symlink_metadata(&src).at(&src)?;
                let replace = there.as_ref().is_some_and(|m| newly_opaque || !m.is_dir());
                if replace {
                    remove(&e.path, &mut removes);
                }
                let new_dir = replace || there.is_none();
                let attrs_changed = match &there {
                    Some(t) if !replace => {
                        (t.mode(), t.uid(), t.gid()) != (meta.mode(), meta.uid(), meta.gid())
                            && below.is_none_or(|_| differs_below(lowers, &e.path, &meta))
                    }
                    _ => true,
                };
                if new_dir {
                    mkdirs.insert(e.path.clone());
                    changes.push(Change::new(
                        e.path.clone(),
                        if replace {
                            ChangeKind::Replaced
                        } else {
                            ChangeKind::Added
                        },
                    ));
                } else if attrs_changed {
                    changes.push(Change::new(e.path.clone(), ChangeKind::Modified));
                }
                if new_dir || attrs_changed {
                    attrs.push(Op::Attrs {
                        path: e.path.clone(),
                        mode: meta.mode() & 0o7777,
                        uid: meta.uid(),
                        gid: meta.gid(),
                        mtime: new_dir.then(|| (meta.mtime(), meta.mtime_nsec())),
                    });
                }
            }
            kind => {
                if there.as_ref().is_some_and(|m| m.is_dir()) {
                    remove(&e.path, &mut removes);
                }
                installs.push((e.path.clone(), kind));
                changes.push(Change::new(
                    e.path.clone(),
                    if below.is_some() || there.is_some() {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::Added
                    },
                ));
            }
        }
    }
    // A directory the target lost, replaced or never had above something the commit writes
    // is created again, with the branch's attributes.
    let written: Vec<PathBuf> = installs
        .iter()
        .map(|(p, _)| p.clone())
        .chain(mkdirs.iter().cloned())
        .collect();
    for p in &written {
        for a in p.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()) {
            let there = exists(a);
            if there.as_ref().is_some_and(|m| !m.is_dir()) && !removes.iter().any(|r| r.0 == a) {
                remove(a, &mut removes);
            }
            let missing = removes.iter().any(|r| r.0 == a) || there.is_none();
            if missing && mkdirs.insert(a.to_path_buf()) {
                let src = upper.join(a);
                let meta = fs::symlink_metadata(&src).at(&src)?;
                attrs.push(Op::Attrs {
                    path: a.to_path_buf(),
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    mtime: None,
                });
            }
        }
    }

    let conflicts = conflicts(target, state, &removes, &mkdirs, &installs, &attrs);
    if !conflicts.is_empty() && prefer == Prefer::None {
        return Err(Error::Conflicts {
            target: target.describe(),
            paths: conflicts,
        });
    }
    let dropped = |p: &Path| prefer == Prefer::Target && conflicts.iter().any(|c| p.starts_with(c));

    let mut plan = Plan {
        manifest,
        scan_ns,
        conflicts: conflicts.clone(),
        ..Default::default()
    };
    // Removals: outermost first, nothing below one already removed.
    removes.sort_by(|a, b| a.0.cmp(&b.0));
    let mut removed_dirs: Vec<PathBuf> = Vec::new();
    for (path, ino, is_dir) in removes {
        if dropped(&path) || removed_dirs.iter().any(|d| path.starts_with(d)) {
            continue;
        }
        if is_dir {
            removed_dirs.push(path.clone());
        }
        plan.ops.push(Op::Remove { path, ino });
    }
    for path in mkdirs.into_iter().filter(|p| !dropped(p)) {
        plan.ops.push(Op::Mkdir { path });
    }
    for (n, (path, kind)) in installs.into_iter().enumerate() {
        if dropped(&path) {
            continue;
        }
        let staged = n.to_string();
        plan.stage.push(Stage {
            src: upper.join(&path),
            staged: staged.clone(),
            kind,
        });
        plan.ops.push(Op::Install { path, staged });
    }
    attrs.sort_by(|a, b| b.path().cmp(a.path()));
    plan.ops
        .extend(attrs.into_iter().filter(|op| !dropped(op.path())));
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    changes.retain(|c| !dropped(&c.path));
    plan.changes = changes;
    Ok(plan)
}

/// Whether a directory's mode or owner differs from what the branch's lower layers show.
fn differs_below(lowers: &[PathBuf], rel: &Path, meta: &fs::Metadata) -> bool {
    lowers
        .iter()
        .find_map(|l| fs::symlink_metadata(l.join(rel)).ok())
        .is_none_or(|t| (t.mode(), t.uid(), t.gid()) != (meta.mode(), meta.uid(), meta.gid()))
}

/// The paths the commit writes that the target changed too since the fork point: the path
/// itself, a directory above it, or (for a directory the commit removes) anything below.
fn conflicts(
    target: &Target,
    state: &CommitState,
    removes: &[(PathBuf, u64, bool)],
    mkdirs: &BTreeSet<PathBuf>,
    installs: &[(PathBuf, EntryKind)],
    attrs: &[Op],
) -> Vec<PathBuf> {
    let mut cache: HashMap<PathBuf, bool> = HashMap::new();
    let mut changed = |p: &Path| -> bool {
        *cache
            .entry(p.to_path_buf())
            .or_insert_with(|| target.changed(p, &state.ours))
    };
    let mut out = BTreeSet::new();
    let paths = removes
        .iter()
        .map(|(p, _, _)| p)
        .chain(mkdirs.iter())
        .chain(installs.iter().map(|(p, _)| p))
        .chain(attrs.iter().map(|op| match op {
            Op::Attrs { path, .. } => path,
            _ => unreachable!("attrs holds Attrs only"),
        }));
    for p in paths {
        // A directory the branch only created or re-created on its side is not a conflict
        // with the same directory on the target's side; a file is.
        let is_new_dir = mkdirs.contains(p) && !removes.iter().any(|(r, _, _)| r == p);
        let here = !is_new_dir && changed(p);
        let above = p
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .any(&mut changed);
        if here || above {
            out.insert(p.clone());
        }
    }
    for (p, _, is_dir) in removes {
        if *is_dir && !target.changed_under(p, &state.ours).is_empty() {
            out.insert(p.clone());
        }
    }
    out.into_iter().collect()
}
