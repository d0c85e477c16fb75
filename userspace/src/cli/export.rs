//! `forkscope export BRANCH [--tree] [-o FILE]`: a branch's trace (with `--tree`, the
//! branch's and every branch forked from it, directly or not) in the Chrome/Perfetto
//! trace-event JSON format, for ui.perfetto.dev.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Args;
use hyper::Method;

/// Export branch traces for Perfetto (trace-event JSON).
#[derive(Args)]
pub struct ExportArgs {
    branch: String,
    /// Also the branches forked from it (one track each).
    #[arg(long)]
    tree: bool,
    /// Where to write (default: standard output).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

pub fn run(args: ExportArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let branches = fetch(&socket, &args.branch, args.tree)?;
    let doc = forkscope::perfetto::export(&branches);
    let text = serde_json::to_string(&doc)?;
    match &args.output {
        Some(f) => std::fs::write(f, text)?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The recorded traces of `branch` (with `tree`, and of every branch forked from it,
/// directly or not, parents before children): (name, its records).
pub fn fetch(
    socket: &Path,
    branch: &str,
    tree: bool,
) -> anyhow::Result<Vec<(String, Vec<serde_json::Value>)>> {
    let mut names = vec![branch.to_string()];
    if tree {
        let all = super::client::call(socket, Method::GET, "/v1/branches", None)?;
        let all: Vec<(String, Option<String>)> = all
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                (
                    b["name"].as_str().unwrap_or("").to_string(),
                    b["parent"].as_str().map(str::to_string),
                )
            })
            .collect();
        let mut i = 0;
        while i < names.len() {
            let parent = names[i].clone();
            names.extend(
                all.iter()
                    .filter(|(_, p)| p.as_deref() == Some(parent.as_str()))
                    .map(|(n, _)| n.clone()),
            );
            i += 1;
        }
    }
    let mut branches = Vec::new();
    for name in names {
        let text = super::client::call_text(
            socket,
            Method::GET,
            &super::client::branch_path(&name, "/trace"),
        )?;
        // The tracer may be writing a line: one not ended yet is not part of the trace.
        let whole = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        let events = whole
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<Vec<serde_json::Value>, _>>()?;
        branches.push((name, events));
    }
    Ok(branches)
}
