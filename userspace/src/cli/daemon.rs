//! `forkscope daemon [--state-dir DIR]`: serves the API on the socket until SIGINT/SIGTERM.
//! Branches keep running when it stops; a new daemon on the same state directory serves them.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Args;

/// Run the forkscope daemon in the foreground (systemd and tests run it so).
#[derive(Args)]
pub struct DaemonArgs {
    /// Where branch records, layers and upper directories live.
    #[arg(long, default_value = forkscope::api::DEFAULT_STATE_DIR, env = "FORKSCOPE_STATE_DIR")]
    state_dir: PathBuf,
    /// Do not load the eBPF programs: no per-branch traces (`forkscope trace --branch`).
    #[arg(long)]
    no_trace: bool,
    /// Let members of GROUP use the socket too (mode 0660). They can then run commands in
    /// sandboxes as the daemon does: give it to trusted users only.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Where the recording proxy for `buffer` rules listens (IPv4 loopback; port 0: any
    /// free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    proxy_addr: std::net::SocketAddrV4,
    /// Where Prometheus scrapes `/metrics` (`off`: not served).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9633", value_parser = metrics_addr)]
    metrics_addr: MetricsAddr,
    /// Export per-branch series (labelled `branch`), for at most N branches.
    #[arg(long, value_name = "N", default_value_t = 0, num_args = 0..=1, default_missing_value = "100")]
    metrics_branch_labels: usize,
    /// How long the syscall programs (per-write detail) and the page-fault programs, each a
    /// cost to every process on the host, stay attached after the last branch that needed
    /// them goes, in seconds: a branch started within it does not wait for them again.
    #[arg(long, value_name = "SECONDS", default_value_t = forkscope::tracker::DETACH_GRACE.as_secs_f64(), value_parser = grace)]
    detach_grace: f64,
}

fn grace(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: give a number of seconds from 0 to 86400")),
    }
}

/// `--metrics-addr`: an address, or off.
#[derive(Clone, Copy, Debug)]
struct MetricsAddr(Option<std::net::SocketAddr>);

fn metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (give HOST:PORT such as 127.0.0.1:9633, or off)"))
}

pub fn run(args: DaemonArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    // Before any thread starts: setns moves only the calling thread.
    forkscope::sys::join_host_cgroup_namespace();
    let bin = std::env::current_exe().context("finding the forkscope binary")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stop = super::interrupted()?;
        forkscope::say!(
            "forkscope daemon: state in {}, listening on {}",
            args.state_dir.display(),
            socket.display()
        );
        let opts = forkscope::api::server::ServeOptions {
            state_dir: args.state_dir.clone(),
            socket: socket.clone(),
            forkscope_bin: bin,
            trace: !args.no_trace,
            socket_group: args.socket_group.clone(),
            proxy_addr: args.proxy_addr,
            metrics_addr: args.metrics_addr.0,
            metrics_branch_labels: args.metrics_branch_labels,
            detach_grace: std::time::Duration::from_secs_f64(args.detach_grace),
        };
        forkscope::api::server::serve(&opts, stop).await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
