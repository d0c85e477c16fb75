//! The Python client (clients/python) against a real daemon: its own test suite run with
//! python3, after the package is installed with pip into a scratch directory.

use std::process::Command;

use forkscope_tests::{TempDir, daemon::Daemon, require_root};

#[test]
fn the_python_clients_tests_pass_against_a_real_daemon() {
    require_root();
    let dir = TempDir::new("python-client");
    let d = Daemon::start(dir.path());
    let client = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python");
    // Installed from a copy: pip writes build files next to the sources it builds.
    let source = dir.path().join("client-src");
    let copied = Command::new("cp")
        .arg("-r")
        .arg(&client)
        .arg(&source)
        .status()
        .unwrap();
    assert!(copied.success());
    // Installable with pip from its folder (no dependencies; pip fetches its build tools).
    let site = dir.path().join("site");
    let out = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
        .arg(&site)
        .arg(&source)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "pip install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tests_dir = dir.path().join("work");
    std::fs::create_dir_all(&tests_dir).unwrap();
    let out = Command::new("python3")
        .args(["-m", "unittest", "-v", "test_client"])
        .current_dir(client.join("tests"))
        .env("PYTHONPATH", &site)
        .env("FORKSCOPE_SOCKET", &d.socket)
        .env("FORKSCOPE_TEST_DIR", &tests_dir)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    // Every test ran (none skipped).
    assert!(
        report.contains("Ran 8 tests") && !report.contains("skipped"),
        "{report}"
    );
}
