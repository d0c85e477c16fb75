//! One set of the daemon's programs that are attached only while some traced cgroup needs
//! them ([`crate::bpf::HookSet`]): who wants them, whether they are attached, and the
//! delayed detach once nobody does (a grace period, so a branch started right after another
//! went does not wait for them again; at once when the daemon stops).

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    bpf::{HookSet, HooksState, Probe},
    error::Result,
};

/// Who needs the set, and whether it is attached.
#[derive(Default)]
struct State {
    /// Tracked cgroups that need it.
    wanted_by: HashSet<u64>,
    attached: bool,
    /// The thread releasing the links, while it runs.
    detaching: Option<JoinHandle<()>>,
    /// When the pending delayed detach is due, while its timer thread waits (one thread
    /// however many releases come meanwhile: each later one moves the time).
    detach_due: Option<Instant>,
}

/// One on-demand set of a pinned probe.
pub struct OnDemand {
    set: HookSet,
    pin_dir: PathBuf,
    grace: Duration,
    state: Arc<Mutex<State>>,
}

impl OnDemand {
    /// The set as the pins under `pin_dir` have it: attached or not (a half-attached set,
    /// left by a daemon killed while attaching or detaching it, is detached).
    pub fn new(set: HookSet, pin_dir: PathBuf, grace: Duration) -> Self {
        let attached = match Probe::hooks_state(&pin_dir, set) {
            HooksState::Attached => true,
            HooksState::Detached => false,
            HooksState::Partial => {
                log::info!(
                    "detaching the {} an earlier daemon left half attached",
                    set.describe()
                );
                Probe::detach_pinned(&pin_dir, set);
                false
            }
        };
        Self {
            set,
            pin_dir,
            grace,
            state: Arc::new(Mutex::new(State {
                attached,
                ..State::default()
            })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that cgroup `id` needs the set, attaching it (through `probe`) if it is not.
    pub fn want(&self, id: u64, probe: &Mutex<Probe>) -> Result<()> {
        let mut state = self.state();
        if !state.attached {
            if let Some(d) = state.detaching.take() {
                let _ = d.join();
            }
            let t = Instant::now();
            let mut probe = probe.lock().unwrap_or_else(|p| p.into_inner());
            probe.attach_pinned(&self.pin_dir, self.set)?;
            log::info!("{} attached in {:?}", self.set.describe(), t.elapsed());
            state.attached = true;
        }
        state.wanted_by.insert(id);
        Ok(())
    }

    /// Notes that cgroup `id` no longer needs the set; when nothing does, it is detached
    /// after the grace period unless something asks for it meanwhile.
    pub fn release(&self, id: u64) {
        let mut state = self.state();
        // A cgroup that never wanted the set (a branch without per-write detail, a
        // checkpoint) changes nothing: it must not push a pending detach back.
        if state.wanted_by.remove(&id) {
            self.detach_later(&mut state);
        }
    }

    /// Detaches the set after the grace period if nothing wants it then (called once the
    /// branches are tracked again after a restart).
    pub fn settle(&self) {
        let mut state = self.state();
        self.detach_later(&mut state);
    }

    fn detach_later(&self, state: &mut State) {
        if !state.wanted_by.is_empty() || !state.attached {
            return;
        }
        let Some(due) = Instant::now().checked_add(self.grace) else {
            return; // a grace period beyond any clock: attached for good
        };
        if state.detach_due.replace(due).is_some() {
            return; // the waiting timer sees the new time
        }
        let (shared, dir, set) = (self.state.clone(), self.pin_dir.clone(), self.set);
        let timer = std::thread::Builder::new()
            .name("forkscope-detach".into())
            .spawn(move || {
                let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
                // Until the time last asked for has passed.
                while let Some(due) = state.detach_due {
                    let now = Instant::now();
                    if now >= due {
                        break;
                    }
                    drop(state);
                    std::thread::sleep(due - now);
                    state = shared.lock().unwrap_or_else(|p| p.into_inner());
                }
                state.detach_due = None;
                if !state.wanted_by.is_empty() || !state.attached {
                    return;
                }
                state.attached = false;
                state.detaching = Some(std::thread::spawn(move || {
                    let t = Instant::now();
                    Probe::detach_pinned(&dir, set);
                    log::info!(
                        "{} detached in {:?} (no branch needs them)",
                        set.describe(),
                        t.elapsed()
                    );
                }));
            });
        if let Err(e) = timer {
            state.detach_due = None;
            log::warn!(
                "could not schedule detaching the {}: {e}",
                self.set.describe()
            );
        }
    }

    /// Whether the set is attached now (also while it is being detached: the kernel
    /// releases the links one by one).
    pub fn attached(&self) -> bool {
        let state = self.state();
        state.attached || state.detaching.as_ref().is_some_and(|d| !d.is_finished())
    }

    /// At the daemon's stop: waits for a detach under way, and detaches the set if nothing
    /// needs it (inside a grace period no timer would do it after this process).
    pub fn stop(&self) {
        let mut state = self.state();
        if let Some(d) = state.detaching.take() {
            let _ = d.join();
        }
        if state.attached && state.wanted_by.is_empty() {
            state.attached = false;
            Probe::detach_pinned(&self.pin_dir, self.set);
        }
    }
}
