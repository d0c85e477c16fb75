//! Applying a planned commit all or nothing, also across a crash.
//!
//! 1. A marker naming the staging directory is written (so a crash can clean it up).
//! 2. Every file the commit installs is copied into the staging directory, which sits on the
//!    target's filesystem. The target is untouched so far: a crash here leaves it as it was,
//!    and recovery removes the staging directory.
//! 3. The journal (target, staging directory, operations, the branch's next commit state) is
//!    written, and the staged files and the journal are made durable by one `syncfs`. From
//!    here on the commit happens: recovery replays the journal (a journal cut short by a
//!    crash before that sync does not parse, and is ignored).
//! 4. The operations run in order. Each is idempotent (a removal checks the inode it planned
//!    to remove, and is skipped once a marker, written and synced before the first other
//!    operation of a commit that removes anything, says all removals are done; an install whose
//!    staged file is gone was done), so replaying a journal whose operations partly ran gives
//!    the same result as running it once. A replay refuses to run when the target branch's
//!    init is no longer the process the journal names, or the staging directory is gone
//!    (unless the branch's saved commit state says this commit was finished: see step 5).
//!    Into the host, a file an install replaces is first hard-linked into the staging
//!    directory's trash: the rename then does not free it (ext4 frees a replaced file's
//!    blocks inside the rename, about 0.13 ms per file), and it goes with the staging
//!    directory.
//! 5. The branch's commit state (with the fingerprints of what was written) is written, and
//!    one `syncfs` makes it and the target durable together (two when they are on different
//!    filesystems). Then the journal and marker are removed, without a sync of their own: a
//!    crash that brings the journal back replays it, and every operation finds its work
//!    done. The staging directory is handed back to the caller ([`Applied::staging`]),
//!    which removes it (the daemon, in a thread of low priority).
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
    CommitState, Fingerprint, device_of,
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
    /// For a parent branch target reached through `/proc/<pid>/root`: that process's start
    /// time (field 22 of `/proc/<pid>/stat`), so a replay never writes through a pid that
    /// now belongs to another process.
    #[serde(default)]
    pub target_process: Option<(u32, u64)>,
    /// Hard-link each file an install replaces into the staging directory's trash first
    /// (the host: a plain directory; never through an overlay, where a link copies the file
    /// up).
    #[serde(default)]
    pub keep_replaced: bool,
}

/// A commit applied and durable.
#[derive(Debug)]
pub struct Applied {
    /// The staging directory, no longer needed (it may hold the files the commit
    /// replaced): the caller removes it.
    pub staging: PathBuf,
}

/// The start time of process `pid` (clock ticks since boot), if it exists.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn journal_file(branch_dir: &Path) -> PathBuf {
    branch_dir.join("commit-journal.json")
}

