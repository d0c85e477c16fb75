//! `forkscope exec BRANCH -- CMD...`: runs CMD inside the branch through its init, with this
//! terminal's stdin, stdout and stderr, and exits with its status.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Args;
use forkscope::sandbox::control::{ExecReply, ExecRequest, exec};
use hyper::Method;

/// Run a command inside a branch.
#[derive(Args)]
pub struct ExecArgs {
    branch: String,
    /// Working directory inside the branch (default: the workspace).
    #[arg(long)]
    cwd: Option<PathBuf>,
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// The control socket of `branch`'s init, if the branch is running.
pub(super) fn running_init(socket: &Path, branch: &str) -> anyhow::Result<PathBuf> {
    let b = super::client::call(
        socket,
        Method::GET,
        &super::client::branch_path(branch, ""),
        None,
    )?;
    if b["status"] == "frozen" {
        anyhow::bail!("branch {branch} is a frozen checkpoint: fork it to get a running branch");
    }
    if b["status"] != "running" {
        anyhow::bail!("branch {branch} is not running (its init is gone): abort it");
    }
    Ok(PathBuf::from(b["control"].as_str().unwrap_or_default()))
}

pub fn run(args: ExecArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let control = running_init(&socket, &args.branch)?;
    let req = ExecRequest {
        argv: args.command,
        cwd: args.cwd,
        env: Vec::new(),
        terminal: None,
    };
    let reply = exec(&control, &req, [0, 1, 2], |_| {})?;
    Ok(match reply {
        ExecReply::ExitCode(c) => ExitCode::from(c.clamp(0, 255) as u8),
        ExecReply::Signal(s) => ExitCode::from((128 + s).clamp(0, 255) as u8),
        ExecReply::Error(e) => {
            forkscope::say!("forkscope exec: {e}");
            ExitCode::from(forkscope::branch::run_in::not_started_code(&e) as u8)
        }
        ExecReply::Pid(_) | ExecReply::Terminal(_) | ExecReply::Attached(_) => ExitCode::FAILURE,
    })
}
