//! Flattening: merging a chain of layers into one layer that shows the same files.
//!
//! Every fork can add a layer, and an overlay takes at most [`super::overlay::MAX_LOWERS`]
//! (each one also costs every lookup a step), so a fork whose chain has grown deep gets one
//! merged layer in place of the chain. Layers are immutable, so the merged layer hard-links
//! their files instead of copying them: the cost follows the number of entries in the
//! layers (which hold only what changed between forks), not the size of the files. The old
//! layers stay for the branches already mounted on them.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use super::{
    scan::{EntryKind, scan},
    snapshot::{copy_attrs, set_opaque, whiteout},
};
use crate::error::{IoContext, Result};

/// Writes into `dst` (created, must not exist) one layer equivalent to `layers` (topmost
/// first) stacked in that order. Whiteouts and opaque directories are kept, so the merged
/// layer still hides what the chain hid in the layers below it. Returns how many entries
/// the merged layer holds.
pub fn flatten(layers: &[PathBuf], dst: &Path) -> Result<u64> {
    fs::create_dir(dst).at(dst)?;
    // Directory attributes are set once at the end, from the topmost layer that has the
    // directory, after every entry inside has been written (which moves the mtime).
    let mut dir_attrs: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    for layer in layers.iter().rev() {
        for e in scan(layer)? {
            let (src, to) = (layer.join(&e.path), dst.join(&e.path));
            let existing = fs::symlink_metadata(&to).ok();
            match e.kind {
                EntryKind::Dir { opaque } => {
                    let is_dir = existing.as_ref().is_some_and(|m| m.is_dir());
                    if opaque || (existing.is_some() && !is_dir) {
                        // Hides everything below: what older layers put here, and (through
                        // the opaque mark) the layers under the merged one.
                        if existing.is_some() {
                            remove_any(&to)?;
                        }
                        fs::create_dir(&to).at(&to)?;
                        set_opaque(&to)?;
                    } else if !is_dir {
                        fs::create_dir(&to).at(&to)?;
                    }
                    dir_attrs.insert(e.path.clone(), src);
                }
                kind => {
                    if existing.is_some() {
                        remove_any(&to)?;
                    }
                    if kind == EntryKind::Whiteout {
                        whiteout(&to)?;
                    } else {
                        fs::hard_link(&src, &to).at(&to)?;
                    }
                }
            }
        }
    }
    let count = scan(dst)?.len() as u64;
    for (rel, src) in dir_attrs.iter().rev() {
        let to = dst.join(rel);
        if fs::symlink_metadata(&to).is_ok_and(|m| m.is_dir()) {
            copy_attrs(src, &to)?;
        }
    }
    if let Some(top) = layers.first() {
        copy_attrs(top, dst)?;
    }
    Ok(count)
}

fn remove_any(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).at(path)?;
    if meta.is_dir() {
        fs::remove_dir_all(path).at(path)
    } else {
        fs::remove_file(path).at(path)
    }
}
