//! `forkscope commit BRANCH [--prefer branch|target]`: apply a branch's changes to its
//! parent's view (the host workspace for a root branch), all or nothing.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use hyper::Method;

/// Commit a branch: its changes since its fork point (or its last commit) go to its parent
/// (for a root branch: the host workspace). It keeps running.
#[derive(Args)]
pub struct CommitArgs {
    branch: String,
    /// For paths changed on both sides: `branch` applies the branch's version, `target`
    /// keeps the parent's. Without it such a commit is refused and the paths are listed.
    #[arg(long)]
    prefer: Option<forkscope::commit::Prefer>,
    #[arg(long)]
    json: bool,
}

pub fn run(args: CommitArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let body = serde_json::json!({ "prefer": args.prefer.unwrap_or_default() });
    let done = super::client::call(
        &socket,
        Method::POST,
        &super::client::branch_path(&args.branch, "/commit"),
        Some(body.clone()),
    )?;
    if args.json {
        println!("{done}");
        return Ok(ExitCode::SUCCESS);
    }
    let changes = done["changes"].as_array().map_or(0, |c| c.len());
    let target = match done["target"].as_str() {
        Some("host") => "the host workspace".to_string(),
        Some(t) => format!("branch {t}"),
        None => "?".into(),
    };
    println!(
        "committed {} into {target}: {changes} change(s)",
        args.branch
    );
    let side = body["prefer"].as_str().unwrap_or("?").to_string();
    for c in done["conflicts"].as_array().into_iter().flatten() {
        println!(
            "  changed on both sides, kept the {side}'s version: {}",
            c.as_str().unwrap_or("?")
        );
    }
    for e in done["effects"].as_array().into_iter().flatten() {
        println!(
            "  side effect {} {} to {} ({}): {}",
            e["id"],
            if e["delivered"] == true {
                "delivered"
            } else {
                "NOT delivered (kept for the next commit)"
            },
            e["dest"].as_str().unwrap_or("?"),
            e["summary"].as_str().unwrap_or("?"),
            e["result"].as_str().unwrap_or("")
        );
    }
    let ph = &done["phases"];
    forkscope::say!(
        "committed in: freeze {} us, plan {} us, stage {} us, apply {} us, thaw {} us",
        ph["freeze_us"],
        ph["plan_us"],
        ph["stage_us"],
        ph["apply_us"],
        ph["thaw_us"]
    );
    Ok(ExitCode::SUCCESS)
}
