//! Applying a planned commit all or nothing, also across a crash.
//!
//! 1. A marker naming the staging directory is written (so a crash can clean it up).
//! 2. Every file the commit installs is copied into the staging directory, which sits on the
//!    target's filesystem. The target is untouched so far: a crash here leaves it as it was,
//!    and recovery removes the staging directory.
//! 3. The journal (target, staging directory, operations, the branch's next commit state) is
//!    written, the staged files and the journal are made durable (`syncfs`), and the journal
//!    is renamed into place. From here on the commit happens: recovery replays the journal.
//! 4. The operations run in order. Each is idempotent (a removal checks the inode it planned
//!    to remove, an install whose staged file is gone was done), so replaying a journal
//!    whose operations partly ran gives the same result as running it once.
//! 5. The target is made durable, the branch's commit state (with the fingerprints of what
//!    was written) is saved, and the journal, marker and staging directory are removed.
//!
//! Fault injection for tests: `FORKSCOPE_FAULT=commit-before-journal` aborts the process
//! after step 2, `FORKSCOPE_FAULT=commit-after-op:N` after N operations of step 4.

use std::{
    fs,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{
    CommitState, Fingerprint,
    plan::{Op, Plan},
    sync_dir,
};
use crate::{
    error::{Error, IoContext, Result},
    layers::snapshot::copy_entry_from,
};

/// A commit that is being applied (`<branch dir>/commit-journal.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Journal {
    /// Where the operations apply.
    pub root: PathBuf,
    /// Where the fingerprints of written paths are read afterwards.
    pub baseline: PathBuf,
    pub staging: PathBuf,
    pub ops: Vec<Op>,
    /// The branch's commit state once the commit is done, fingerprints aside.
    pub state: CommitState,
}

fn journal_file(branch_dir: &Path) -> PathBuf {
    branch_dir.join("commit-journal.json")
}

fn marker_file(branch_dir: &Path) -> PathBuf {
    branch_dir.join("commit-staging")
}

fn fault(name: &str) -> bool {
    std::env::var("FORKSCOPE_FAULT").is_ok_and(|f| f == name)
}

fn fault_after_op() -> Option<usize> {
    std::env::var("FORKSCOPE_FAULT")
        .ok()?
        .strip_prefix("commit-after-op:")?
        .parse()
        .ok()
}

/// Flushes the filesystem holding `dir` to disk.
fn syncfs(dir: &Path) -> Result<()> {
    let d = fs::File::open(dir).at(dir)?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error()).at(dir);
    }
    Ok(())
}

/// Steps 1 and 2: copies what `plan` installs into `staging` (created afresh). It is made
/// durable together with the journal, by [`apply`].
pub fn stage(branch_dir: &Path, plan: &Plan, staging: &Path) -> Result<()> {
    let marker = marker_file(branch_dir);
    fs::write(&marker, staging.as_os_str().as_encoded_bytes()).at(&marker)?;
    if staging.exists() {
        fs::remove_dir_all(staging).at(staging)?;
    }
    fs::create_dir_all(staging.join("trash")).at(staging)?;
    for s in &plan.stage {
        copy_entry_from(&s.src, &staging.join(&s.staged), s.kind)?;
    }
    Ok(())
}

/// Steps 3 to 5, after [`stage`]. The journal becomes valid by a rename once it, the staged
/// files and the marker are on disk: one `syncfs` covers them when they share a filesystem.
pub fn apply(branch_dir: &Path, journal: &Journal) -> Result<()> {
    if fault("commit-before-journal") {
        std::process::abort();
    }
    let text = serde_json::to_string(journal).map_err(std::io::Error::from)?;
    let jf = journal_file(branch_dir);
    let tmp = jf.with_extension("tmp");
    fs::write(&tmp, text.as_bytes()).at(&tmp)?;
    syncfs(&journal.staging)?;
    let dev = |p: &Path| fs::metadata(p).map(|m| m.dev()).ok();
    if dev(&journal.staging) != dev(branch_dir) {
        syncfs(branch_dir)?;
    }
    fs::rename(&tmp, &jf).at(&jf)?;
    sync_dir(branch_dir)?;
    replay(branch_dir, journal)
}

