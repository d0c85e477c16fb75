//! Files of the workspace or /tmp that a process to clone holds open for writing. The
//! child's copy of each is made in the child's upper directory before its overlay is mounted
//! (rather than by overlayfs's copy-up when the clone opens the file again), and marked with
//! the overlay origin of the inode the parent's view reports, so that the child's view
//! reports the same inode number. Programs that remember a file's inode number and compare
//! it with what its path has now go on in the clone as in the original: SQLite does so
//! before each write transaction, and fails the writes of a database whose number changed
//! with `SQLITE_READONLY_DBMOVED`.
//!
//! How: for an upper file whose `trusted.overlay.origin` xattr holds the file handle of an
//! inode with a single link, overlayfs reports that inode's number (its "constant inode
//! numbers across copy-up"). The parent's view of a file it opened for writing is its own
//! upper file (copied up from the base layer, whose hard links keep overlayfs from taking
//! their number), or, in a branch itself forked, such an origin. The child's copy gets a
//! handle of the first, or the second's xattr as it is. Whether the number held is checked
//! on the clone's descriptor ([`check`]); where it did not, the fork says so.

use std::{
    collections::HashSet,
    fs,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use nix::{errno::Errno, fcntl::OFlag, sys::stat::Mode};

use crate::{
    error::{Error, IoContext, Result},
    layers::{snapshot::copy_open_file, xattr},
};

/// The overlayfs xattr naming the inode an upper file was copied up from.
const ORIGIN_XATTR: &str = "trusted.overlay.origin";

/// A file of the workspace or /tmp open for writing in a process to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenForWriting {
    pub fd: i32,
    /// Its path in the branch's view.
    pub path: PathBuf,
    /// Its inode number as the process sees it.
    pub ino: u64,
}

/// Which of a branch's two stacks holds `path` (a path of the branch's view): `"ws"` or
/// `"tmp"`, and `path` relative to it, which must be plain names (no `..`).
fn stack_of<'a>(workspace: &Path, path: &'a Path) -> Option<(&'static str, &'a Path)> {
    let (what, rel) = match path.strip_prefix(workspace) {
        Ok(rel) => ("ws", rel),
        Err(_) => ("tmp", path.strip_prefix("/tmp").ok()?),
    };
    let plain = rel.components().count() > 0
        && rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    plain.then_some((what, rel))
}

/// Opens `rel` beneath directory `root` without following any symlink or leaving its
/// filesystem (the parent's upper directory and the layers hold what the branch wrote).
fn open_beneath(root: &Path, rel: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    use nix::fcntl::{OpenHow, ResolveFlag, openat2};
    let dir = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    openat2(&dir, rel, how)
}

/// The regular file `rel` as the child's lower layers (topmost first) give it: the topmost
/// layer that has anything at `rel` decides.
fn in_layers(layers: &[PathBuf], rel: &Path) -> Option<fs::File> {
    for layer in layers {
        match open_beneath(layer, rel, OFlag::O_PATH) {
            Ok(fd) => {
                let file = fs::File::from(fd);
                if !file.metadata().ok()?.is_file() {
                    return None; // a whiteout, a directory: not a file to copy
                }
                // Opened again for reading through the descriptor: the same inode.
                return fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).ok();
            }
            Err(Errno::ENOENT) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// A branch's layers and upper directories, as a copy needs them.
pub struct Stacks<'a> {
    pub workspace: &'a Path,
    /// The parent branch's directory (its upper directories `ws/upper`, `tmp/upper`).
    pub parent: &'a Path,
    /// The child branch's directory.
    pub child: &'a Path,
    /// The child's lower layers, topmost first.
    pub ws_lowers: &'a [PathBuf],
    pub tmp_lowers: &'a [PathBuf],
}

/// Makes the child's copies, in its upper directories, of `files`, as its lower layers
/// hold them (the parent's snapshot: immutable, so the parent's processes may go on), with
/// the origin of the inode the parent sees. Run before the child's overlays are mounted.
/// A file the layers do not hold as a regular file is left to overlayfs's copy-up. The
/// workspace's copies are recorded ([`ForkCopies`]).
pub fn copy_into<'a>(files: impl Iterator<Item = &'a OpenForWriting>, s: &Stacks) -> Result<()> {
    let mut copies = ForkCopies::default();
    let mut done = HashSet::new();
    for f in files {
        if !done.insert(&f.path) {
            continue;
        }
        let Some((what, rel)) = stack_of(s.workspace, &f.path) else {
            continue;
        };
        let layers = if what == "ws" {
            s.ws_lowers
        } else {
            s.tmp_lowers
        };
        let Some(src) = in_layers(layers, rel) else {
            continue;
        };
        let to_root = s.child.join(what).join("upper");
        let dst = to_root.join(rel);
        if fs::symlink_metadata(&dst).is_ok() {
            continue;
        }
        make_parents(layers, &to_root, rel)?;
        let to = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&dst)
            .at(&dst)?;
        copy_open_file(&src, &to, &dst)?;
        let upper = s.parent.join(what).join("upper");
        if let Some(origin) = origin_for(&upper, rel, f.ino)
            && let Err(e) = set_origin(&to, &origin)
        {
            // Not fatal: the clone gets the copy, under another number (the fork says so).
            log::warn!("{}: {e}", dst.display());
        }
        if what == "ws" {
            let meta = to.metadata().at(&dst)?;
            copies
                .0
                .insert(rel.to_path_buf(), crate::commit::ctime_ns(&meta));
        }
    }
    copies.save(s.child)
}

