//! The exploration demo (scripts/explore.py, which the README's first command runs through
//! scripts/demo) against a real daemon: it exits 0 and the host project then holds exactly
//! the winning fix; a candidate's branch that dies mid-demo is reported, and nothing is left.

use std::process::Command;

use forkscope_tests::{TempDir, daemon::Daemon, require_root};

/// Runs scripts/explore.py in `dir/work` against a new daemon, with `env` added.
fn run_demo(dir: &TempDir, env: &[(&str, &std::ffi::OsStr)]) -> (Daemon, std::process::Output) {
    let d = Daemon::start(dir.path());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/explore.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(dir.path().join("work"))
        .env("FORKSCOPE_SOCKET", &d.socket)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (d, out)
}

#[test]
fn the_demo_commits_exactly_the_winning_fix_to_the_host_project() {
    require_root();
    let dir = TempDir::new_in(std::path::Path::new("/var/tmp"), "demo");
    let work = dir.path().join("work");
    let (bin, out_dir) = (forkscope_tests::forkscope(), dir.path().join("out"));
    let (d, out) = run_demo(
        &dir,
        &[
            ("FORKSCOPE_BIN", bin.as_os_str()),
            ("FORKSCOPE_DEMO_OUT", out_dir.as_os_str()),
        ],
    );
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
    // The tree's trace, report and chart, written before the losers were aborted: the root
    // and its four candidates, its four forks and the two commits.
    let out = &out_dir;
    let report = std::fs::read_to_string(out.join("report.txt")).unwrap();
    assert!(
        report.starts_with("forkscope report: 5 branches"),
        "{report}"
    );
    assert_eq!(report.matches("forks (4)").count(), 1, "{report}");
    assert_eq!(report.matches("commits (1)").count(), 2, "{report}");
    let svg = std::fs::read_to_string(out.join("tree.svg")).unwrap();
    assert_eq!(svg.matches(r#"class="branch""#).count(), 5);
    assert_eq!(svg.matches(r#"class="fork""#).count(), 4);
    let trace = std::fs::read_to_string(out.join("exploration.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&trace).unwrap();
    assert!(doc["traceEvents"].as_array().is_some_and(|e| !e.is_empty()));
    assert!(
        stdout.contains("branch tree over time") && stdout.contains("tree.svg"),
        "{stdout}"
    );
}

/// Runs the demo with candidate `crash`'s branch killed (its cgroup's `cgroup.kill`) as it
/// starts; returns (exit code, stdout, the project's calc.py), after checking that no branch
/// is left behind.
fn demo_with_a_crash(crash: &str) -> (i32, String, String) {
    let dir = TempDir::new_in(std::path::Path::new("/var/tmp"), "demo-crash");
    let work = dir.path().join("work");
    let (d, out) = run_demo(&dir, &[("FORKSCOPE_DEMO_CRASH", crash.as_ref())]);
    assert_eq!(d.ok(&["ls", "--json"]).trim(), "[]", "no branch is left");
    let calc = std::fs::read_to_string(work.join("proj/calc.py")).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        calc,
    )
}

#[test]
fn a_branch_that_dies_mid_demo_is_reported_and_the_others_go_on() {
    require_root();
    let (code, stdout, calc) = demo_with_a_crash("multiply");
    assert_eq!(code, 0, "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("fix-multiply"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        line.contains("FAILED") && line.contains("the branch's init is gone"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fix-plus") && stdout.contains("PASS"),
        "{stdout}"
    );
    assert_eq!(calc, "def add(a, b):\n    return a + b\n");
}

#[test]
fn when_the_winning_branch_dies_nothing_is_committed() {
    require_root();
    let (code, stdout, calc) = demo_with_a_crash("plus");
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("nothing committed"), "{stdout}");
    assert_eq!(
        calc, "def add(a, b):\n    return a - b\n",
        "the project as it was"
    );
}
