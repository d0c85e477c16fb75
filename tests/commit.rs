//! `commit` through the library (`forkscope::branch::Manager`) on the real kernel: a root
//! branch's changes reproduced exactly on the host while mounted branches keep their view,
//! conflicts refused with nothing applied (or settled with `prefer`), a child committing into
//! its running parent, commits that move the branch's base forward, and checkpoints.

use std::{fs, os::unix::fs::PermissionsExt, path::PathBuf};

use forkscope::{
    Error,
    branch::{BranchRecord, CommitOptions, ForkOptions, Manager},
    commit::Prefer,
    layers::diff::ChangeKind,
};
use forkscope_tests::{
    TempDir,
    branches::{Branches, abort_all, sleeping},
    exec_sh, require_root, tree,
};

fn fork(m: &mut Manager, parent: &str, name: &str, frozen: bool) -> BranchRecord {
    m.fork(
        parent,
        &ForkOptions {
            name: Some(name.into()),
            frozen,
            ..Default::default()
        },
    )
    .unwrap()
    .branches
    .remove(0)
}

fn sh(b: &BranchRecord, script: &str) -> String {
    let (code, out) = exec_sh(&b.control, script);
    assert_eq!(code, 0, "{script}: {out}");
    out
}

/// The workspace as branch `b`'s processes see it.
fn view(b: &BranchRecord) -> PathBuf {
    PathBuf::from(format!("/proc/{}/root", b.init_pid)).join(b.workspace.strip_prefix("/").unwrap())
}

fn commit(m: &mut Manager, name: &str) -> forkscope::Result<forkscope::branch::Committed> {
    m.commit(name, &CommitOptions::default())
}

