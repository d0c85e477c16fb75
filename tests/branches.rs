//! Branches through the library (`forkscope::branch::Manager`) on the real kernel: run a
//! branch on a workspace, fork it while it runs, isolation in both directions, the diff of a
//! branch, and an abort that leaves nothing behind.

use std::{fs, path::Path};

use forkscope::{
    branch::{ForkOptions, Manager},
    layers::diff::ChangeKind,
};
use forkscope_tests::{
    TempDir,
    branches::{Branches, sleeping},
    forkscope, require_root,
};

fn sh(control: &Path, script: &str) -> (i32, String) {
    forkscope_tests::exec_sh(control, script)
}

#[test]
fn run_fork_diff_and_abort() {
    require_root();
    let state = TempDir::new("state");
    let ws = TempDir::new("workspace");
    fs::write(ws.path().join("README"), "v1\n").unwrap();
    let mut m = Branches::open(&state.path().join("state"));
    let root = sleeping(&mut m, "root", ws.path());
    assert_eq!(
        sh(
            &root.control,
            "echo v2 > README; echo new > added.txt; echo t > /tmp/t"
        )
        .0,
        0
    );
    assert_eq!(
        fs::read_to_string(ws.path().join("README")).unwrap(),
        "v1\n",
        "the host workspace is untouched"
    );

    let child = m
        .fork(
            "root",
            &ForkOptions {
                name: Some("child".into()),
                ..Default::default()
            },
        )
        .unwrap()
        .branches
        .remove(0);
    assert_eq!(child.parent.as_deref(), Some("root"));
    assert_eq!(
        sh(&child.control, "cat README added.txt /tmp/t").1,
        "v2\nnew\nt\n",
        "the child sees the fork point"
    );
    // Each side changes; the other does not see it.
    sh(&root.control, "echo root-after > README");
    sh(&child.control, "echo child-only > c.txt; rm added.txt");
    assert_eq!(sh(&child.control, "cat README").1, "v2\n");
    assert_eq!(
        sh(
            &root.control,
            "cat added.txt; ls c.txt 2>&1 >/dev/null | wc -l"
        )
        .1,
        "new\n1\n"
    );

    let diff = m.diff("child").unwrap();
    let got = forkscope_tests::change_list(&diff);
    assert_eq!(
        got,
        vec![
            ("added.txt".into(), ChangeKind::Deleted),
            ("c.txt".into(), ChangeKind::Added)
        ]
    );

    // Names: unique among live branches, reusable after an abort; bad names refused.
    assert!(
        m.fork(
            "root",
            &ForkOptions {
                name: Some("child".into()),
                ..Default::default()
            }
        )
        .unwrap_err()
        .to_string()
        .contains("already named")
    );
    assert!(
        m.fork(
            "root",
            &ForkOptions {
                name: Some("../x".into()),
                ..Default::default()
            }
        )
        .unwrap_err()
        .to_string()
        .contains("invalid branch name")
    );
    assert!(
        m.fork("nope", &ForkOptions::default())
            .unwrap_err()
            .to_string()
            .contains("no live branch")
    );
    let listed = names_and_status(&m);
    assert_eq!(listed, vec!["root:running", "child:running"]);

    // Aborting a branch whose fork runs retires it: its name is free and it takes no more
    // requests, but its init and layers stay for the child, which goes on.
    let root_rec = m.get("root").unwrap();
    m.abort("root").unwrap();
    let listed = names_and_status(&m);
    let retired = format!("root~{}", root_rec.id);
    assert_eq!(
        listed,
        vec![format!("{retired}:retired"), "child:running".into()]
    );
    assert!(
        m.get("root")
            .unwrap_err()
            .to_string()
            .contains("no live branch")
    );
    assert!(
        m.get(&retired)
            .unwrap_err()
            .to_string()
            .contains("was aborted")
    );
    assert!(root_rec.cgroup.exists() && root_rec.dir.exists());
    assert_eq!(m.get("child").unwrap().parent, Some(retired.clone()));
    assert_eq!(sh(&child.control, "cat README c.txt").1, "v2\nchild-only\n");
    let refused = m
        .commit("child", &Default::default())
        .unwrap_err()
        .to_string();
    assert!(refused.contains("nothing to commit it into"), "{refused}");
    // The last fork's abort takes the retired branch with it.
    let child_rec = m.get("child").unwrap();
    m.abort("child").unwrap();
    for b in [&child_rec, &root_rec] {
        assert!(!b.cgroup.exists(), "cgroup of {} removed", b.name);
        assert!(!b.dir.exists(), "files of {} removed", b.name);
    }
    assert!(m.list().unwrap().is_empty());
    let again = m.run(Some("child".into()), ws.path(), vec![]).unwrap();
    m.abort(&again.name).unwrap();
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&*state.path().to_string_lossy()),
        "no mount left"
    );
}

/// Each listed branch as `name:status`.
fn names_and_status(m: &Manager) -> Vec<String> {
    m.list()
        .unwrap()
        .into_iter()
        .map(|b| format!("{}:{}", b.record.name, b.status))
        .collect()
}

#[test]
fn bad_workspaces_and_a_second_manager_are_refused() {
    require_root();
    let state = TempDir::new("state2");
    let mut m = Manager::open(state.path(), &forkscope()).unwrap();
    let err = m
        .run(None, Path::new("/nonexistent/ws"), vec![])
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/ws"), "{err}");
    let file = state.path().join("afile");
    fs::write(&file, "x").unwrap();
    assert!(
        m.run(None, &file, vec![])
            .unwrap_err()
            .to_string()
            .contains("not a directory")
    );
    let second = Manager::open(state.path(), &forkscope())
        .err()
        .expect("a second manager is refused");
    assert!(
        second.to_string().contains("another forkscope daemon"),
        "{second}"
    );
}

