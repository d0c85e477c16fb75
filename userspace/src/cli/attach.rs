//! `forkscope attach BRANCH [--terminal PATH]`: connects this terminal to a terminal of the
//! branch (a fork gives one to the clone of a process that had a terminal): what is typed
//! here goes to it, and what it prints comes here (and to the branch's log as always), all
//! relayed by this process over the init's control socket. Ctrl-] or the end of stdin
//! detaches; what runs on the terminal goes on.

use std::{os::fd::AsFd, path::PathBuf, process::ExitCode};

use clap::Args;
use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};

/// Connect to a terminal of a branch (Ctrl-] detaches).
#[derive(Args)]
pub struct AttachArgs {
    branch: String,
    /// The terminal's path in the branch (default: the newest).
    #[arg(long)]
    terminal: Option<String>,
}

/// This terminal in raw mode (keys go through as typed, Ctrl-C included) until dropped.
struct RawMode(Termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.0);
    }
}

pub fn run(args: AttachArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let control = super::exec::running_init(&socket, &args.branch)?;
    let input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let raw = RawMode::enter();
    let branch = args.branch.clone();
    let shown = raw.is_some();
    let attached = forkscope::sandbox::control::attach(
        &control,
        args.terminal,
        input,
        std::io::stdout().lock(),
        |path| {
            if shown {
                forkscope::say_raw!("attached to {path} of {branch}; Ctrl-] detaches\r\n");
            }
        },
    );
    drop(raw);
    attached?;
    if shown {
        forkscope::say!("\ndetached from {}", args.branch);
    }
    Ok(ExitCode::SUCCESS)
}
