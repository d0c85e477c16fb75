//! `forkscope fork BRANCH [--name N] [-n COUNT]`: new child branches at the branch's current
//! state.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use hyper::Method;

/// Fork a branch: the children see its files as they are now; it keeps running.
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
}

pub fn run(args: ForkArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let body = serde_json::json!({ "name": args.name, "count": args.count, "frozen": args.frozen });
    let made = super::client::call(
        &socket,
        Method::POST,
        &format!("/v1/branches/{}/fork", args.branch),
        Some(body),
    )?;
    for b in made["branches"].as_array().into_iter().flatten() {
        println!("{}", b["name"].as_str().unwrap_or("?"));
    }
    let ph = &made["phases"];
    eprintln!(
        "forked in: freeze {} us, files {} us (parent frozen), thaw {} us, child sandboxes {} us",
        ph["freeze_us"], ph["files_us"], ph["thaw_us"], ph["start_us"]
    );
    eprintln!("note: processes are not cloned yet; each child started the branch's command afresh");
    Ok(ExitCode::SUCCESS)
}
