//! `forkscope fork BRANCH [--name N] [-n COUNT] [--frozen] [--fresh]`: new child branches at
//! the branch's current state, with its processes cloned into them.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use hyper::Method;

/// Fork a branch: the children see its files as they are now and get copy-on-write clones
/// of its processes; it keeps running.
#[derive(Args)]
pub struct ForkArgs {
    branch: String,
    /// The child's name (one child only).
    #[arg(long)]
    name: Option<String>,
    /// How many children.
    #[arg(short = 'n', long = "count", default_value_t = 1)]
    count: u32,
    /// Make checkpoints: layers only, no processes; every fork of a checkpoint starts from
    /// the same state.
    #[arg(long)]
    frozen: bool,
    /// Start the branch's command afresh in each child instead of cloning its processes.
    #[arg(long)]
    fresh: bool,
}

pub fn run(args: ForkArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let body = serde_json::json!({
        "name": args.name,
        "count": args.count,
        "frozen": args.frozen,
        "fresh": args.fresh,
    });
    let made = super::client::call(
        &socket,
        Method::POST,
        &super::client::branch_path(&args.branch, "/fork"),
        Some(body),
    )?;
    for b in made["branches"].as_array().into_iter().flatten() {
        println!("{}", b["name"].as_str().unwrap_or("?"));
    }
    let ph = &made["phases"];
    forkscope::say!(
        "forked in {} us: check {} us, freeze {} us, files {} us, seize {} us, thaw {} us, plan {} us, child sandboxes {} us, process clones {} us, record {} us (the parent's processes held {} us)",
        ph["total_us"],
        ph["check_us"],
        ph["freeze_us"],
        ph["files_us"],
        ph["seize_us"],
        ph["thaw_us"],
        ph["plan_us"],
        ph["start_us"],
        ph["processes_us"],
        ph["record_us"],
        ph["held_us"]
    );
    match made["processes"].as_str() {
        Some("cloned") => {
            let n: Vec<usize> = made["cloned"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| c.as_array().map_or(0, |a| a.len()))
                .collect();
            forkscope::say!(
                "processes: cloned copy-on-write ({} per child)",
                n.first().copied().unwrap_or(0)
            );
        }
        Some("fresh") => {
            forkscope::say!("processes: each child started the branch's command afresh")
        }
        _ => forkscope::say!("processes: none (a checkpoint holds files only)"),
    }
    for note in made["notes"].as_array().into_iter().flatten() {
        forkscope::say!("note: {}", note.as_str().unwrap_or("?"));
    }
    Ok(ExitCode::SUCCESS)
}
