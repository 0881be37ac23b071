//! `cargo xtask`: installs what the project needs, builds the test VM and
//! runs everything. See `cargo xtask --help` and tests/README.md.
#![forbid(unsafe_code)]

mod deps;
mod vm;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// tlshub build and test orchestration.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the Debian packages and fetch the VM kernel (idempotent).
    Deps,
    /// The main job: boot the VM, start two nodes, run a protected
    /// client/server exchange and narrate what happened.
    Demo,
    /// Everything: format and lint checks, host tests, and every VM scenario.
    Test {
        /// Skip the VM scenarios (host checks only).
        #[arg(long)]
        host_only: bool,
        /// Only VM scenarios whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Benchmarks in one VM run: setup latency and throughput, plain vs
    /// protected, and gate hold statistics.
    Bench,
    /// Boot the VM in a mode (test, bench, demo) without the host checks.
    Vm {
        /// test | bench | demo
        #[arg(long, default_value = "test")]
        mode: String,
        /// Only scenarios whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
}

/// Runs a command, failing with its name if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// The workspace root.
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(ToOwned::to_owned)
        .unwrap_or_default()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn host_checks() -> Result<()> {
    println!("== cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    println!("== cargo clippy -D warnings");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    println!("== host tests");
    run(cargo().args(["test", "--workspace"]))?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Deps => {
            deps::install()?;
            deps::kernel()?;
        }
        Cmd::Demo => {
            deps::install()?;
            vm::run_mode("demo", None)?;
        }
        Cmd::Test { host_only, filter } => {
            deps::install()?;
            host_checks()?;
            if !host_only {
                vm::run_mode("test", filter.as_deref())?;
            }
        }
        Cmd::Bench => {
            deps::install()?;
            vm::run_mode("bench", None)?;
        }
        Cmd::Vm { mode, filter } => {
            deps::install()?;
            vm::run_mode(&mode, filter.as_deref())?;
        }
    }
    Ok(())
}
