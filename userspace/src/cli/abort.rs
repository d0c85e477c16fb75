//! `forkscope abort BRANCH`: kill a branch's processes and drop its files and cgroup.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use hyper::Method;

/// Abort a branch: nothing of it reaches its parent or the host.
#[derive(Args)]
pub struct AbortArgs {
    branch: String,
}

pub fn run(args: AbortArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    super::client::call(
        &socket,
        Method::DELETE,
        &format!("/v1/branches/{}", args.branch),
        None,
    )?;
    Ok(ExitCode::SUCCESS)
}
