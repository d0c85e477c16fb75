//! `forkscope diff BRANCH [--json]`: what the branch changed in its workspace since its
//! fork point (A added, M modified, D deleted, R renamed, T replaced: a directory deleted
//! and created again, or a path that changed type).

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
        &super::client::branch_path(&args.branch, "/diff"),
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
            Some("replaced") => "T",
            Some("renamed") => "R",
            _ => "?",
        };
        match c["from"].as_str() {
            Some(from) => println!("{tag} {from} -> {}", c["path"].as_str().unwrap_or("?")),
            None => println!("{tag} {}", c["path"].as_str().unwrap_or("?")),
        }
    }
    Ok(ExitCode::SUCCESS)
}
