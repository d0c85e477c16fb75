//! Command-line parsing (clap) and dispatch, one file per subcommand.

mod abort;
mod attach;
mod client;
mod commit;
mod daemon;
mod diff;
mod effects;
mod exec;
mod export;
mod fork;
mod ls;
mod policy;
mod report;
mod run;
mod status;
mod trace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for forkscope's own failures (as `timeout` and `env` do), so it cannot be
/// mistaken for the traced command's status.
pub const EXIT_FORKSCOPE_FAILED: u8 = 125;

#[derive(Parser)]
#[command(
    name = "forkscope",
    version,
    about = "Branch Linux sandboxes and see every side effect, with eBPF"
)]
struct Cli {
    /// Log level for forkscope's own messages (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn", env = "FORKSCOPE_LOG")]
    log: log::LevelFilter,
    /// The daemon's socket.
    #[arg(long, global = true, default_value = forkscope::api::DEFAULT_SOCKET, env = "FORKSCOPE_SOCKET")]
    socket: std::path::PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Trace(trace::TraceArgs),
    Daemon(daemon::DaemonArgs),
    Run(run::RunArgs),
    Exec(exec::ExecArgs),
    Attach(attach::AttachArgs),
    Fork(fork::ForkArgs),
    Ls(ls::LsArgs),
    Diff(diff::DiffArgs),
    Commit(commit::CommitArgs),
    Abort(abort::AbortArgs),
    Status(status::StatusArgs),
    Policy(policy::PolicyArgs),
    Effects(effects::EffectsArgs),
    Export(export::ExportArgs),
    Report(report::ReportArgs),
    /// Internal: builds a branch's sandbox and becomes its init (started by the daemon).
    #[command(name = "__init", hide = true)]
    Init {
        spec: std::path::PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log);
    let result = match cli.command {
        Command::Trace(args) => trace::run(args, cli.socket),
        Command::Daemon(args) => daemon::run(args, cli.socket),
        Command::Run(args) => run::run(args, cli.socket),
        Command::Exec(args) => exec::run(args, cli.socket),
        Command::Attach(args) => attach::run(args, cli.socket),
        Command::Fork(args) => fork::run(args, cli.socket),
        Command::Ls(args) => ls::run(args, cli.socket),
        Command::Diff(args) => diff::run(args, cli.socket),
        Command::Commit(args) => commit::run(args, cli.socket),
        Command::Abort(args) => abort::run(args, cli.socket),
        Command::Status(args) => status::run(args, cli.socket),
        Command::Policy(args) => policy::run(args, cli.socket),
        Command::Effects(args) => effects::run(args, cli.socket),
        Command::Export(args) => export::run(args, cli.socket),
        Command::Report(args) => report::run(args, cli.socket),
        Command::Init { spec } => match forkscope::sandbox::init::main(&spec) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(_) => Ok(ExitCode::FAILURE),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            forkscope::say!("forkscope: {e:#}");
            ExitCode::from(EXIT_FORKSCOPE_FAILED)
        }
    }
}

/// Installs SIGINT and SIGTERM handlers now (inside a tokio runtime) and returns a future
/// that completes on either.
pub fn interrupted() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// A minimal stderr logger for the `log` facade.
fn init_logging(level: log::LevelFilter) {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= log::max_level()
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                forkscope::say!(
                    "forkscope: {}: {}",
                    r.level().as_str().to_lowercase(),
                    r.args()
                );
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: Stderr = Stderr;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
