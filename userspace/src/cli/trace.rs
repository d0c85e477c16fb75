//! `forkscope trace [--output FILE] [--format jsonl] -- CMD [ARGS...]`: trace one command.
//! `forkscope trace --branch NAME [--follow]`: a branch's trace, kept by the daemon.

use std::{ffi::OsString, fs::File, io::BufWriter, io::Write, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, ValueEnum};
use forkscope::{
    Error,
    bpf::ProbeOptions,
    trace::{self, TraceOptions},
};

/// Output formats of the event stream.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
}

/// Run a command in a fresh cgroup and write every side effect it has as JSON lines:
/// file writes, renames, unlinks, metadata changes, connects and sends, processes, and the
/// pages each process dirtied. A summary goes to stderr; the exit status is the command's
/// (127: not found, 126: not executable, 125: forkscope itself failed, 130: interrupted).
#[derive(Args)]
pub struct TraceArgs {
    /// Write events to FILE instead of stdout (recommended when the command writes to stdout).
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Event format.
    #[arg(long, value_enum, default_value = "jsonl")]
    format: Format,
    /// List each process's dirtied pages as address ranges in its page_dirty_summary.
    #[arg(long)]
    page_addresses: bool,
    /// Ring buffer size in MiB (a power of two); raise it if events are lost.
    #[arg(long, default_value_t = 16, value_parser = parse_ring_mb)]
    ring_mb: u32,
    /// Capacity of the kernel's dirty-page set, in 2 MiB regions of one process each; raise
    /// it if the summary says dirtied pages are inexact (each region takes about 150 bytes
    /// of kernel memory).
    #[arg(long, value_name = "N", default_value_t = ProbeOptions::default().dirty_region_capacity, value_parser = clap::value_parser!(u32).range(64..=1 << 24))]
    dirty_regions: u32,
    /// Write the summary as JSON to FILE as well.
    #[arg(long, value_name = "FILE")]
    summary_json: Option<PathBuf>,
    /// Print no summary on stderr.
    #[arg(short, long)]
    quiet: bool,
    /// One file_write / net_send record per syscall. By default a thread's run of writes to
    /// one file (at consecutive offsets) or to one connected socket is merged into records
    /// whose `calls` field says how many syscalls each stands for: the same bytes, at a
    /// fraction of the cost.
    #[arg(long, conflicts_with = "branch")]
    every_write: bool,
    /// Print the trace the daemon keeps of branch NAME instead of running a command.
    #[arg(long, value_name = "NAME", conflicts_with = "command")]
    branch: Option<String>,
    /// With --branch: keep printing new events until the branch is aborted (or Ctrl-C).
    #[arg(long, requires = "branch")]
    follow: bool,
    /// The command to trace, after `--`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required_unless_present = "branch",
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

fn parse_ring_mb(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of MiB"))?;
    if n == 0 || !n.is_power_of_two() || n > 1024 {
        return Err(format!(
            "{n} MiB: the ring buffer size must be a power of two from 1 to 1024"
        ));
    }
    Ok(n)
}

/// `--branch`: streams the daemon's trace of a branch to the output.
fn branch_trace(
    args: &TraceArgs,
    name: &str,
    socket: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(
            File::create(p)
                .with_context(|| format!("cannot create output file {}", p.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let path = super::client::branch_path(
        name,
        if args.follow {
            "/trace?follow=true"
        } else {
            "/trace"
        },
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, err) = runtime.block_on(async {
        let stop = super::interrupted()?;
        tokio::select! {
            r = forkscope::api::client::request_stream(socket, hyper::Method::GET, &path, |chunk| {
                out.write_all(chunk)?;
                out.flush()
            }) => anyhow::Ok(r?),
            () = stop => anyhow::Ok((200, serde_json::Value::Null)),
        }
    })?;
    if !(200..300).contains(&status) {
        anyhow::bail!(
            "{} (HTTP {status})",
            err["error"].as_str().unwrap_or("no message")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: TraceArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    if let Some(name) = args.branch.clone() {
        return branch_trace(&args, &name, &socket);
    }
    let Format::Jsonl = args.format;
    let opts = TraceOptions {
        command: args.command,
        page_addresses: args.page_addresses,
        probe: ProbeOptions {
            ring_bytes: args.ring_mb << 20,
            merge_writes: !args.every_write,
            dirty_region_capacity: args.dirty_regions,
        },
    };
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => {
            Box::new(BufWriter::new(File::create(p).with_context(|| {
                format!("cannot create output file {}", p.display())
            })?))
        }
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Catch Ctrl-C from the start, so an interrupt while the programs load still goes
    // through trace::run's clean-up instead of killing us with a cgroup behind.
    let cancel = {
        let _guard = runtime.enter();
        super::interrupted()?
    };
    let result = runtime.block_on(trace::run(&opts, &mut out, cancel));
    let outcome = match result {
        Ok(o) => o,
        Err(Error::CommandNotFound(c)) => {
            forkscope::say!("forkscope: command not found: {c}");
            return Ok(ExitCode::from(127));
        }
        Err(Error::CommandNotExecutable(c, e)) => {
            forkscope::say!("forkscope: cannot execute {c}: {e}");
            return Ok(ExitCode::from(126));
        }
        Err(e) => return Err(e.into()),
    };
    out.flush()?;
    if !args.quiet {
        forkscope::say_raw!("{}", outcome.summary.render());
    }
    if let Some(p) = &args.summary_json {
        let f = File::create(p).with_context(|| format!("cannot create {}", p.display()))?;
        serde_json::to_writer_pretty(f, &outcome.summary)?;
    }
    if outcome.cancelled {
        forkscope::say!("forkscope: interrupted; the command's processes were killed");
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::from(outcome.exit_code.clamp(0, 255) as u8))
}