/// The workspace files a fork copied into the child's upper directory for its clones
/// ([`copy_into`]), each with the copy's change time. Until the clone writes one, the
/// copy is the file as it was at the fork, not a change of the child: `diff` leaves it
/// out, and a commit takes it as committed already (see
/// [`crate::commit::CommitState::load`]).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ForkCopies(pub std::collections::BTreeMap<PathBuf, i128>);

impl ForkCopies {
    fn file(branch_dir: &Path) -> PathBuf {
        branch_dir.join("fork-copies.json")
    }

    /// The copies of branch `branch_dir` (none if its fork made none).
    pub fn load(branch_dir: &Path) -> Self {
        fs::read(Self::file(branch_dir))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .unwrap_or_default()
    }

    fn save(&self, branch_dir: &Path) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let f = Self::file(branch_dir);
        let text = serde_json::to_vec(self)
            .map_err(std::io::Error::from)
            .at(&f)?;
        fs::write(&f, text).at(&f)
    }

    /// Whether `rel` is a copy its branch has not changed since the fork (its upper file,
    /// whose metadata is `now`, still has the copy's change time).
    pub fn unchanged(&self, rel: &Path, now: &fs::Metadata) -> bool {
        now.is_file() && self.0.get(rel) == Some(&crate::commit::ctime_ns(now))
    }
}

/// The origin to give the child's copy of `rel`, whose number the parent sees as `ino`:
/// a handle of the parent's upper file if that is the number, or that file's own origin.
fn origin_for(upper: &Path, rel: &Path, ino: u64) -> Option<Vec<u8>> {
    let file = fs::File::from(open_beneath(upper, rel, OFlag::O_PATH).ok()?);
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.ino() == ino {
        handle_of(&file, fs_uuid(upper))
    } else {
        get_origin(&file)
    }
}

/// Creates the directories above `rel` in `to_root` that it lacks, with the mode, owner and
/// times the topmost of `layers` holding each gives it (as a copy-up would).
fn make_parents(layers: &[PathBuf], to_root: &Path, rel: &Path) -> Result<()> {
    fs::create_dir_all(to_root).at(to_root)?;
    let mut sub = PathBuf::new();
    for part in rel.parent().into_iter().flat_map(|p| p.components()) {
        sub.push(part);
        let dst = to_root.join(&sub);
        if fs::symlink_metadata(&dst).is_ok() {
            continue;
        }
        fs::create_dir(&dst).at(&dst)?;
        let from = layers.iter().find_map(|l| {
            open_beneath(l, &sub, OFlag::O_PATH | OFlag::O_DIRECTORY)
                .ok()
                .map(fs::File::from)
        });
        if let Some(meta) = from.and_then(|f| f.metadata().ok()) {
            let dir = fs::File::open(&dst).at(&dst)?;
            nix::unistd::fchown(&dir, Some(meta.uid().into()), Some(meta.gid().into()))
                .map_err(|e| Error::Layer(format!("chown {}: {e}", dst.display())))?;
            dir.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))
                .at(&dst)?;
        }
    }
    Ok(())
}