#[test]
fn root_commit_reproduces_every_change_on_the_host_and_mounted_branches_keep_their_view() {
    require_root();
    let state = TempDir::new("state");
    let ws = TempDir::new("workspace");
    let w = ws.path();
    for (f, text) in [
        ("keep.txt", "keep\n"),
        ("modify.txt", "old\n"),
        ("delete.txt", "bye\n"),
        ("rename-me.txt", "moving\n"),
        ("chmod.sh", "#!/bin/sh\n"),
        ("dir/nested.txt", "nested\n"),
        ("olddir/a", "a\n"),
        ("olddir/sub/b", "b\n"),
        ("typechange", "a file for now\n"),
    ] {
        let p = w.join(f);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
    fs::set_permissions(w.join("chmod.sh"), fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink("keep.txt", w.join("link-old")).unwrap();
    let initial = tree(w);

    let mut m = Branches::open(&state.path().join("state"));
    let root = sleeping(&mut m, "root", w);
    // Forked before the changes: it must keep seeing the initial files after the commit.
    let watcher = fork(&mut m, "root", "watcher", false);
    sh(
        &root,
        "echo new > added.txt && echo changed > modify.txt && rm delete.txt && \
         mv rename-me.txt renamed.txt && chmod 755 chmod.sh && mkdir -p empty/deeper && \
         ln -s keep.txt newlink && rm link-old && rm -r olddir && rm typechange && \
         mkdir typechange && echo inner > typechange/inner && chown 1234:5678 added.txt && \
         chmod 700 dir",
    );
    let expected = tree(&view(&root));
    assert_ne!(expected, initial);

    let diff = m.diff("root").unwrap();
    assert!(
        diff.iter().any(|c| c.kind == ChangeKind::Renamed
            && c.path.as_path() == std::path::Path::new("renamed.txt")
            && c.from == Some(PathBuf::from("rename-me.txt"))),
        "the diff shows the rename: {diff:?}"
    );

    let done = commit(&mut m, "root").unwrap();
    assert_eq!(done.target, "host");
    assert!(done.conflicts.is_empty());
    assert_eq!(
        tree(w),
        expected,
        "the host holds exactly the branch's files"
    );
    assert_eq!(
        tree(&view(&root)),
        expected,
        "the branch still sees its files"
    );
    assert_eq!(
        tree(&view(&watcher)),
        initial,
        "a branch mounted before the commit sees what it saw"
    );
    assert_eq!(
        sh(&watcher, "cat modify.txt olddir/sub/b typechange"),
        "old\nb\na file for now\n"
    );

    // Nothing new: nothing to do.
    assert!(commit(&mut m, "root").unwrap().changes.is_empty());
    // The base moved forward: the next commit carries only what changed since, and a host
    // change to a path the branch left alone is kept.
    sh(&root, "echo again > keep.txt");
    fs::write(w.join("dir/nested.txt"), "host edit\n").unwrap();
    let done = commit(&mut m, "root").unwrap();
    assert_eq!(
        done.changes
            .iter()
            .map(|c| c.path.clone())
            .collect::<Vec<_>>(),
        vec![PathBuf::from("keep.txt")]
    );
    assert_eq!(fs::read_to_string(w.join("keep.txt")).unwrap(), "again\n");
    assert_eq!(
        fs::read_to_string(w.join("dir/nested.txt")).unwrap(),
        "host edit\n"
    );
    // A path the branch committed, then changed on the host, then changed in the branch
    // again: a conflict.
    fs::write(w.join("added.txt"), "host\n").unwrap();
    sh(&root, "echo branch > added.txt");
    let err = commit(&mut m, "root").unwrap_err();
    assert!(
        matches!(&err, Error::Conflicts { paths, .. } if paths == &[PathBuf::from("added.txt")]),
        "{err}"
    );
    assert_eq!(fs::read_to_string(w.join("added.txt")).unwrap(), "host\n");
    abort_all(&mut m);
    assert!(m.list().unwrap().is_empty(), "every branch aborted");
}

#[test]
fn conflicts_are_refused_whole_or_settled_by_prefer() {
    require_root();
    let state = TempDir::new("state");
    let mut m = Branches::open(&state.path().join("state"));
    let mut hosts = Vec::new();
    for prefer in [Prefer::None, Prefer::Target, Prefer::Branch] {
        let ws = TempDir::new("workspace");
        let w = ws.path().to_path_buf();
        fs::write(w.join("a.txt"), "a0\n").unwrap();
        fs::write(w.join("b.txt"), "b0\n").unwrap();
        fs::create_dir(w.join("d")).unwrap();
        fs::write(w.join("d/c.txt"), "c0\n").unwrap();
        let name = format!("{prefer:?}").to_lowercase();
        let b = sleeping(&mut m, &name, &w);
        sh(
            &b,
            "echo a-branch > a.txt && echo b-branch > b.txt && echo new > new.txt && rm -r d",
        );
        // The host changes a.txt in place and adds a file in d, which the branch removed.
        fs::write(w.join("a.txt"), "a-host\n").unwrap();
        fs::write(w.join("d/extra.txt"), "host\n").unwrap();
        let before = tree(&w);
        let got = m.commit(&name, &CommitOptions { prefer });
        match prefer {
            Prefer::None => {
                let err = got.unwrap_err();
                match &err {
                    Error::Conflicts { paths, .. } => assert_eq!(
                        paths,
                        &[PathBuf::from("a.txt"), PathBuf::from("d")],
                        "{err}"
                    ),
                    other => panic!("expected a conflict, got {other}"),
                }
                assert!(err.to_string().contains("--prefer"), "{err}");
                assert_eq!(tree(&w), before, "nothing applied");
            }
            Prefer::Target => {
                let done = got.unwrap();
                assert_eq!(done.conflicts.len(), 2);
                assert_eq!(fs::read_to_string(w.join("a.txt")).unwrap(), "a-host\n");
                assert_eq!(fs::read_to_string(w.join("b.txt")).unwrap(), "b-branch\n");
                assert_eq!(fs::read_to_string(w.join("new.txt")).unwrap(), "new\n");
                assert!(w.join("d/extra.txt").exists() && w.join("d/c.txt").exists());
            }
            Prefer::Branch => {
                got.unwrap();
                assert_eq!(tree(&w), tree(&view(&b)), "the branch's version everywhere");
            }
        }
        hosts.push(ws);
    }
    abort_all(&mut m);
    assert!(m.list().unwrap().is_empty(), "every branch aborted");
}

#[test]
fn a_child_commits_into_its_running_parent() {
    require_root();
    let state = TempDir::new("state");
    let ws = TempDir::new("workspace");
    let w = ws.path();
    fs::write(w.join("f"), "v1\n").unwrap();
    let mut m = Branches::open(&state.path().join("state"));
    let root = sleeping(&mut m, "root", w);
    sh(&root, "echo root-before-fork > r.txt");
    let c1 = fork(&mut m, "root", "c1", false);
    let c2 = fork(&mut m, "root", "c2", false);
    fork(&mut m, "root", "cp", true);

    sh(
        &c1,
        "echo c1 > f && echo new > c1.txt && rm r.txt && mkdir -p deep/er",
    );
    let done = commit(&mut m, "c1").unwrap();
    assert_eq!(done.target, "root");
    assert_eq!(
        sh(
            &root,
            "cat f c1.txt; ls r.txt 2>/dev/null | wc -l; ls -d deep/er"
        ),
        "c1\nnew\n0\ndeep/er\n",
        "the parent sees the child's changes"
    );
    assert_eq!(sh(&c2, "cat f; ls c1.txt 2>/dev/null | wc -l"), "v1\n0\n");
    assert_eq!(
        fs::read_to_string(w.join("f")).unwrap(),
        "v1\n",
        "host untouched"
    );

    // A sibling that changed the same file since the same fork point conflicts.
    sh(&c2, "echo c2 > f");
    let err = commit(&mut m, "c2").unwrap_err();
    assert!(
        matches!(&err, Error::Conflicts { paths, .. } if paths == &[PathBuf::from("f")]),
        "{err}"
    );
    assert_eq!(sh(&root, "cat f"), "c1\n");

    // The committing child's base moved: changing f again is not a conflict with itself...
    sh(&c1, "echo c1-again > f");
    commit(&mut m, "c1").unwrap();
    assert_eq!(sh(&root, "cat f"), "c1-again\n");
    // ...but a change the parent made itself since is.
    sh(&root, "echo root > f");
    sh(&c1, "echo c1-third > f");
    assert!(matches!(
        commit(&mut m, "c1").unwrap_err(),
        Error::Conflicts { .. }
    ));

    // A fork of a checkpoint commits into the checkpoint's running parent.
    let k = fork(&mut m, "cp", "k", false);
    sh(&k, "echo from-checkpoint > k.txt");
    assert_eq!(commit(&mut m, "k").unwrap().target, "root");
    assert_eq!(sh(&root, "cat k.txt"), "from-checkpoint\n");
    assert!(
        m.commit("cp", &CommitOptions::default())
            .unwrap_err()
            .to_string()
            .contains("checkpoint")
    );

    // And the root carries it all to the host.
    commit(&mut m, "root").unwrap();
    assert_eq!(tree(w), tree(&view(&root)));
    assert_eq!(fs::read_to_string(w.join("f")).unwrap(), "root\n");
    assert_eq!(
        fs::read_to_string(w.join("k.txt")).unwrap(),
        "from-checkpoint\n"
    );
    abort_all(&mut m);
    assert!(
        fs::read_dir(state.path().join("state/branches"))
            .unwrap()
            .next()
            .is_none(),
        "abort after commits leaves no branch directory"
    );
}

#[test]
fn a_workspace_on_another_filesystem_commits_against_its_copied_base() {
    require_root();
    // The state directory on /dev/shm (a tmpfs), the workspace under /tmp: the base layer is
    // a copy, not hard links.
    let state = PathBuf::from(format!(
        "/dev/shm/forkscope-test-state-{}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&state);
    fs::create_dir_all(&state).unwrap();
    let ws_dir = TempDir::new("workspace");
    let ws = ws_dir.path().to_path_buf();
    fs::create_dir_all(ws.join("d")).unwrap();
    fs::write(ws.join("a.txt"), "a0\n").unwrap();
    fs::write(ws.join("b.txt"), "b0\n").unwrap();
    fs::write(ws.join("d/c.txt"), "c0\n").unwrap();
    let mut m = Branches::open(&state.join("state"));
    let b = sleeping(&mut m, "root", &ws);
    assert!(
        state.join("state/branches/1/base-manifest.json").exists(),
        "a copied base"
    );
    sh(&b, "echo a1 > a.txt && rm d/c.txt && echo new > n.txt");
    let done = commit(&mut m, "root").unwrap();
    assert!(done.conflicts.is_empty(), "{:?}", done.conflicts);
    assert_eq!(tree(&ws), tree(&view(&b)));
    // A host change to a file the branch then changes is still a conflict.
    fs::write(ws.join("b.txt"), "host\n").unwrap();
    sh(&b, "echo b1 > b.txt");
    assert!(matches!(
        commit(&mut m, "root").unwrap_err(),
        Error::Conflicts { paths, .. } if paths == [PathBuf::from("b.txt")]
    ));
    abort_all(&mut m);
    drop(m);
    fs::remove_dir_all(&state).unwrap();
}

#[test]
fn a_symbolic_link_a_parent_plants_never_takes_a_childs_commit_out_of_the_workspace() {
    // The daemon applies a child's commit through its parent's view as root, from its own
    // root directory: a link the parent's (untrusted) processes put where a directory was
    // must not make it remove, chmod or write host files.
    require_root();
    let state = TempDir::new("state");
    let ws = TempDir::new("workspace");
    let victim = TempDir::new("victim");
    let (w, v) = (ws.path(), victim.path());
    for top in [w, v] {
        fs::create_dir_all(top.join("d/sub")).unwrap();
        fs::set_permissions(top.join("d/sub"), fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::create_dir(v.join("d/sub/keep")).unwrap();
    for f in ["gone", "kept"] {
        fs::write(w.join("d").join(f), "workspace\n").unwrap();
        fs::write(v.join("d").join(f), "host file\n").unwrap();
    }
    let mut m = Branches::open(&state.path().join("state"));
    let root = sleeping(&mut m, "root", w);
    let kid = fork(&mut m, "root", "kid", false);
    // The child's d, d/sub and d/kept are its own and committed once: later changes to
    // what is in them leave d itself as it was.
    sh(&kid, "chmod 750 d/sub && echo v1 > d/kept");
    commit(&mut m, "kid").unwrap();
    // The parent swaps its d for a link to a host directory (read-only for it).
    sh(
        &root,
        &format!("rm -rf d && ln -s {} d", v.join("d").display()),
    );
    sh(
        &kid,
        "chmod 700 d/sub && echo v2 > d/kept && rm -rf d/sub/keep",
    );
    let refused = commit(&mut m, "kid").unwrap_err();
    assert!(matches!(refused, Error::Conflicts { .. }), "{refused}");
    // Even with the branch's side preferred, nothing goes through the link: the parent
    // gets a directory d with the child's changes, the host directory is untouched.
    m.commit(
        "kid",
        &CommitOptions {
            prefer: Prefer::Branch,
        },
    )
    .unwrap();
    let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(v.join("d/sub")), 0o755, "the host directory's mode");
    assert_eq!(fs::read_to_string(v.join("d/kept")).unwrap(), "host file\n");
    assert_eq!(fs::read_to_string(v.join("d/gone")).unwrap(), "host file\n");
    assert!(v.join("d/sub/keep").is_dir());
    assert_eq!(
        sh(
            &root,
            "test -L d && echo link; stat -c %a d/sub; cat d/kept"
        ),
        "700\nv2\n",
        "the parent now has a directory d with the child's changes"
    );
    abort_all(&mut m);
}
