//! Branched workspaces on real overlay mounts: a snapshot layer gives a child exactly the
//! parent's view at the fork point, later changes on either side stay invisible to the
//! other, a second snapshot copies only the delta (deletions as whiteouts), and the diff of
//! a branch lists what it added, modified and deleted.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt, symlink},
    path::{Path, PathBuf},
};

use forkscope::layers::{
    diff::{ChangeKind, changes},
    overlay::{Stack, unmount},
    snapshot::{Manifest, snapshot, snapshot_clock_ns},
};
use forkscope_tests::{TempDir, require_root};

/// The merged view of a directory tree: path -> type, mode and content or link target.
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            let desc = if m.is_dir() {
                walk(root, &p, out);
                format!("dir {:o}", m.mode() & 0o7777)
            } else if m.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&p).unwrap().display())
            } else {
                format!(
                    "file {:o} {}",
                    m.mode() & 0o7777,
                    fs::read_to_string(&p).unwrap()
                )
            };
            out.insert(rel, desc);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Longer than a tick of the coarse clock file times come from.
const TICK: std::time::Duration = std::time::Duration::from_millis(30);

/// A mounted overlay, unmounted on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = unmount(&self.0);
    }
}

/// Mounts `lowers` under a fresh upper directory in `state/name`; returns (merged, upper).
fn mount(state: &Path, name: &str, lowers: Vec<PathBuf>) -> (Mounted, PathBuf) {
    let dir = state.join(name);
    for d in ["upper", "work", "merged"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    let stack = Stack {
        lowers,
        upper: dir.join("upper"),
        work: dir.join("work"),
    };
    stack.mount(&dir.join("merged")).expect("mount overlay");
    (Mounted(dir.join("merged")), dir.join("upper"))
}

fn write(p: PathBuf, s: &str) {
    fs::write(p, s).unwrap();
}

#[test]
fn snapshots_fork_a_workspace_exactly_and_isolate_both_sides() {
    require_root();
    let state = TempDir::new("layers");
    let base = state.path().join("base");
    for d in ["dir/sub", "deldir"] {
        fs::create_dir_all(base.join(d)).unwrap();
    }
    for (f, c) in [
        ("a.txt", "A"),
        ("keep.txt", "K"),
        ("dir/x", "X"),
        ("dir/sub/y", "Y"),
        ("del.txt", "D"),
        ("deldir/z", "Z"),
    ] {
        write(base.join(f), c);
    }
    let (parent, parent_upper) = mount(state.path(), "parent", vec![base.clone()]);
    let p = parent.0.clone();

    // The parent changes everything a program can.
    write(p.join("a.txt"), "A2");
    write(p.join("new.txt"), "N");
    fs::remove_file(p.join("del.txt")).unwrap();
    fs::remove_dir_all(p.join("deldir")).unwrap();
    fs::create_dir(p.join("newdir")).unwrap();
    write(p.join("newdir/f"), "F");
    symlink("a.txt", p.join("link")).unwrap();
    fs::set_permissions(p.join("keep.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_dir_all(p.join("dir")).unwrap();
    fs::create_dir(p.join("dir")).unwrap();
    write(p.join("dir/fresh"), "R");

    // Fork 1. (Changes within the clock tick of a snapshot are copied again by the next one,
    // which is harmless; the pause keeps this test's delta exact.)
    std::thread::sleep(TICK);
    let t1 = snapshot_clock_ns();
    let layer1 = state.path().join("layer1");
    let (m1, s1) = snapshot(&parent_upper, None, &Manifest::default(), &layer1).unwrap();
    let at_fork = tree(&p);
    let (child, child_upper) = mount(state.path(), "child", vec![layer1.clone(), base.clone()]);
    assert_eq!(
        tree(&child.0),
        at_fork,
        "the child sees the parent's files at the fork point"
    );
    assert!(s1.entries >= 9, "{s1:?}");

    // Both sides go on; neither sees the other.
    write(p.join("new.txt"), "N2");
    fs::remove_file(p.join("newdir/f")).unwrap();
    write(p.join("after.txt"), "later");
    assert_eq!(
        tree(&child.0),
        at_fork,
        "the parent's later changes are invisible to the child"
    );
    write(child.0.join("child-only.txt"), "C");
    fs::remove_file(child.0.join("a.txt")).unwrap();
    write(child.0.join("keep.txt"), "K-child");
    assert!(
        !p.join("child-only.txt").exists(),
        "the child's changes are invisible to the parent"
    );
    assert_eq!(fs::read_to_string(p.join("a.txt")).unwrap(), "A2");

    // The child's diff against its fork point.
    let diff = changes(&child_upper, &[layer1.clone(), base.clone()]).unwrap();
    let got = forkscope_tests::change_list(&diff);
    assert_eq!(
        got,
        vec![
            ("a.txt".into(), ChangeKind::Deleted),
            ("child-only.txt".into(), ChangeKind::Added),
            ("keep.txt".into(), ChangeKind::Modified),
        ]
    );

    // Fork 2 copies only what changed since fork 1; a file created before fork 1 and deleted
    // since becomes a whiteout.
    let layer2 = state.path().join("layer2");
    let (_m2, s2) = snapshot(&parent_upper, Some(t1), &m1, &layer2).unwrap();
    let (child2, _) = mount(
        state.path(),
        "child2",
        vec![layer2.clone(), layer1.clone(), base.clone()],
    );
    assert_eq!(
        tree(&child2.0),
        tree(&p),
        "the second child sees the parent's files now"
    );
    assert_eq!(s2.whiteouts, 1, "newdir/f: {s2:?}");
    let copied_files = fs::read_dir(&layer2).unwrap().count();
    assert!(
        copied_files <= 3,
        "only new.txt, after.txt and newdir are in the delta ({copied_files} entries)"
    );
    assert!(
        s2.bytes <= 10,
        "the delta copies the changed bytes only: {s2:?}"
    );
    drop(child2);
    drop(child);
    drop(parent);
}

#[test]
fn an_unchanged_parent_gives_an_empty_delta() {
    require_root();
    let state = TempDir::new("layers-empty");
    let base = state.path().join("base");
    fs::create_dir_all(&base).unwrap();
    for i in 0..200 {
        write(base.join(format!("f{i}")), "x");
    }
    let (parent, upper) = mount(state.path(), "parent", vec![base.clone()]);
    write(parent.0.join("f1"), "changed");
    std::thread::sleep(TICK);
    let t1 = snapshot_clock_ns();
    let (m1, s1) = snapshot(&upper, None, &Manifest::default(), &state.path().join("l1")).unwrap();
    assert_eq!(
        (s1.entries, s1.bytes),
        (1, 7),
        "the first snapshot holds the one changed file"
    );
    let (_, s2) = snapshot(&upper, Some(t1), &m1, &state.path().join("l2")).unwrap();
    assert_eq!(
        s2,
        Default::default(),
        "nothing changed since: nothing copied"
    );
}
