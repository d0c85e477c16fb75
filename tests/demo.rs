//! The exploration demo (scripts/explore.py, which the README's first command runs through
//! scripts/demo) against a real daemon: it exits 0 and the host project then holds exactly
//! the winning fix.

use std::process::Command;

use forkscope_tests::{TempDir, daemon::Daemon, require_root};

#[test]
fn the_demo_commits_exactly_the_winning_fix_to_the_host_project() {
    require_root();
    let dir = TempDir::new_in(std::path::Path::new("/var/tmp"), "demo");
    let d = Daemon::start(dir.path());
    let work = dir.path().join("work");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/explore.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&work)
        .env("FORKSCOPE_SOCKET", &d.socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("fix-plus") && stdout.contains("PASS"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(work.join("proj/calc.py")).unwrap(),
        "def add(a, b):\n    return a + b\n"
    );
    // Nothing else of the candidates reached the project, and no branch is left.
    let names: Vec<String> = std::fs::read_dir(work.join("proj"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["calc.py", "test_calc.py"]);
    assert_eq!(d.ok(&["ls", "--json"]).trim(), "[]");
}
