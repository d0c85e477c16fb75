//! Mounting an overlay stack: `lowers` (top first), an upper and a work directory, at a
//! target directory.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::error::{Error, Result};

/// Deepest stack of lower layers a branch may have; deeper chains are flattened first.
/// (The mount options must fit in one page, and each layer costs every lookup a step.)
pub const MAX_LOWERS: usize = 32;

/// An overlay stack to mount.
#[derive(Clone, Debug)]
pub struct Stack {
    /// Read-only layers, the topmost first.
    pub lowers: Vec<PathBuf>,
    /// Where the branch's changes go.
    pub upper: PathBuf,
    /// overlayfs's scratch directory (same filesystem as `upper`, empty).
    pub work: PathBuf,
}

fn checked(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .ok_or_else(|| Error::Layer(format!("{}: not UTF-8", p.display())))?;
    if s.contains([',', ':', '\\']) || !p.is_absolute() {
        return Err(Error::Layer(format!(
            "{s}: overlay paths must be absolute and contain no ',', ':' or '\\'"
        )));
    }
    Ok(s.to_string())
}

impl Stack {
    /// The overlayfs mount options for this stack.
    pub fn options(&self) -> Result<String> {
        if self.lowers.is_empty() || self.lowers.len() > MAX_LOWERS {
            return Err(Error::Layer(format!(
                "an overlay needs 1 to {MAX_LOWERS} lower layers, not {}",
                self.lowers.len()
            )));
        }
        let lowers: Vec<String> = self
            .lowers
            .iter()
            .map(|p| checked(p))
            .collect::<Result<_>>()?;
        // Explicitly off, whatever the host's module parameters say: snapshots, diffs and
        // commits read upper directories as holding whole files (no metacopy) and whole
        // renamed directories (no redirect_dir).
        Ok(format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
            lowers.join(":"),
            checked(&self.upper)?,
            checked(&self.work)?
        ))
    }

    /// Mounts the stack at `target` (in the caller's mount namespace).
    pub fn mount(&self, target: &Path) -> Result<()> {
        let options = self.options()?;
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            // Device nodes in a branch's files open nothing.
            MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(|e| {
            Error::Layer(format!(
                "mounting overlay at {}: {e} ({options})",
                target.display()
            ))
        })
    }
}

/// Unmounts the overlay at `target`.
pub fn unmount(target: &Path) -> Result<()> {
    umount2(target, MntFlags::empty())
        .map_err(|e| Error::Layer(format!("unmounting {}: {e}", target.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_list_lowers_top_first_and_refuse_bad_paths() {
        let s = Stack {
            lowers: vec!["/l/2".into(), "/l/1".into()],
            upper: "/b/upper".into(),
            work: "/b/work".into(),
        };
        assert_eq!(
            s.options().unwrap(),
            "lowerdir=/l/2:/l/1,upperdir=/b/upper,workdir=/b/work,redirect_dir=off,metacopy=off,index=off"
        );
        let bad = Stack {
            lowers: vec!["/a:b".into()],
            ..s.clone()
        };
        assert!(bad.options().unwrap_err().to_string().contains("no ','"));
        let none = Stack {
            lowers: vec![],
            ..s
        };
        assert!(none.options().is_err());
    }
}
