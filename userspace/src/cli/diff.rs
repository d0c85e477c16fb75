//! `forkscope diff BRANCH [--json]`: what the branch changed in its workspace since its
//! fork point (A added, M modified, D deleted, R replaced directory).

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use hyper::Method;

/// Show a branch's changes since its fork point.
#[derive(Args)]
pub struct DiffArgs {
    branch: String,
    #[arg(long)]
    json: bool,
}

pub fn run(args: DiffArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let d = super::client::call(
        &socket,
        Method::GET,
        &format!("/v1/branches/{}/diff", args.branch),
        None,
    )?;
    if args.json {
        println!("{d}");
        return Ok(ExitCode::SUCCESS);
    }
    for c in d.as_array().into_iter().flatten() {
        let tag = match c["kind"].as_str() {
            Some("added") => "A",
            Some("modified") => "M",
            Some("deleted") => "D",
            Some("replaced") => "R",
            _ => "?",
        };
        println!("{tag} {}", c["path"].as_str().unwrap_or("?"));
    }
    Ok(ExitCode::SUCCESS)
}