/// The notes for the files whose clone (`clone_pid`) of process `pid` (`comm`) sees
/// another inode number than the original did.
pub fn check(clone_pid: u32, pid: u32, comm: &str, files: &[OpenForWriting]) -> Vec<String> {
    files
        .iter()
        .filter(|f| {
            fs::metadata(format!("/proc/{clone_pid}/fd/{}", f.fd)).is_ok_and(|m| m.ino() != f.ino)
        })
        .map(|f| {
            format!(
                "process {pid} ({comm}): fd {} ({}) is open for writing; its clone's copy has another inode number, which SQLite takes for a moved database (writes fail with SQLITE_READONLY_DBMOVED until it reconnects)",
                f.fd,
                f.path.display()
            )
        })
        .collect()
}

/// The overlay origin handle of `file` (an O_PATH descriptor of a file on the filesystem of
/// the overlays' layers, whose UUID is `uuid`): `struct ovl_fb` of fs/overlayfs/overlayfs.h:
/// version 0, magic 0xfb, length, flags (the byte order), handle type, the filesystem's
/// UUID, then the handle itself.
fn handle_of(file: &fs::File, uuid: [u8; 16]) -> Option<Vec<u8>> {
    const MAX_HANDLE: usize = 128;
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        f: [u8; MAX_HANDLE],
    }
    let mut h = Handle {
        bytes: MAX_HANDLE as u32,
        kind: 0,
        f: [0; MAX_HANDLE],
    };
    let mut mount_id = 0;
    // SAFETY: an open descriptor with an empty path and AT_EMPTY_PATH; `h` is a
    // `struct file_handle` with room for MAX_HANDLE bytes, as its `handle_bytes` says;
    // `mount_id` is a valid int.
    let r = unsafe {
        libc::name_to_handle_at(
            file.as_raw_fd(),
            c"".as_ptr(),
            (&mut h as *mut Handle).cast(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    let n = h.bytes as usize;
    if r != 0 || n > MAX_HANDLE || h.kind < 0 || h.kind > 255 {
        return None;
    }
    let flags = if cfg!(target_endian = "big") { 1 } else { 0 };
    let mut fb = vec![0, 0xfb, (21 + n) as u8, flags, h.kind as u8];
    fb.extend(uuid);
    fb.extend(&h.f[..n]);
    Some(fb)
}

/// The UUID of the filesystem holding `path` (`FS_IOC_GETFSUUID`), as overlayfs compares it
/// with a handle's; zeros where the filesystem has none.
fn fs_uuid(path: &Path) -> [u8; 16] {
    #[repr(C)]
    struct FsUuid2 {
        len: u8,
        uuid: [u8; 16],
    }
    // _IOR(0x15, 0, struct fsuuid2)
    const FS_IOC_GETFSUUID: libc::c_ulong = 0x8011_1500;
    let mut u = FsUuid2 {
        len: 0,
        uuid: [0; 16],
    };
    let Ok(f) = fs::File::open(path) else {
        return [0; 16];
    };
    // SAFETY: FS_IOC_GETFSUUID writes one `struct fsuuid2` (17 bytes) into `u`; the
    // descriptor is open.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETFSUUID as _, &mut u) };
    if r != 0 || u.len as usize != u.uuid.len() {
        return [0; 16];
    }
    u.uuid
}

/// The overlay origin xattr of `file` (an O_PATH descriptor, which takes no fgetxattr:
/// read through /proc), if it has one.
fn get_origin(file: &fs::File) -> Option<Vec<u8>> {
    xattr::get(&fd_path(file), ORIGIN_XATTR, true)
}

fn set_origin(file: &fs::File, value: &[u8]) -> std::io::Result<()> {
    xattr::set(&fd_path(file), ORIGIN_XATTR, value, true)
}

/// The path that leads to `file` through /proc.
fn fd_path(file: &fs::File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_the_stack_that_holds_them_and_only_plain_names_pass() {
        let ws = Path::new("/home/u/proj");
        let db = Path::new("/home/u/proj/data/db.sqlite");
        assert_eq!(stack_of(ws, db), Some(("ws", Path::new("data/db.sqlite"))));
        assert_eq!(
            stack_of(ws, Path::new("/tmp/x.log")),
            Some(("tmp", Path::new("x.log")))
        );
        assert_eq!(stack_of(ws, Path::new("/etc/passwd")), None);
        assert_eq!(
            stack_of(ws, Path::new("/home/u/proj/../../etc/passwd")),
            None
        );
        assert_eq!(stack_of(ws, Path::new("/tmp")), None);
    }
}
