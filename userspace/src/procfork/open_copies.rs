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
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
};

use crate::{
    error::{IoContext, Result},
    layers::snapshot::{copy_attrs, copy_file},
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

/// The upper directory of branch directory `dir` that holds `path` (a path of the
/// branch's view), and `path` relative to it.
fn upper_of<'a>(workspace: &Path, dir: &Path, path: &'a Path) -> Option<(PathBuf, &'a Path)> {
    if let Ok(rel) = path.strip_prefix(workspace) {
        return Some((dir.join("ws/upper"), rel));
    }
    path.strip_prefix("/tmp")
        .ok()
        .map(|rel| (dir.join("tmp/upper"), rel))
}

/// Makes the child's copies, in the upper directories of branch directory `child`, of
/// `files` as the parent (branch directory `parent`, on `workspace`) has them. Run while
/// the parent's processes are held, before the child's overlays are mounted. A file that is
/// not in the parent's upper directory is left to overlayfs's copy-up.
pub fn copy_into<'a>(
    files: impl Iterator<Item = &'a OpenForWriting>,
    workspace: &Path,
    parent: &Path,
    child: &Path,
) -> Result<()> {
    let mut done = HashSet::new();
    for f in files {
        if !done.insert(&f.path) {
            continue;
        }
        let (Some((from_root, rel)), Some((to_root, _))) = (
            upper_of(workspace, parent, &f.path),
            upper_of(workspace, child, &f.path),
        ) else {
            continue;
        };
        let (src, dst) = (from_root.join(rel), to_root.join(rel));
        let Ok(meta) = fs::symlink_metadata(&src) else {
            continue;
        };
        if !meta.is_file() || fs::symlink_metadata(&dst).is_ok() {
            continue;
        }
        make_parents(&from_root, &to_root, rel)?;
        copy_file(&src, &dst)?;
        let origin = if meta.ino() == f.ino {
            handle_of(&src)
        } else {
            get_origin(&src)
        };
        if let Some(origin) = origin
            && let Err(e) = set_origin(&dst, &origin)
        {
            // Not fatal: the clone gets the copy, under another number (and the fork says so).
            log::warn!("{}: {e}", dst.display());
        }
    }
    Ok(())
}

/// Creates the directories above `rel` in `to_root` that it lacks, with the mode, owner and
/// times of the same directories in `from_root` (as a copy-up would).
fn make_parents(from_root: &Path, to_root: &Path, rel: &Path) -> Result<()> {
    fs::create_dir_all(to_root).at(to_root)?;
    let mut sub = PathBuf::new();
    for part in rel.parent().into_iter().flat_map(|p| p.components()) {
        sub.push(part);
        let dst = to_root.join(&sub);
        if fs::symlink_metadata(&dst).is_ok() {
            continue;
        }
        fs::create_dir(&dst).at(&dst)?;
        copy_attrs(&from_root.join(&sub), &dst)?;
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

/// The overlay origin handle of `path` (a file on the filesystem of the overlays' layers):
/// `struct ovl_fb` of fs/overlayfs/overlayfs.h: version 0, magic 0xfb, length, flags (the
/// byte order), handle type, the filesystem's UUID, then the handle itself.
fn handle_of(path: &Path) -> Option<Vec<u8>> {
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
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a NUL-terminated path; `h` is a `struct file_handle` with room for
    // MAX_HANDLE bytes, as its `handle_bytes` says; `mount_id` is a valid int.
    let r = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            c.as_ptr(),
            (&mut h as *mut Handle).cast(),
            &mut mount_id,
            0,
        )
    };
    let n = h.bytes as usize;
    if r != 0 || n > MAX_HANDLE || h.kind < 0 || h.kind > 255 {
        return None;
    }
    let flags = if cfg!(target_endian = "big") { 1 } else { 0 };
    let mut fb = vec![0, 0xfb, (21 + n) as u8, flags, h.kind as u8];
    fb.extend(fs_uuid(path));
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
    use std::os::fd::AsRawFd;
    // SAFETY: FS_IOC_GETFSUUID writes one `struct fsuuid2` (17 bytes) into `u`; the
    // descriptor is open.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETFSUUID as _, &mut u) };
    if r != 0 || u.len as usize != u.uuid.len() {
        return [0; 16];
    }
    u.uuid
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// The overlay origin xattr of `path`, if it has one.
fn get_origin(path: &Path) -> Option<Vec<u8>> {
    let p = c_path(path).ok()?;
    let name = CString::new(ORIGIN_XATTR).expect("no NUL");
    let mut buf = [0u8; 256];
    // SAFETY: NUL-terminated strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n > 0).then(|| buf[..n as usize].to_vec())
}

fn set_origin(path: &Path, value: &[u8]) -> std::io::Result<()> {
    let p = c_path(path)?;
    let name = CString::new(ORIGIN_XATTR).expect("no NUL");
    // SAFETY: NUL-terminated strings and a value buffer of the given length.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_the_upper_directory_that_holds_them() {
        let ws = Path::new("/home/u/proj");
        let dir = Path::new("/var/lib/forkscope/branches/7");
        let db = Path::new("/home/u/proj/data/db.sqlite");
        assert_eq!(
            upper_of(ws, dir, db),
            Some((dir.join("ws/upper"), Path::new("data/db.sqlite")))
        );
        assert_eq!(
            upper_of(ws, dir, Path::new("/tmp/x.log")),
            Some((dir.join("tmp/upper"), Path::new("x.log")))
        );
        assert_eq!(upper_of(ws, dir, Path::new("/etc/passwd")), None);
    }
}
