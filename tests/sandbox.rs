//! A branch's sandbox on the real kernel: the workspace and /tmp are private overlays, the
//! rest of the host is read-only and cannot be remounted, host processes are invisible, and
//! killing the cgroup leaves no mount, process or cgroup behind.

use std::{
    fs,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use forkscope::{
    cgroup::Cgroup,
    sandbox::{
        SandboxSpec, StackSpec,
        control::{ExecReply, ExecRequest, exec},
        start,
    },
};
use forkscope_tests::{TempDir, forkscope, require_root};

struct Branch {
    _state: TempDir,
    workspace: PathBuf,
    control: PathBuf,
    cgroup: Option<Cgroup>,
    init_pid: u32,
}

fn stack(root: &Path, name: &str, lower: PathBuf) -> StackSpec {
    let dir = root.join(name);
    for d in ["upper", "work"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    StackSpec {
        lowers: vec![lower],
        upper: dir.join("upper"),
        work: dir.join("work"),
    }
}

fn branch(tag: &str) -> Branch {
    require_root();
    let state = TempDir::new(tag);
    let workspace = state.path().join("ws");
    fs::create_dir_all(&workspace).unwrap();
    fs::write(workspace.join("base.txt"), "from the host\n").unwrap();
    let empty = state.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let spec = SandboxSpec {
        workspace: workspace.clone(),
        workspace_stack: stack(state.path(), "ws-layers", workspace.clone()),
        tmp_stack: stack(state.path(), "tmp-layers", empty),
        control: state.path().join("control.sock"),
        command: vec!["sleep".into(), "1000".into()],
        log: state.path().join("cmd.log"),
        hidden: Vec::new(),
        nest_in: None,
        deferred: None,
        net_isolated: false,
        file_mounts: Vec::new(),
        defer: false,
        cgroup: None,
    };
    let cgroup = Cgroup::create(&format!("sandbox-test-{}-{tag}", std::process::id())).unwrap();
    let sandbox = start(
        &forkscope(),
        &spec,
        &state.path().join("spec.json"),
        &cgroup,
    )
    .expect("sandbox starts");
    Branch {
        workspace,
        control: sandbox.control,
        cgroup: Some(cgroup),
        init_pid: sandbox.init_pid,
        _state: state,
    }
}

/// Runs `sh -c script` in the branch; returns (exit code, stdout).
/// Runs `sh -c script` in the branch.
fn sh(b: &Branch, script: &str) -> (i32, String) {
    forkscope_tests::exec_sh(&b.control, script)
}

#[test]
fn the_workspace_and_tmp_are_private_and_the_host_is_read_only() {
    let b = branch("private");
    let (code, out) = sh(
        &b,
        "pwd; cat base.txt; echo branch > new.txt; echo t > /tmp/branch-tmp; cat new.txt",
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        format!("{}\nfrom the host\nbranch\n", b.workspace.display())
    );
    assert!(
        !b.workspace.join("new.txt").exists(),
        "the host workspace is untouched"
    );
    assert!(
        !Path::new("/tmp/branch-tmp").exists(),
        "the branch's /tmp is its own"
    );
    let (_, out) = sh(&b, "cat new.txt /tmp/branch-tmp");
    assert_eq!(out, "branch\nt\n", "a later exec sees the same branch");
    // Outside the workspace and /tmp, nothing is writable, and the mounts cannot be changed.
    let (code, out) = sh(
        &b,
        "echo x > /etc/forkscope-escape 2>&1; echo $?; touch /var/forkscope-escape; echo $?",
    );
    assert_eq!(code, 0);
    assert!(
        out.lines().all(|l| l != "0"),
        "writes outside the workspace failed: {out}"
    );
    assert!(!Path::new("/etc/forkscope-escape").exists());
    let (code, out) = sh(
        &b,
        "mount -o remount,rw / 2>&1; echo $?; umount /tmp 2>&1; echo $?",
    );
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .filter(|l| l.parse::<i32>().is_ok())
            .all(|l| l != "0"),
        "remount/umount refused: {out}"
    );
}

#[test]
fn host_processes_are_invisible_and_unreachable() {
    let b = branch("pidns");
    let me = std::process::id();
    let script = format!("echo $$; kill -0 {me} 2>/dev/null; echo $?; ls /proc | grep -c '^[0-9]'");
    let (_, out) = sh(&b, &script);
    let n: Vec<u32> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert!(
        n[0] < 10,
        "the shell has a pid of the branch's own namespace: {out}"
    );
    assert_eq!(n[1], 1, "signalling a host process fails: {out}");
    assert!(
        n[2] < 10,
        "only the branch's processes are visible in /proc: {out}"
    );
}

#[test]
fn the_branch_has_a_dev_of_its_own_and_no_host_device_or_terminal() {
    // A terminal of the host's (the test's own), to be looked for from inside.
    // SAFETY: posix_openpt returns a new descriptor (checked), closed at the end.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(m >= 0);
    // SAFETY: `m` is an open pty master.
    let n = unsafe {
        assert_eq!(libc::unlockpt(m), 0);
        let mut n: libc::c_uint = 0;
        assert_eq!(libc::ioctl(m, libc::TIOCGPTN, &mut n), 0);
        n
    };
    let b = branch("dev");
    let script = format!(
        "ls /dev | tr '\\n' ' '; echo; ls /dev/pts | tr '\\n' ' '; echo; \
         for d in /dev/pts/{n} /dev/console /dev/tty1 /dev/kvm /dev/loop0 /dev/vda /dev/sda /dev/mem; do \
           (exec 3<>$d) 2>/dev/null && echo \"$d reachable\"; done; \
         python3 -c 'import os; m, s = os.openpty(); print(os.ttyname(s))'; \
         echo ok > /dev/shm/x && cat /dev/shm/x && echo gone > /dev/null && head -c 4 /dev/zero | wc -c"
    );
    let (code, out) = sh(&b, &script);
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(m) };
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].trim(),
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"
    );
    assert_eq!(
        lines[1].trim(),
        "ptmx",
        "a terminal instance of its own, empty"
    );
    assert!(!out.contains("reachable"), "{out}");
    // Terminals work inside (python's openpty), numbered in the branch's own instance.
    assert_eq!(lines[2], "/dev/pts/0");
    assert_eq!(&lines[3..], ["ok", "4"]);
}