/// Steps 4 and 5: runs a journal's operations (again) and finishes the commit.
fn replay(branch_dir: &Path, j: &Journal) -> Result<()> {
    let crash_after = fault_after_op();
    for (n, op) in j.ops.iter().enumerate() {
        if crash_after == Some(n) {
            std::process::abort();
        }
        run(j, n, op).map_err(|e| {
            Error::State(format!(
                "commit into {} stopped at {op:?}: {e}; the journal {} is kept and is replayed when the daemon starts again",
                j.root.display(),
                journal_file(branch_dir).display()
            ))
        })?;
    }
    syncfs(&j.root)?;
    let mut state = j.state.clone();
    for op in &j.ops {
        let p = op.path();
        let mut fp = Fingerprint::of(&j.baseline.join(p));
        if let (Some(f), Op::Mkdir { .. }) = (fp.as_mut(), op) {
            f.fresh = true;
        }
        let fresh = state
            .ours
            .get(p)
            .copied()
            .flatten()
            .is_some_and(|f| f.fresh);
        if let Some(f) = fp.as_mut() {
            f.fresh |= fresh && f.dir;
        }
        state.ours.insert(p.to_path_buf(), fp);
    }
    // The new state is on disk before the journal goes: a crash in between replays the
    // journal (idempotent) rather than forgetting what was committed.
    state.save_unsynced_dir(branch_dir)?;
    fs::remove_file(journal_file(branch_dir)).at(journal_file(branch_dir))?;
    let _ = fs::remove_file(marker_file(branch_dir));
    sync_dir(branch_dir)?;
    let _ = fs::remove_dir_all(&j.staging);
    Ok(())
}

/// One operation, idempotent.
fn run(j: &Journal, n: usize, op: &Op) -> std::io::Result<()> {
    match op {
        Op::Remove { path, ino } => {
            let p = j.root.join(path);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.ino() == *ino => {
                    if m.is_dir() {
                        // One rename where it can (the host), else in place (an overlay
                        // cannot rename a directory of its lower layers).
                        let trash = j.staging.join("trash").join(n.to_string());
                        if fs::rename(&p, &trash).is_err() {
                            fs::remove_dir_all(&p)?;
                        }
                    } else {
                        fs::remove_file(&p)?;
                    }
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        Op::Mkdir { path } => {
            let p = j.root.join(path);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => Ok(()),
                _ => fs::create_dir(&p),
            }
        }
        Op::Install { path, staged } => {
            let s = j.staging.join(staged);
            if fs::symlink_metadata(&s).is_ok() {
                fs::rename(&s, j.root.join(path))?;
            }
            Ok(())
        }
        Op::Attrs {
            path,
            mode,
            uid,
            gid,
            mtime,
        } => {
            let p = j.root.join(path);
            std::os::unix::fs::lchown(&p, Some(*uid), Some(*gid))?;
            fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(*mode))?;
            if let Some((s, ns)) = mtime {
                let t = nix::sys::time::TimeSpec::new(*s, *ns);
                nix::sys::stat::utimensat(
                    nix::fcntl::AT_FDCWD,
                    &p,
                    &t,
                    &t,
                    nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                )?;
            }
            Ok(())
        }
    }
}

/// Finishes or undoes a commit a crash interrupted: replays its journal if there is one
/// (the commit happened), else removes its staging directory (it did not). Returns whether a
/// journal was replayed.
pub fn recover(branch_dir: &Path) -> Result<bool> {
    let jf = journal_file(branch_dir);
    if let Ok(text) = fs::read_to_string(&jf) {
        let j: Journal = serde_json::from_str(&text)
            .map_err(|e| Error::State(format!("{}: {e}", jf.display())))?;
        replay(branch_dir, &j)?;
        return Ok(true);
    }
    if let Ok(staging) = fs::read_to_string(marker_file(branch_dir)) {
        let _ = fs::remove_dir_all(staging);
        let _ = fs::remove_file(marker_file(branch_dir));
    }
    Ok(false)
}

/// Removes the staging directory and marker of a commit that failed before its journal was
/// written.
pub fn discard(branch_dir: &Path, staging: &Path) {
    let _ = fs::remove_dir_all(staging);
    let _ = fs::remove_file(marker_file(branch_dir));
}
