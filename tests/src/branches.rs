//! A branch manager for tests that use the library directly: every branch it knows is
//! aborted when the test ends, passed or failed, so a failed assertion leaves no process
//! running (nor a pipe of the test runner held open by one).

use std::path::Path;

use forkscope::branch::{BranchRecord, Manager};

/// A [`Manager`] whose branches are aborted (newest first) when it is dropped.
pub struct Branches(Option<Manager>);

impl Branches {
    /// Opens the manager of state directory `state`.
    pub fn open(state: &Path) -> Self {
        Self(Some(Manager::open(state, &crate::forkscope()).unwrap()))
    }

    /// The manager, without aborting anything (as a daemon stops: its branches run on).
    pub fn release(mut self) -> Manager {
        self.0.take().expect("held until released")
    }
}

/// Runs root branch `name` on workspace `ws` with a command that only waits (`sleep 1000`).
pub fn sleeping(m: &mut Manager, name: &str, ws: &Path) -> BranchRecord {
    m.run(Some(name.into()), ws, vec!["sleep".into(), "1000".into()])
        .unwrap()
}

/// Aborts every branch of `m`, newest first (children before their parents).
pub fn abort_all(m: &mut Manager) {
    let mut all = m.list().unwrap_or_default();
    all.sort_by_key(|b| std::cmp::Reverse(b.record.id));
    for b in all {
        let _ = m.abort(&b.record.name);
    }
}

impl std::ops::Deref for Branches {
    type Target = Manager;
    fn deref(&self) -> &Manager {
        self.0.as_ref().expect("held until released")
    }
}

impl std::ops::DerefMut for Branches {
    fn deref_mut(&mut self) -> &mut Manager {
        self.0.as_mut().expect("held until released")
    }
}

impl Drop for Branches {
    fn drop(&mut self) {
        if let Some(m) = self.0.as_mut() {
            abort_all(m);
        }
    }
}
