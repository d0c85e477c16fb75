//! `forkscope abort BRANCH`: kill a branch's processes and drop its files and cgroup (a branch
//! whose forks run is retired: kept as `NAME~ID` until the last of them is aborted).

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use hyper::Method;

/// Abort a branch: nothing of it reaches its parent or the host.
#[derive(Args)]
pub struct AbortArgs {
    branch: String,
    /// Also abort every branch forked from it, directly or not (children first).
    #[arg(short, long)]
    recursive: bool,
}

pub fn run(args: AbortArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    super::client::call(
        &socket,
        Method::DELETE,
        &super::client::branch_path(
            &args.branch,
            if args.recursive {
                "?recursive=true"
            } else {
                ""
            },
        ),
        None,
    )?;
    Ok(ExitCode::SUCCESS)
}
