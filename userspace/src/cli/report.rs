//! `forkscope report [BRANCH] [--tree] [--input FILE] [--json] [--svg FILE]`: what a trace
//! shows, per branch (events by kind, top files and destinations, fork and commit
//! latencies), from the daemon or from a `forkscope export` file, as text or JSON, with an
//! SVG chart of the branch tree over time.

use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::{Context, bail};
use clap::Args;

/// Summarize branch traces: per branch, events by kind, top files and destinations, fork
/// and commit latencies; optionally an SVG chart of the branch tree over time.
#[derive(Args)]
pub struct ReportArgs {
    /// The branch to report on (from the daemon).
    #[arg(conflicts_with = "input")]
    branch: Option<String>,
    /// Also the branches forked from it, directly or not.
    #[arg(long, requires = "branch")]
    tree: bool,
    /// Read the traces from a file written by `forkscope export` instead of the daemon.
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Print the figures as JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also write an SVG chart of the branch tree over time to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

pub fn run(args: ReportArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let traces = match (&args.input, &args.branch) {
        (Some(file), _) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let doc: serde_json::Value = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not JSON: give a file written by `forkscope export`",
                    file.display()
                )
            })?;
            forkscope::report::from_perfetto(&doc)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
        }
        (None, Some(branch)) => super::export::fetch(&socket, branch, args.tree)?,
        (None, None) => bail!(
            "name a branch (`forkscope report BRANCH [--tree]`), or give a file written by `forkscope export` (`--input FILE`)"
        ),
    };
    let report = forkscope::report::report(&traces);
    if let Some(file) = &args.svg {
        let svg =
            forkscope::report::svg::chart(&report, &forkscope::report::svg::event_times(&traces));
        std::fs::write(file, svg).with_context(|| format!("writing {}", file.display()))?;
    }
    let text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        report.render()
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
