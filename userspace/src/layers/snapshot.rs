//! Delta snapshots: copying what an upper directory gained or lost since the previous
//! snapshot into a new, immutable layer.
//!
//! Stacked on top of the previous snapshots (and the branch's own lower layers), the new
//! layer reproduces the upper directory exactly as it is now:
//! - entries whose status change time is at or after the previous snapshot are copied
//!   (files by reflink where the filesystem can, else by copy); directories they live in are
//!   created as plain directories, so they merge with the layers below;
//! - a directory that is opaque in the upper directory (deleted and recreated) and changed
//!   since is copied whole and stays opaque;
//! - entries the previous snapshot saw that are gone now become whiteouts.
//!
//! The branch must be frozen while it is snapshotted.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::{
        fs::{FileExt, MetadataExt, PermissionsExt, lchown, symlink},
        io::AsRawFd,
    },
    path::{Path, PathBuf},
};

use nix::sys::stat::{Mode, SFlag, mknod};

use super::scan::{EntryKind, OPAQUE_XATTR, scan};
use crate::error::{Error, IoContext, Result};

/// The entries an upper directory held when it was snapshotted (relative paths and kinds),
/// needed to find what the next snapshot must delete.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub entries: BTreeMap<PathBuf, EntryKind>,
    /// Each entry's status change time when the snapshot scanned it (a commit of a child
    /// tells from it what the parent changed after the fork).
    #[serde(default)]
    pub ctimes: BTreeMap<PathBuf, i128>,
}

impl Manifest {
    /// Writes the manifest to `path` over what it held, without truncating it first: on
    /// ext4, a file truncated to zero and written again is flushed when it is closed (its
    /// `auto_da_alloc`), which made each manifest cost about 0.45 ms of a fork instead of
    /// 0.09. A write cut short leaves old and new bytes mixed: callers write where no
    /// record points yet (`branch::fork::manifest_path`'s slots).
    pub fn save(&self, path: &Path) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let text = serde_json::to_vec(self).map_err(std::io::Error::from)?;
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .at(path)?;
        file.write_all_at(&text, 0).at(path)?;
        if file.metadata().at(path)?.len() > text.len() as u64 {
            file.set_len(text.len() as u64).at(path)?;
        }
        Ok(())
    }
}

/// What a snapshot copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Entries written into the layer (files, directories, links, whiteouts).
    pub entries: u64,
    /// File bytes copied (reflinked bytes included).
    pub bytes: u64,
    /// Files cloned by reflink rather than copied.
    pub reflinked: u64,
    /// Whiteouts written for entries that disappeared since the previous snapshot.
    pub whiteouts: u64,
}

/// The time to record for a snapshot that is about to be taken, in the clock file change
/// times use. Take it before scanning, while the branch is frozen: every later change gets a
/// change time at or after it (the coarse clock never runs ahead of file timestamps), so the
/// next snapshot, passed this value as `since_ns`, misses nothing.
pub fn snapshot_clock_ns() -> i128 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME_COARSE)
        .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
        .unwrap_or(0)
}

/// Copies into `layer` (an empty directory, created if missing) what `upper` changed since
/// the snapshot that produced `previous` at time `since_ns` (`None`: the first snapshot,
/// copy all).
pub fn snapshot(
    upper: &Path,
    since_ns: Option<i128>,
    previous: &Manifest,
    layer: &Path,
) -> Result<(Manifest, SnapshotStats)> {
    if !layer.exists() {
        fs::create_dir(layer).at(layer)?;
    }
    let entries = scan(upper)?;
    let manifest = Manifest {
        entries: entries.iter().map(|e| (e.path.clone(), e.kind)).collect(),
        ctimes: entries
            .iter()
            .map(|e| (e.path.clone(), e.ctime_ns))
            .collect(),
    };
    let mut stats = SnapshotStats::default();
    let mut whole: Vec<PathBuf> = Vec::new();
    for e in &entries {
        if whole.iter().any(|w| e.path.starts_with(w)) {
            continue;
        }
        if since_ns.is_some_and(|t| e.ctime_ns < t) {
            continue;
        }
        ensure_parents(upper, layer, &e.path, &mut stats)?;
        if let EntryKind::Dir { opaque: true } = e.kind {
            copy_tree(upper, layer, &e.path, &mut stats)?;
            whole.push(e.path.clone());
        } else {
            copy_entry(upper, layer, &e.path, e.kind, &mut stats)?;
        }
    }
    let current: BTreeSet<&PathBuf> = manifest.entries.keys().collect();
    for (gone, _) in previous
        .entries
        .iter()
        .filter(|(p, _)| !current.contains(p))
    {
        let shadowed = gone
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .any(|a| {
                // An ancestor that is gone too gets its own whiteout; one that is no longer a
                // directory hides everything that was below it; one copied whole is exact.
                let was_dir = matches!(previous.entries.get(a), Some(EntryKind::Dir { .. }));
                let now = manifest.entries.get(a);
                (was_dir && now.is_none())
                    || now.is_some_and(|k| !matches!(k, EntryKind::Dir { .. }))
                    || whole.iter().any(|w| a.starts_with(w))
            });
        if shadowed || whole.iter().any(|w| gone.starts_with(w)) {
            continue;
        }
        ensure_parents(upper, layer, gone, &mut stats)?;
        let target = layer.join(gone);
        if !target.exists() {
            whiteout(&target)?;
            stats.whiteouts += 1;
            stats.entries += 1;
        }
    }
    Ok((manifest, stats))
}