#[test]
fn deep_fork_chains_are_flattened_and_show_the_same_files() {
    require_root();
    let state = TempDir::new("state");
    let ws = TempDir::new("workspace");
    fs::create_dir(ws.path().join("d")).unwrap();
    fs::write(ws.path().join("d/old"), "old\n").unwrap();
    let mut m = Branches::open(&state.path().join("state"));
    let mut parent = sleeping(&mut m, "g0", ws.path());
    // A chain of generations, each changing something and forking the next: a new file,
    // the previous one deleted, and once a directory deleted and created again.
    let generations = forkscope::branch::FLATTEN_AT + 6;
    for g in 1..=generations {
        let script = if g == 5 {
            format!(
                "echo {g} > f{g}; rm -f f{}; rm -r d; mkdir d; echo new > d/x",
                g - 1
            )
        } else {
            format!("echo {g} > f{g}; rm -f f{}", g - 1)
        };
        assert_eq!(sh(&parent.control, &script).0, 0);
        let child = m
            .fork(
                &parent.name,
                &ForkOptions {
                    name: Some(format!("g{g}")),
                    ..Default::default()
                },
            )
            .unwrap()
            .branches
            .remove(0);
        assert!(
            child.ws_lowers.len() <= forkscope::branch::FLATTEN_AT + 1,
            "generation {g} stands on {} layers",
            child.ws_lowers.len()
        );
        let expected = if g >= 5 {
            format!("d\nd/x\nf{g}\n")
        } else {
            format!("d\nd/old\nf{g}\n")
        };
        assert_eq!(
            sh(&child.control, "find . -mindepth 1 | sed 's|^./||' | sort").1,
            expected,
            "generation {g} sees its parent's files"
        );
        parent = child;
    }
    for g in (0..=generations).rev() {
        m.abort(&format!("g{g}")).unwrap();
    }
}

#[test]
fn forks_with_nothing_changed_between_them_share_layers_and_leave_no_empty_ones() {
    require_root();
    let state = TempDir::new("state");
    let ws = TempDir::new("workspace");
    fs::write(ws.path().join("README"), "v1\n").unwrap();
    let open = || Branches::open(&state.path().join("state"));
    let mut m = open();
    let root = sleeping(&mut m, "root", ws.path());
    let fork = |m: &mut Manager, name: &str| {
        // (A snapshot copies again what changed within the coarse clock's tick of the
        // previous one: let it pass.)
        std::thread::sleep(std::time::Duration::from_millis(30));
        let opts = ForkOptions {
            name: Some(name.into()),
            ..Default::default()
        };
        m.fork("root", &opts).unwrap().branches.remove(0)
    };
    let layers = |m: &Manager| {
        let dir = &m.get("root").unwrap().dir;
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ws-layer-") || n.starts_with("tmp-layer-"))
            .collect();
        names.sort();
        names
    };
    // Nothing changed between them: the forks stand on the same layers, and the
    // directories a fork made for a snapshot it did not need are kept for the next
    // one, not made and removed each time.
    let a = fork(&mut m, "a");
    let b = fork(&mut m, "b");
    let after_b = layers(&m);
    let spare: Vec<&String> = after_b
        .iter()
        .filter(|n| {
            !a.ws_lowers
                .iter()
                .chain(&a.tmp_lowers)
                .any(|l| l.ends_with(n.as_str()))
        })
        .collect();
    assert_eq!(spare.len(), 2, "b's unused pair kept: {after_b:?}");
    let e = fork(&mut m, "e");
    assert_eq!((&a.ws_lowers, &b.ws_lowers), (&e.ws_lowers, &e.ws_lowers));
    assert_eq!(layers(&m), after_b, "no layer directory made or left by e");
    // A change: the next fork copies it into the kept directories.
    assert_eq!(sh(&root.control, "echo v2 > README").0, 0);
    let c = fork(&mut m, "c");
    assert_ne!(c.ws_lowers, b.ws_lowers);
    assert!(spare.iter().any(|n| c.ws_lowers[0].ends_with(n.as_str())));
    assert_eq!(sh(&c.control, "cat README").1, "v2\n");
    assert_eq!(sh(&b.control, "cat README").1, "v1\n");
    let d = fork(&mut m, "d");
    assert_eq!(c.ws_lowers, d.ws_lowers);
    assert_eq!(sh(&d.control, "cat README").1, "v2\n");
    // Every layer directory is one a fork stands on, or the pair kept for the next.
    let used: Vec<String> = [&a, &b, &c, &d, &e]
        .iter()
        .flat_map(|x| x.ws_lowers.iter().chain(&x.tmp_lowers))
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let unused = |m: &Manager| -> Vec<String> {
        layers(m)
            .into_iter()
            .filter(|n| !used.contains(n))
            .collect()
    };
    assert_eq!(unused(&m).len(), 2, "the pair kept for e");
    // A restart (the kept pair is only known to the daemon that kept it): the empty
    // layers no branch stands on go, the others stay and still serve the children.
    drop(m.release());
    m = open();
    assert_eq!(unused(&m), Vec::<String>::new());
    assert_eq!(sh(&d.control, "cat README").1, "v2\n");
    let f = fork(&mut m, "f");
    assert_eq!(f.ws_lowers, d.ws_lowers);
}
