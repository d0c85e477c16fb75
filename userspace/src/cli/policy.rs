//! `forkscope policy BRANCH [FILE]`: show a branch's side-effect policy, or replace it
//! with the one in FILE (network rules take effect at once).

use std::{path::Path, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Args;
use hyper::Method;

/// Show or replace a branch's side-effect policy.
#[derive(Args)]
pub struct PolicyArgs {
    branch: String,
    /// The new policy (TOML); without it, the current one is printed as JSON.
    file: Option<PathBuf>,
}

/// Reads a policy file and checks it here, so that a mistake names the file and line.
pub fn read_policy(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the policy file {}", path.display()))?;
    forkscope::policy::parse(&text).with_context(|| path.display().to_string())?;
    Ok(text)
}

pub fn run(args: PolicyArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let b = match &args.file {
        Some(f) => {
            let body = serde_json::json!({ "policy": read_policy(f)? });
            super::client::call(
                &socket,
                Method::PUT,
                &super::client::branch_path(&args.branch, "/policy"),
                Some(body),
            )?
        }
        None => super::client::call(
            &socket,
            Method::GET,
            &super::client::branch_path(&args.branch, ""),
            None,
        )?,
    };
    let policy = b.get("record").map_or(&b["policy"], |r| &r["policy"]);
    println!("{}", serde_json::to_string_pretty(policy)?);
    Ok(ExitCode::SUCCESS)
}
