//! The controller's view of dirtied pages through the library (`forkscope::bpf::Probe`):
//! reading the set, counting it, starting a new epoch, and a fork write-protecting pages so
//! they count again in the new epoch; descendants of a registered cgroup are traced too.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
};

use forkscope::{
    bpf::{Probe, ProbeOptions},
    cgroup::Cgroup,
};
use forkscope_tests::require_root;

/// A Python process in `cg` that, on each line of stdin, runs one command:
/// `touch` writes page-sized chunks of its 64-page buffer, `fork` forks (the child exits at
/// once), and answers `ok <buffer address>`.
const SCRIPT: &str = r#"
import mmap, os, sys, ctypes
buf = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "touch":
        for i in range(64):
            buf[i * 4096] = 1
    elif cmd == "fork":
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    print("ok", addr, flush=True)
"#;

fn ask(stdin: &mut impl Write, stdout: &mut impl BufRead, cmd: &str) -> u64 {
    writeln!(stdin, "{cmd}").unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    line.split_whitespace()
        .nth(1)
        .expect("ok <addr>")
        .parse()
        .unwrap()
}

#[test]
fn new_epoch_forgets_pages_and_a_fork_makes_them_count_again() {
    require_root();
    let mut probe = Probe::load(&ProbeOptions::default()).expect("load eBPF programs");
    probe.attach().expect("attach");
    let cg = Cgroup::create(&format!("epoch-test-{}", std::process::id())).unwrap();
    probe.track(cg.id(), true).unwrap();
    let procs = cg.path().join("cgroup.procs");
    let mut child = Command::new("sh")
        .args([
            "-c",
            &format!(
                "echo $$ > {} && exec python3 -c '{SCRIPT}'",
                procs.display()
            ),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let pid = child.id();
    let id = cg.id();
    let in_cg = move |c: u64| c == id;
    let buffer_pages = |probe: &Probe, base: u64| -> usize {
        let first = base >> 12;
        probe
            .dirty_pages(in_cg)
            .unwrap()
            .iter()
            .filter(|k| k.proc.tgid == pid && (first..first + 64).contains(&k.page))
            .count()
    };

    let base = ask(&mut stdin, &mut stdout, "touch");
    assert_eq!(
        buffer_pages(&probe, base),
        64,
        "the 64 written pages are in the set"
    );
    let counts = probe.page_counts(in_cg).unwrap();
    let total = counts
        .iter()
        .find(|(k, _)| k.tgid == pid)
        .map(|(_, v)| *v)
        .unwrap();
    let all = probe
        .dirty_pages(in_cg)
        .unwrap()
        .iter()
        .filter(|k| k.proc.tgid == pid)
        .count() as u64;
    assert_eq!(total, all, "the count equals the size of the set");

    probe.new_epoch(in_cg).unwrap();
    assert_eq!(buffer_pages(&probe, base), 0, "a new epoch forgets the set");
    ask(&mut stdin, &mut stdout, "touch");
    assert_eq!(
        buffer_pages(&probe, base),
        0,
        "pages already writable do not fault again"
    );

    ask(&mut stdin, &mut stdout, "fork");
    probe.new_epoch(in_cg).unwrap();
    ask(&mut stdin, &mut stdout, "touch");
    assert_eq!(
        buffer_pages(&probe, base),
        64,
        "after a fork every page written counts again"
    );

    drop(stdin);
    child.wait().unwrap();
    probe.untrack(cg.id()).unwrap();
    cg.remove().unwrap();
}

#[test]
fn descendants_of_a_registered_cgroup_are_traced() {
    require_root();
    let dir = forkscope_tests::TempDir::new("nested");
    // The command moves itself into a cgroup below the traced one, then writes.
    let script = "cg=\"$0$(sed -n 's/^0:://p' /proc/self/cgroup)\"; \
        mkdir \"$cg/nested\" && echo $$ > \"$cg/nested/cgroup.procs\" && echo deep > f.txt; \
        mkdir -p \"$cg/nested/left/behind\"";
    let root = forkscope_tests::cgroup2_root();
    let run = forkscope_tests::trace(
        dir.path(),
        &[],
        &["sh", "-c", script, root.to_str().unwrap()],
    );
    assert_eq!(run.code(), Some(0), "{}", run.stderr());
    let f = dir.path().join("f.txt").to_string_lossy().into_owned();
    let write = run
        .of_kind("file_write")
        .find(|e| e["path"] == f.as_str())
        .expect("the nested write is traced");
    let first = run.events.first().unwrap();
    assert_ne!(
        write["cgroup"], first["cgroup"],
        "the write came from the nested cgroup"
    );
}
