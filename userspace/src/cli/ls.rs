//! `forkscope ls [--tree] [--json]`: the live branches, their processes and private memory.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use hyper::Method;
use serde_json::Value;

/// List live branches.
#[derive(Args)]
pub struct LsArgs {
    /// Show forks under their parents.
    #[arg(long)]
    tree: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn print_tree(all: &[Value], parent: Option<&str>, depth: usize) {
    for b in all.iter().filter(|b| b["parent"].as_str() == parent) {
        let name = b["name"].as_str().unwrap_or("?");
        let pages = b["private_pages"]
            .as_u64()
            .map(|p| format!(", {p} private pages"))
            .unwrap_or_default();
        println!(
            "{}{name} ({}{pages})",
            "  ".repeat(depth),
            b["status"].as_str().unwrap_or("?")
        );
        print_tree(all, Some(name), depth + 1);
    }
}

pub fn run(args: LsArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let list = super::client::call(&socket, Method::GET, "/v1/branches", None)?;
    let all = list.as_array().cloned().unwrap_or_default();
    if args.json {
        println!("{list}");
    } else if args.tree {
        print_tree(&all, None, 0);
    } else {
        println!(
            "{:<20} {:<20} {:<8} {:>5} {:>10} {:<30} COMMAND",
            "NAME", "PARENT", "STATUS", "PROCS", "PRIVATE", "WORKSPACE"
        );
        for b in &all {
            let cmd: Vec<&str> = b["command"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str())
                .collect();
            let private = match b["private_bytes"].as_u64() {
                Some(n) => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
                None => "-".into(),
            };
            println!(
                "{:<20} {:<20} {:<8} {:>5} {:>10} {:<30} {}",
                b["name"].as_str().unwrap_or("?"),
                b["parent"].as_str().unwrap_or("-"),
                b["status"].as_str().unwrap_or("?"),
                b["processes"].as_array().map_or(0, |p| p.len()),
                private,
                b["workspace"].as_str().unwrap_or("?"),
                cmd.join(" ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