#[test]
fn killing_the_cgroup_leaves_nothing_behind() {
    let mut b = branch("cleanup");
    let (code, _) = sh(&b, "true");
    assert_eq!(code, 0);
    let init = b.init_pid;
    b.cgroup.take().unwrap().remove().unwrap();
    // The cgroup is empty once its tasks left it, which they do on their way out: the init
    // may still be finishing its exit for a moment, then it is a zombie or gone.
    let gone = || {
        let stat = fs::read_to_string(format!("/proc/{init}/stat")).unwrap_or_default();
        (
            stat.is_empty() || stat.contains(") Z") || stat.contains(") X"),
            stat,
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !gone().0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (gone, stat) = gone();
    assert!(gone, "init still running: {stat}");
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&*b.workspace.to_string_lossy()),
        "no mount of the workspace remains"
    );
}

#[test]
fn exit_codes_and_missing_commands_come_back() {
    let b = branch("codes");
    assert_eq!(sh(&b, "exit 7").0, 7);
    let null = fs::File::open("/dev/null").unwrap();
    let req = ExecRequest {
        argv: vec!["no-such-command-xyz".into()],
        ..Default::default()
    };
    let fds = [null.as_raw_fd(), null.as_raw_fd(), null.as_raw_fd()];
    assert_eq!(
        exec(&b.control, &req, fds, |_| {}).unwrap(),
        ExecReply::Error("no-such-command-xyz: No such file or directory (os error 2)".into())
    );
    // A request too large for the init is refused before it is sent, saying what to do.
    let req = ExecRequest {
        argv: vec!["echo".into(), "x".repeat(100 * 1024)],
        ..Default::default()
    };
    let err = exec(&b.control, &req, fds, |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("at most 64 KiB") && err.contains("file"),
        "{err}"
    );
    // The init still serves.
    assert_eq!(sh(&b, "exit 3").0, 3);
}