fn marker_file(branch_dir: &Path) -> PathBuf {
    branch_dir.join("commit-staging")
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

/// Flushes the filesystem holding `first`, and the one holding `second` when it is another.
fn syncfs_both(first: &Path, second: &Path) -> Result<()> {
    syncfs(first)?;
    if device_of(first) != device_of(second) {
        syncfs(second)?;
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

/// Steps 3 to 5, after [`stage`]. One `syncfs` makes the staged files and the journal
/// durable together (the journal is in the branch's directory, which shares the staging
/// directory's filesystem for a host target; else both filesystems are synced): that is the
/// commit point. A journal cut short by a crash does not parse, and counts as no journal.
pub fn apply(branch_dir: &Path, journal: &Journal) -> Result<Applied> {
    if crate::fault::armed("commit-before-journal") {
        std::process::abort();
    }
    let mut text = serde_json::to_string(journal).map_err(std::io::Error::from)?;
    text.push('\n');
    let jf = journal_file(branch_dir);
    let durable = fs::write(&jf, text.as_bytes())
        .at(&jf)
        .and_then(|()| syncfs_both(&journal.staging, branch_dir));
    if let Err(e) = durable {
        // Not a commit: the target is untouched, and no later recovery may apply it.
        let _ = fs::remove_file(&jf);
        return Err(e);
    }
    replay(branch_dir, journal).map_err(|e| Error::CommitIncomplete(e.to_string()))?;
    Ok(Applied {
        staging: journal.staging.clone(),
    })
}

/// Whether a journal is waiting to be replayed for this branch.
pub fn pending(branch_dir: &Path) -> bool {
    journal_file(branch_dir).exists()
}

/// Steps 4 and 5: runs a journal's operations (again) and finishes the commit.
fn replay(branch_dir: &Path, j: &Journal) -> Result<()> {
    // Step 5 saved the state (durably) before the journal's removal, which a crash can undo
    // while the staging directory's removal stays: then the commit was finished.
    if !j.staging.is_dir()
        && CommitState::load(branch_dir).is_ok_and(|s| s.commits >= j.state.commits)
    {
        fs::remove_file(journal_file(branch_dir)).at(journal_file(branch_dir))?;
        let _ = fs::remove_file(marker_file(branch_dir));
        return Ok(());
    }
    if let Some((pid, start)) = j.target_process
        && process_start(pid) != Some(start)
    {
        return Err(Error::State(format!(
            "the branch this commit writes into (its init, pid {pid}) is gone: the journal {} is kept, nothing was written",
            journal_file(branch_dir).display()
        )));
    }
    if !j.staging.is_dir() {
        return Err(Error::State(format!(
            "the staging directory {} of this commit is missing: the journal {} is kept, nothing was written",
            j.staging.display(),
            journal_file(branch_dir).display()
        )));
    }
    let crash_after = fault_after_op();
    // Removals come first. Once they are all done a marker says so: a replay must not
    // remove again what a later operation of the same commit created (inode numbers are
    // reused at once on ext4).
    // Without removals there is nothing to protect: no marker, and no directory sync.
    let removes_done = j.staging.join("removes-done");
    let skip_removes = removes_done.exists();
    let has_removes = j.ops.iter().any(|op| matches!(op, Op::Remove { .. }));
    let mut marked = skip_removes || !has_removes;
    for (n, op) in j.ops.iter().enumerate() {
        if crash_after == Some(n) {
            std::process::abort();
        }
        let is_remove = matches!(op, Op::Remove { .. });
        if is_remove && skip_removes {
            continue;
        }
        if !is_remove && !marked {
            fs::write(&removes_done, b"").at(&removes_done)?;
            sync_dir(&j.staging)?;
            marked = true;
        }
        run(j, n, op).map_err(|e| {
            Error::State(format!(
                "commit into {} stopped at {op:?}: {e}; the journal {} is kept and is replayed when the daemon starts again",
                j.root.display(),
                journal_file(branch_dir).display()
            ))
        })?;
    }
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
    // The old state file and the journal leave through the staging directory's trash when
    // it shares their filesystem: a removal frees the file inside the call (on ext4 about
    // 0.1 ms), which the staging directory's removal does later, off the request path.
    let trash = j.staging.join("trash");
    let _ = fs::hard_link(
        CommitState::file(branch_dir),
        trash.join("commit-state.json"),
    );
    // The new state and the target are on disk before the journal goes: a crash in between
    // replays the journal (idempotent) rather than forgetting what was committed.
    state.write(branch_dir)?;
    syncfs_both(&j.root, branch_dir)?;
    let jf = journal_file(branch_dir);
    fs::rename(&jf, trash.join("commit-journal.json"))
        .or_else(|_| fs::remove_file(&jf))
        .at(&jf)?;
    let _ = fs::remove_file(marker_file(branch_dir));
    // The journal's removal needs no sync of its own when the staging directory shares its
    // filesystem: that filesystem's metadata reaches the disk in order (ext4's and XFS's
    // journals), so a crash that brings the journal back brings this staging directory
    // back too, and the next commit's cannot have replaced it. Across two filesystems
    // there is no such order: the removal is made durable before a next commit reuses the
    // staging path.
    if device_of(&j.staging) != device_of(branch_dir) {
        sync_dir(branch_dir)?;
    }
    Ok(())
}

/// `path` in the commit's target, refused when a directory on its way is a symbolic link
/// (see [`super::within`]): nothing is written through one.
fn in_target(j: &Journal, path: &Path) -> std::io::Result<PathBuf> {
    super::within(&j.root, path).ok_or_else(|| {
        std::io::Error::other(format!(
            "{}: a directory on its way in the target is not a directory (a symbolic link?): nothing is written through it",
            path.display()
        ))
    })
}

/// One operation, idempotent.
fn run(j: &Journal, n: usize, op: &Op) -> std::io::Result<()> {
    match op {
        Op::Remove { path, ino } => {
            // (Under a symbolic link it is not in the workspace: nothing to remove.)
            let Some(p) = super::within(&j.root, path) else {
                return Ok(());
            };
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
            let p = in_target(j, path)?;
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => Ok(()),
                _ => fs::create_dir(&p),
            }
        }
        Op::Install { path, staged } => {
            let s = j.staging.join(staged);
            if fs::symlink_metadata(&s).is_ok() {
                let to = in_target(j, path)?;
                // Only a file no other name holds (one an earlier commit installed): one
                // with other names (the base layers' links) is not freed by the rename,
                // and its change time must move now, with the commit, not when the trash
                // goes (a branch started in between would take it for a host change).
                let alone = fs::symlink_metadata(&to).is_ok_and(|m| m.is_file() && m.nlink() == 1);
                if j.keep_replaced && alone {
                    // (A link already made by a run this replay repeats: the rename does
                    // what it did without it.)
                    let _ = fs::hard_link(&to, j.staging.join("trash").join(n.to_string()));
                }
                fs::rename(&s, to)?;
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
            let p = in_target(j, path)?;
            std::os::unix::fs::lchown(&p, Some(*uid), Some(*gid))?;
            // chmod follows a symbolic link (whose own mode means nothing): never one.
            if !fs::symlink_metadata(&p)?.is_symlink() {
                fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(*mode))?;
            }
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
        // Only a whole journal counts: one cut short by a crash was never synced, so the
        // commit did not happen.
        let whole = text.ends_with("}\n");
        match serde_json::from_str::<Journal>(&text) {
            Ok(j) if whole => {
                replay(branch_dir, &j).map_err(|e| Error::CommitIncomplete(e.to_string()))?;
                let _ = fs::remove_dir_all(&j.staging);
                return Ok(true);
            }
            _ => {
                log::warn!("{} is incomplete: the commit did not happen", jf.display());
                let _ = fs::remove_file(&jf);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("forkscope-journal-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn journal(dir: &Path) -> Journal {
        Journal {
            root: dir.join("target"),
            baseline: dir.join("target"),
            staging: dir.join("staging"),
            ops: vec![Op::Install {
                path: "f".into(),
                staged: "0".into(),
            }],
            state: CommitState::default(),
            target_process: None,
            keep_replaced: true,
        }
    }

    #[test]
    fn a_journal_cut_short_is_no_commit_and_its_staging_goes() {
        let dir = scratch("cut");
        let j = journal(&dir);
        fs::create_dir_all(&j.root).unwrap();
        fs::create_dir_all(&j.staging).unwrap();
        fs::write(j.staging.join("0"), "new").unwrap();
        fs::write(marker_file(&dir), j.staging.as_os_str().as_encoded_bytes()).unwrap();
        let text = serde_json::to_string(&j).unwrap() + "\n";
        fs::write(journal_file(&dir), &text[..text.len() / 2]).unwrap();
        assert!(!recover(&dir).unwrap(), "nothing replayed");
        assert!(!j.root.join("f").exists(), "target untouched");
        assert!(!j.staging.exists() && !journal_file(&dir).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_journal_back_after_its_commit_finished_is_recognised_and_goes() {
        // A crash undid the journal's removal (not synced) but kept the staging directory's:
        // the saved state says this commit was made.
        let dir = scratch("back");
        let mut j = journal(&dir);
        j.state.commits = 3;
        fs::create_dir_all(&j.root).unwrap();
        fs::write(j.root.join("f"), "committed").unwrap();
        let done = CommitState {
            commits: 3,
            ..Default::default()
        };
        done.save(&dir).unwrap();
        let text = serde_json::to_string(&j).unwrap() + "\n";
        fs::write(journal_file(&dir), &text).unwrap();
        assert!(recover(&dir).unwrap(), "the journal counts as replayed");
        assert!(!journal_file(&dir).exists(), "and it is gone");
        assert_eq!(fs::read_to_string(j.root.join("f")).unwrap(), "committed");
        assert_eq!(
            CommitState::load(&dir).unwrap(),
            done,
            "the state untouched"
        );

        // The same journal when the state is older: the commit was not finished, and its
        // staging directory is missing: refused, the journal kept.
        let older = CommitState {
            commits: 2,
            ..Default::default()
        };
        older.save(&dir).unwrap();
        fs::write(journal_file(&dir), &text).unwrap();
        let err = recover(&dir).unwrap_err().to_string();
        assert!(err.contains("staging directory"), "{err}");
        assert!(journal_file(&dir).exists(), "kept for a later recovery");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A staged commit of "new" over a target file "f" holding "old".
    fn replacing(tag: &str) -> (PathBuf, Journal) {
        let dir = scratch(tag);
        let j = journal(&dir);
        fs::create_dir_all(&j.root).unwrap();
        fs::create_dir_all(j.staging.join("trash")).unwrap();
        fs::write(j.root.join("f"), "old").unwrap();
        fs::write(j.staging.join("0"), "new").unwrap();
        fs::write(marker_file(&dir), j.staging.as_os_str().as_encoded_bytes()).unwrap();
        (dir, j)
    }

    #[test]
    fn an_install_into_the_host_keeps_the_replaced_file_in_the_trash_until_the_staging_goes() {
        let (dir, j) = replacing("trash");
        let applied = apply(&dir, &j).unwrap();
        assert_eq!(fs::read_to_string(j.root.join("f")).unwrap(), "new");
        assert_eq!(applied.staging, j.staging);
        // The replaced file, the journal: in the trash, for the caller to remove.
        let trash = j.staging.join("trash");
        assert_eq!(fs::read_to_string(trash.join("0")).unwrap(), "old");
        assert!(trash.join("commit-journal.json").exists());
        assert!(!journal_file(&dir).exists() && !marker_file(&dir).exists());
        assert_eq!(CommitState::load(&dir).unwrap().commits, j.state.commits);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_replaced_file_with_another_name_is_not_kept_in_the_trash() {
        // (A base layer's hard link: the rename frees nothing, and the file's change time
        // moves with the commit, not later when the trash goes.)
        let (dir, j) = replacing("linked");
        fs::hard_link(j.root.join("f"), dir.join("base-link")).unwrap();
        apply(&dir, &j).unwrap();
        assert_eq!(fs::read_to_string(j.root.join("f")).unwrap(), "new");
        assert!(!j.staging.join("trash/0").exists());
        let m = fs::metadata(dir.join("base-link")).unwrap();
        assert_eq!(
            (
                m.nlink(),
                fs::read_to_string(dir.join("base-link")).unwrap()
            ),
            (1, "old".into())
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_whole_journal_is_replayed_once_and_twice_gives_the_same() {
        let dir = scratch("whole");
        let j = journal(&dir);
        fs::create_dir_all(&j.root).unwrap();
        fs::create_dir_all(&j.staging).unwrap();
        fs::write(j.staging.join("0"), "new").unwrap();
        let text = serde_json::to_string(&j).unwrap() + "\n";
        fs::write(journal_file(&dir), &text).unwrap();
        assert!(recover(&dir).unwrap());
        assert_eq!(fs::read_to_string(j.root.join("f")).unwrap(), "new");
        // The same journal again (a crash after the ops, before the journal and the then
        // emptied staging directory were removed): no change.
        fs::create_dir_all(&j.staging).unwrap();
        fs::write(journal_file(&dir), &text).unwrap();
        assert!(recover(&dir).unwrap());
        assert_eq!(fs::read_to_string(j.root.join("f")).unwrap(), "new");
        let state = CommitState::load(&dir).unwrap();
        assert!(state.ours.contains_key(Path::new("f")));
        fs::remove_dir_all(&dir).unwrap();
    }
}
