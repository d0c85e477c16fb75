//! `forkscope effects BRANCH [--json]`: the side effects a branch's policy held back or
//! recorded (buffered requests), with their state and age.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use hyper::Method;

/// List a branch's held and recorded side effects.
#[derive(Args)]
pub struct EffectsArgs {
    branch: String,
    #[arg(long)]
    json: bool,
}

pub fn run(args: EffectsArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let list = super::client::call(
        &socket,
        Method::GET,
        &super::client::branch_path(&args.branch, "/effects"),
        None,
    )?;
    if args.json {
        println!("{list}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<6} {:<7} {:<8} {:<22} {:>8} {:>8}  WHAT",
        "ID", "STATE", "KIND", "DESTINATION", "BYTES", "AGE"
    );
    for e in list.as_array().into_iter().flatten() {
        println!(
            "{:<6} {:<7} {:<8} {:<22} {:>8} {:>7.1}s  {}{}",
            e["id"],
            e["state"].as_str().unwrap_or("?"),
            e["kind"].as_str().unwrap_or("?"),
            format!("{}:{}", e["addr"].as_str().unwrap_or("?"), e["port"]),
            e["bytes"],
            e["age_s"].as_f64().unwrap_or(0.0),
            e["summary"].as_str().unwrap_or(""),
            e["result"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
        );
    }
    Ok(ExitCode::SUCCESS)
}