#[test]
fn escapes_and_tracer_blinding_are_refused_and_normal_work_goes_on() {
    let b = branch("seccomp");
    // Each line: name, then the errno the call failed with (0 = it succeeded).
    let probe = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def try_(name, nr, *args):
    r = libc.syscall(nr, *args)
    print(name, 0 if r >= 0 else ctypes.get_errno())
try_("mount", 165, b"none", b"/mnt", b"tmpfs", 0, None)
try_("umount2", 166, b"/tmp", 0)
try_("chroot", 161, b"/")
try_("setns", 308, 0, 0)
try_("unshare", 272, 0x10000000)
try_("bpf", 321, 0, 0, 0)
try_("perf_event_open", 298, 0, 0, -1, -1, 0)
try_("io_uring_setup", 425, 1, 0)
try_("fsopen", 430, b"tmpfs", 0)
try_("clone3", 435, 0, 0)
try_("clone_newns", 56, 0x00020000 | 17, 0, 0, 0, 0)
"#;
    let (code, out) = sh(&b, &format!("python3 -c '{probe}'"));
    assert_eq!(code, 0, "{out}");
    let errnos: std::collections::BTreeMap<&str, i32> = out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, e)| (n, e.parse().unwrap()))
        .collect();
    for name in [
        "mount",
        "umount2",
        "chroot",
        "setns",
        "unshare",
        "bpf",
        "perf_event_open",
        "io_uring_setup",
        "fsopen",
        "clone_newns",
    ] {
        assert_eq!(
            errnos[name],
            libc::EPERM,
            "{name} must fail with EPERM: {out}"
        );
    }
    assert_eq!(
        errnos["clone3"],
        libc::ENOSYS,
        "clone3 answers ENOSYS so glibc falls back to clone"
    );
    // Ordinary work is unaffected: processes, pipes, threads, a git repository.
    let (code, out) = sh(
        &b,
        "python3 -c 'import subprocess, threading; t = threading.Thread(target=print); t.start(); t.join(); \
         print(subprocess.run([\"echo\", \"child\"], capture_output=True, text=True).stdout.strip())' && \
         git init -q repo && cd repo && echo x > f && git add f && git -c user.name=a -c user.email=a@b commit -qm m && git log --oneline | wc -l",
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "\nchild\n1\n");
}

/// The filter is for x86_64 syscalls: a 32-bit one (`int $0x80`, i386 numbering: 310 is
/// unshare there, and 21 mount) must not slip past it. The process is killed (SIGSYS) or
/// the call fails; it never runs.
#[test]
fn a_32_bit_syscall_does_not_slip_past_the_filter() {
    // Without ia32 emulation `int $0x80` faults (SIGSEGV) everywhere: nothing to test.
    let host = std::process::Command::new("python3")
        .args([
            "-c",
            "import ctypes, mmap\n\
             m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n\
             m.write(bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3]))\n\
             ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(m)))()",
        ])
        .status()
        .expect("python3");
    if std::os::unix::process::ExitStatusExt::signal(&host) == Some(libc::SIGSEGV) {
        eprintln!("skipped: this kernel runs no 32-bit syscalls (ia32 emulation is off)");
        return;
    }
    assert!(
        host.success(),
        "an i386 getpid outside any branch failed: {host}"
    );
    let b = branch("seccomp-i386");
    // push rbx; mov eax, 310; mov ebx, 0x20000 (CLONE_NEWNS); int 0x80; pop rbx; ret
    let probe = r#"
import ctypes, mmap, os
before = os.readlink("/proc/self/ns/mnt")
code = bytes([0x53, 0xB8, 0x36, 0x01, 0, 0, 0xBB, 0, 0, 0x02, 0, 0xCD, 0x80, 0x5B, 0xC3])
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(code)
r = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(m)))()
print("returned", r, before == os.readlink("/proc/self/ns/mnt"))
"#;
    let (code, out) = sh(&b, &format!("python3 -c '{probe}'; echo status $?"));
    assert_eq!(code, 0, "{out}");
    let killed = out.contains("status 159"); // 128 + SIGSYS
    let refused = out.lines().any(|l| {
        l.strip_prefix("returned ")
            .and_then(|r| r.split_once(' '))
            .is_some_and(|(ret, same)| ret.starts_with('-') && same == "True")
    });
    assert!(
        killed || refused,
        "an i386 unshare from inside a branch must be killed or refused: {out}"
    );
    eprintln!(
        "i386 unshare in a branch: {}",
        if killed {
            "killed by SIGSYS"
        } else {
            "refused"
        }
    );
}
