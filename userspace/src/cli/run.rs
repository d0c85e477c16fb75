//! `forkscope run [--name N] [--net host|isolated] [--write-detail on|off] [--policy FILE]
//! --workspace DIR -- CMD...`: a new root branch.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use hyper::Method;

/// Start a root branch on a workspace; returns as soon as it is up.
#[derive(Args)]
pub struct RunArgs {
    /// The branch's name (default: b<id>).
    #[arg(long)]
    name: Option<String>,
    /// The directory the branch works on (it sees a private overlay of it at the same path).
    #[arg(long)]
    workspace: PathBuf,
    /// Print the branch as JSON.
    #[arg(long)]
    json: bool,
    /// `isolated`: a network namespace of the branch's own, loopback only (its forks get
    /// theirs, and listening sockets are recreated in clones); `host` (default): the host's.
    #[arg(long, value_parser = ["host", "isolated"], default_value = "host")]
    net: String,
    /// `on` (default): every write, send, open and path change is in the branch's trace;
    /// the syscall programs that see them are attached while any such branch lives, and
    /// every process on the host pays for them. `off`: none run on this branch's behalf;
    /// its files are known from its layers (`diff`), its processes, connections and dirtied
    /// pages are still traced. Forks inherit it.
    #[arg(long, value_parser = ["on", "off"], default_value = "on")]
    write_detail: String,
    /// A side-effect policy file (TOML: allow, deny, defer or buffer network destinations,
    /// share or deny host paths); its forks inherit it. See docs/policy.md.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// The branch's command (optional: a branch can also just wait for `exec`).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

pub fn run(args: RunArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let workspace = std::path::absolute(&args.workspace)?;
    let policy = args
        .policy
        .as_deref()
        .map(super::policy::read_policy)
        .transpose()?;
    let body = serde_json::json!({
        "name": args.name,
        "workspace": workspace,
        "command": args.command,
        "net": args.net,
        "write_detail": args.write_detail,
        "policy": policy,
    });
    let b = super::client::call(&socket, Method::POST, "/v1/branches", Some(body))?;
    if args.json {
        println!("{b}");
    } else {
        println!("{}", b["name"].as_str().unwrap_or("?"));
    }
    Ok(ExitCode::SUCCESS)
}
