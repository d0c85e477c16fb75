//! One daemon per state directory, and a crashed daemon's place is free at once: the lock
//! is the process's, so what the daemon forked before it died does not keep it.
//!
//! (Its own test binary: it forks, and no other test's threads may hold a lock then.)

use std::{io::Read, os::fd::FromRawFd};

use forkscope::state::Registry;
use forkscope_tests::{KillOnDrop, TempDir};

#[test]
fn a_crashed_daemons_children_do_not_keep_its_state_directory() {
    let dir = TempDir::new("state-lock");
    let state = dir.path().join("state");
    let mut fds = [0; 2];
    // SAFETY: pipe() fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only opens the registry, forks and dies; this test binary runs no
    // other test, so no other thread holds a lock the child would need.
    let daemon = unsafe { libc::fork() };
    assert!(daemon >= 0);
    if daemon == 0 {
        // The "daemon": opens its registry, forks a child that has not exec'd yet (a spawn
        // caught in the middle) and is killed.
        let registry = Registry::open(&state);
        let mut told = String::from("refused");
        if registry.is_ok() {
            // SAFETY: fork in a single-threaded process.
            match unsafe { libc::fork() } {
                0 => {
                    // SAFETY: close(2), sleep(3) and _exit(2) are async-signal-safe.
                    unsafe {
                        // (So that the test's read below ends when the daemon dies.)
                        libc::close(fds[1]);
                        libc::sleep(30);
                        libc::_exit(0);
                    }
                }
                -1 => told = String::from("no fork"),
                child => told = child.to_string(),
            }
        }
        // SAFETY: a write of a live buffer to our pipe; then the crash.
        unsafe {
            libc::write(fds[1], told.as_ptr().cast(), told.len());
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    // SAFETY: the write end is ours and closed once; the read end is moved into a File.
    unsafe { libc::close(fds[1]) };
    // SAFETY: fds[0] is open and owned by nothing else.
    let mut from_daemon = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    let mut told = String::new();
    from_daemon.read_to_string(&mut told).unwrap();
    let orphan: i32 = told
        .parse()
        .unwrap_or_else(|_| panic!("the first registry opens and forks: {told}"));
    assert!(orphan > 0, "{told}");
    // Killed whatever happens below.
    let _orphan = KillOnDrop(orphan);
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(daemon, &mut status, 0) }, daemon);
    assert!(libc::WIFSIGNALED(status), "the daemon was killed");
    // Its child lives on, with a copy of every descriptor the daemon had...
    let alive = std::path::Path::new(&format!("/proc/{orphan}")).exists();
    // ...yet the next daemon opens the registry at once.
    let next = Registry::open(&state);
    assert!(
        alive,
        "the crashed daemon's child is alive while the next one opens"
    );
    let next = next.unwrap_or_else(|e| panic!("the restarted daemon was refused: {e}"));
    // While it is open, another process is refused, and told who holds the directory.
    let again = std::process::Command::new(forkscope_tests::forkscope())
        .args(["daemon", "--state-dir"])
        .arg(&state)
        .arg("--socket")
        .arg(dir.path().join("api.sock"))
        .args(["--metrics-addr", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(
        err.contains(&format!(
            "another forkscope daemon (pid {})",
            std::process::id()
        )),
        "{err}"
    );
    // And so is a second registry in this process; the first one is still held after that.
    let second = Registry::open(&state)
        .err()
        .expect("a second registry is refused");
    assert!(
        second.to_string().contains("another forkscope daemon"),
        "{second}"
    );
    drop(next);
    Registry::open(&state).expect("a closed registry frees the directory");
}