/// Creates in `layer` the directories above `rel`, with the modes and owners they have in
/// `upper`, as plain (non-opaque) directories.
fn ensure_parents(upper: &Path, layer: &Path, rel: &Path, stats: &mut SnapshotStats) -> Result<()> {
    let mut parents: Vec<&Path> = rel
        .ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
        .collect();
    parents.reverse();
    for p in parents {
        let dst = layer.join(p);
        if dst.exists() {
            continue;
        }
        let src = upper.join(p);
        make_dir(&src, &dst, false)?;
        stats.entries += 1;
    }
    Ok(())
}

fn make_dir(src: &Path, dst: &Path, opaque: bool) -> Result<()> {
    fs::create_dir(dst).at(dst)?;
    copy_attrs(src, dst)?;
    if opaque {
        set_opaque(dst)?;
    }
    Ok(())
}

/// Copies `rel` and everything below it.
fn copy_tree(upper: &Path, layer: &Path, rel: &Path, stats: &mut SnapshotStats) -> Result<()> {
    for e in std::iter::once(super::scan::Entry {
        path: PathBuf::new(),
        kind: super::scan::kind_of(
            &upper.join(rel),
            &fs::symlink_metadata(upper.join(rel)).at(upper.join(rel))?,
        ),
        ctime_ns: 0,
    })
    .chain(scan(&upper.join(rel))?)
    {
        copy_entry(upper, layer, &rel.join(&e.path), e.kind, stats)?;
    }
    Ok(())
}

/// Copies one entry (not its children) from `upper` to `layer`.
fn copy_entry(
    upper: &Path,
    layer: &Path,
    rel: &Path,
    kind: EntryKind,
    stats: &mut SnapshotStats,
) -> Result<()> {
    let src = upper.join(rel);
    let dst = layer.join(rel);
    match kind {
        EntryKind::Dir { opaque } => {
            if dst.exists() {
                return Ok(());
            }
            make_dir(&src, &dst, opaque)?;
        }
        EntryKind::File => {
            let (bytes, cloned) = copy_file(&src, &dst)?;
            stats.bytes += bytes;
            stats.reflinked += cloned as u64;
        }
        kind => copy_entry_from(&src, &dst, kind)?,
    }
    stats.entries += 1;
    Ok(())
}

/// Copies one entry that is not a directory from `src` to `dst` (which must not exist), with
/// its mode, owner and times: a file's data (by reflink where possible), a symlink's target,
/// a device node, FIFO or whiteout.
pub(crate) fn copy_entry_from(src: &Path, dst: &Path, kind: EntryKind) -> Result<()> {
    match kind {
        EntryKind::Dir { .. } => {
            return Err(Error::Layer(format!(
                "{}: a directory where a file was expected",
                src.display()
            )));
        }
        EntryKind::File => {
            copy_file(src, dst)?;
        }
        EntryKind::Symlink => {
            let target = fs::read_link(src).at(src)?;
            symlink(&target, dst).at(dst)?;
            copy_owner(src, dst)?;
        }
        EntryKind::Whiteout => whiteout(dst)?,
        EntryKind::Other => {
            let meta = fs::symlink_metadata(src).at(src)?;
            let kind = SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT);
            mknod(
                dst,
                kind,
                Mode::from_bits_truncate(meta.mode() & 0o7777),
                meta.rdev(),
            )
            .map_err(|e| Error::Layer(format!("mknod {}: {e}", dst.display())))?;
            copy_attrs(src, dst)?;
        }
    }
    Ok(())
}

/// Copies a regular file: its data by reflink (FICLONE) where the filesystem can, else by
/// copy_file_range, then its mode, owner and times, all through the two open descriptors
/// (a fork is paused while this runs: every syscall counts). Returns (bytes, reflinked).
pub(crate) fn copy_file(src: &Path, dst: &Path) -> Result<(u64, bool)> {
    let from = fs::File::open(src).at(src)?;
    let to = fs::File::create(dst).at(dst)?;
    copy_open_file(&from, &to, dst)
}

