//! What a branch changed since its fork point: its upper directory read against the layers
//! below it.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::scan::{EntryKind, kind_of, scan};
use crate::error::Result;

/// How a path differs from the fork point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
    /// A file moved: deleted at `from`, added at `path` with the same content.
    Renamed,
    /// A directory deleted and created again: its old content is gone.
    Replaced,
}

/// One changed path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub path: PathBuf,
    pub kind: ChangeKind,
    /// Where a renamed file was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<PathBuf>,
}

impl Change {
    pub fn new(path: PathBuf, kind: ChangeKind) -> Self {
        Self {
            path,
            kind,
            from: None,
        }
    }
}

/// What `rel` is in the merged view of `lowers` (topmost first), if it is visible there.
pub fn visible_below(lowers: &[PathBuf], rel: &Path) -> Option<EntryKind> {
    for lower in lowers {
        let mut hidden_below = false;
        for a in rel
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
        {
            let p = lower.join(a);
            if let Ok(m) = fs::symlink_metadata(&p) {
                match kind_of(&p, &m) {
                    EntryKind::Dir { opaque: true } => hidden_below = true,
                    EntryKind::Dir { opaque: false } => {}
                    // A whiteout or a non-directory above `rel` hides it from here down.
                    _ => return None,
                }
            }
        }
        let p = lower.join(rel);
        if let Ok(m) = fs::symlink_metadata(&p) {
            return match kind_of(&p, &m) {
                EntryKind::Whiteout => None,
                k => Some(k),
            };
        }
        if hidden_below {
            return None;
        }
    }
    None
}

/// The changes recorded in `upper` relative to `lowers` (topmost first), in path order.
pub fn changes(upper: &Path, lowers: &[PathBuf]) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    for e in scan(upper)? {
        let below = visible_below(lowers, &e.path);
        let kind = match (e.kind, below) {
            (EntryKind::Whiteout, Some(_)) => ChangeKind::Deleted,
            (EntryKind::Whiteout, None) => continue,
            (EntryKind::Dir { opaque: true }, Some(_)) => ChangeKind::Replaced,
            (EntryKind::Dir { .. }, Some(EntryKind::Dir { .. })) => {
                // A directory that only holds changes is not a change itself, unless its
                // mode or owner changed.
                let here = fs::symlink_metadata(upper.join(&e.path))?;
                let there = lowers
                    .iter()
                    .find_map(|l| fs::symlink_metadata(l.join(&e.path)).ok());
                match there {
                    Some(t)
                        if (t.mode(), t.uid(), t.gid())
                            != (here.mode(), here.uid(), here.gid()) =>
                    {
                        ChangeKind::Modified
                    }
                    _ => continue,
                }
            }
            (_, Some(_)) => ChangeKind::Modified,
            (_, None) => ChangeKind::Added,
        };
        out.push(Change::new(e.path, kind));
    }
    pair_renames(upper, lowers, &mut out);
    Ok(out)
}

/// Overlayfs records a rename as a deletion and a new file; a deleted file and an added one
/// with the same content are shown as one rename.
fn pair_renames(upper: &Path, lowers: &[PathBuf], changes: &mut Vec<Change>) {
    let below = |rel: &Path| {
        lowers
            .iter()
            .map(|l| l.join(rel))
            .find(|p| fs::symlink_metadata(p).is_ok())
    };
    // Pairing compares contents: past this many candidate pairs, renames are not looked for
    // (they show as a deletion and an addition).
    const MAX_PAIRS: usize = 10_000;
    let added = changes
        .iter()
        .filter(|c| c.kind == ChangeKind::Added)
        .count();
    let deleted = changes
        .iter()
        .filter(|c| c.kind == ChangeKind::Deleted)
        .count();
    if added * deleted > MAX_PAIRS {
        return;
    }
    let mut used = vec![false; changes.len()];
    let mut renames = Vec::new();
    for (i, added) in changes.iter().enumerate() {
        if added.kind != ChangeKind::Added {
            continue;
        }
        let new = upper.join(&added.path);
        let Ok(nm) = fs::symlink_metadata(&new) else {
            continue;
        };
        if !nm.is_file() {
            continue;
        }
        for (j, deleted) in changes.iter().enumerate() {
            if used[j] || deleted.kind != ChangeKind::Deleted {
                continue;
            }
            let Some(old) = below(&deleted.path) else {
                continue;
            };
            let same = fs::symlink_metadata(&old)
                .is_ok_and(|om| om.is_file() && om.len() == nm.len())
                && fs::read(&old).ok() == fs::read(&new).ok();
            if same {
                used[i] = true;
                used[j] = true;
                renames.push(Change {
                    path: added.path.clone(),
                    kind: ChangeKind::Renamed,
                    from: Some(deleted.path.clone()),
                });
                break;
            }
        }
    }
    let mut n = 0;
    changes.retain(|_| {
        n += 1;
        !used[n - 1]
    });
    changes.extend(renames);
    changes.sort_by(|a, b| a.path.cmp(&b.path));
}
