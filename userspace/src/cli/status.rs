//! `forkscope status`: whether the daemon answers, and what it holds.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use hyper::Method;

/// Show the daemon's status.
#[derive(Args)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let s = super::client::call(&socket, Method::GET, "/v1/status", None)?;
    if args.json {
        println!("{s}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "forkscope daemon {} on {}: {} live branches, state in {}",
        s["version"].as_str().unwrap_or("?"),
        socket.display(),
        s["branches"],
        s["state_dir"].as_str().unwrap_or("?")
    );
    match s["trace"].as_object() {
        Some(t) => {
            println!(
                "tracing branches: {} events, {} lost, {} from no live branch",
                t["events"], t["lost"], t["unattributed"]
            );
            let attached = |key: &str, yes: &'static str, no: &'static str| {
                println!(
                    "{}",
                    if t[key].as_bool() == Some(true) {
                        yes
                    } else {
                        no
                    }
                );
            };
            attached(
                "syscall_programs_attached",
                "syscall programs attached: a branch asks for per-write detail (every process on the host pays for them)",
                "syscall programs detached: no branch asks for per-write detail",
            );
            attached(
                "page_fault_programs_attached",
                "page-fault programs attached: branches are traced (every page fault on the host runs them)",
                "page-fault programs detached: no branch is traced",
            );
        }
        None => println!("not tracing branches (daemon started with --no-trace)"),
    }
    match s["metrics_addr"].as_str() {
        Some(a) => println!("metrics on http://{a}/metrics"),
        None => println!("no metrics (daemon started with --metrics-addr off)"),
    }
    Ok(ExitCode::SUCCESS)
}