/// [`copy_file`] between open files (`dst` names `to` in errors).
pub(crate) fn copy_open_file(from: &fs::File, to: &fs::File, dst: &Path) -> Result<(u64, bool)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    // The last filesystem (device) that refused a reflink: not asked again.
    static NO_REFLINK_DEV: AtomicU64 = AtomicU64::new(u64::MAX);
    let meta = from.metadata().at(dst)?;
    let dev = meta.dev();
    let cloned = NO_REFLINK_DEV.load(Ordering::Relaxed) != dev && {
        // SAFETY: FICLONE takes the source descriptor as its argument; both are open.
        let ok = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE as _, from.as_raw_fd()) } == 0;
        if !ok {
            NO_REFLINK_DEV.store(dev, Ordering::Relaxed);
        }
        ok
    };
    if !cloned {
        copy_data(from, to, meta.len()).at(dst)?;
    }
    nix::unistd::fchown(to, Some(meta.uid().into()), Some(meta.gid().into()))
        .map_err(|e| Error::Layer(format!("chown {}: {e}", dst.display())))?;
    to.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))
        .at(dst)?;
    let mtime = nix::sys::time::TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    let atime = nix::sys::time::TimeSpec::new(meta.atime(), meta.atime_nsec());
    nix::sys::stat::futimens(to, &atime, &mtime)
        .map_err(|e| Error::Layer(format!("setting times of {}: {e}", dst.display())))?;
    Ok((meta.len(), cloned))
}

/// Copies the `len` bytes of `from` into `to` in the kernel (copy_file_range), its data
/// ranges only (SEEK_DATA, SEEK_HOLE): a sparse file stays sparse.
fn copy_data(from: &fs::File, to: &fs::File, len: u64) -> std::io::Result<()> {
    use nix::unistd::{Whence, lseek};
    let len = len as i64;
    let mut at = 0i64;
    while at < len {
        let data = match lseek(from, at, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole is left
            Err(_) => at,                           // no SEEK_DATA here: all data
        };
        let hole = lseek(from, data, Whence::SeekHole).unwrap_or(len).min(len);
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = (hole - off_in) as usize;
            match nix::fcntl::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want)
            {
                Ok(0) => break, // the file shrank meanwhile
                Ok(_) => {}
                Err(_) => {
                    // Across filesystems some kernels refuse: through userspace.
                    let mut buf = vec![0u8; want.min(1 << 20)];
                    let n = from.read_at(&mut buf, off_in as u64)?;
                    if n == 0 {
                        break;
                    }
                    to.write_all_at(&buf[..n], off_out as u64)?;
                    off_in += n as i64;
                    off_out += n as i64;
                }
            }
        }
        at = hole;
    }
    to.set_len(len as u64)
}

/// Mode, owner and modification time of `src` onto `dst` (not following symlinks).
pub(crate) fn copy_attrs(src: &Path, dst: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(src).at(src)?;
    copy_owner(src, dst)?;
    fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777)).at(dst)?;
    let mtime = nix::sys::time::TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    let atime = nix::sys::time::TimeSpec::new(meta.atime(), meta.atime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &atime,
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| Error::Layer(format!("setting times of {}: {e}", dst.display())))
}

pub(crate) fn copy_owner(src: &Path, dst: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(src).at(src)?;
    lchown(dst, Some(meta.uid()), Some(meta.gid())).at(dst)
}

/// Writes an overlayfs whiteout (a 0:0 character device) at `path`.
pub fn whiteout(path: &Path) -> Result<()> {
    mknod(path, SFlag::S_IFCHR, Mode::empty(), 0)
        .map_err(|e| Error::Layer(format!("whiteout {}: {e}", path.display())))
}

/// Marks a directory opaque: it hides the same directory in the layers below.
pub fn set_opaque(path: &Path) -> Result<()> {
    super::xattr::set(path, OPAQUE_XATTR, b"y", false)
        .map_err(|e| Error::Layer(format!("marking {} opaque: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_saved_over_a_longer_one_reads_back_as_itself() {
        let dir = std::env::temp_dir().join(format!("forkscope-manifest-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ws-manifest.json");
        let manifest = |n: usize| Manifest {
            entries: (0..n)
                .map(|i| (PathBuf::from(format!("dir/file-{i}")), EntryKind::File))
                .collect(),
            ctimes: (0..n)
                .map(|i| (PathBuf::from(format!("dir/file-{i}")), i as i128))
                .collect(),
        };
        for n in [50, 3, 0, 7] {
            manifest(n).save(&path).unwrap();
            let back: Manifest = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
            assert_eq!(back, manifest(n));
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_sparse_file_is_copied_sparse_with_its_data_in_place() {
        let dir = std::env::temp_dir().join(format!("forkscope-sparse-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        let f = fs::File::create(&src).unwrap();
        // 256 MiB with 4 KiB of data at 1 MiB and at the very end.
        f.set_len(256 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        f.write_all_at(&[9u8; 4096], (256 << 20) - 4096).unwrap();
        drop(f);
        let (bytes, _) = copy_file(&src, &dst).unwrap();
        assert_eq!(bytes, 256 << 20);
        let m = fs::metadata(&dst).unwrap();
        assert_eq!(m.len(), 256 << 20);
        assert!(
            m.blocks() * 512 < 4 << 20,
            "{} bytes allocated",
            m.blocks() * 512
        );
        let to = fs::File::open(&dst).unwrap();
        let mut buf = [0u8; 4096];
        for (at, want) in [
            (1u64 << 20, 7u8),
            ((256 << 20) - 4096, 9),
            (0, 0),
            (2 << 20, 0),
        ] {
            to.read_exact_at(&mut buf, at).unwrap();
            assert!(buf.iter().all(|b| *b == want), "at {at}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
