//! `cargo xtask`: installs what the project needs, builds the test VM and
//! runs everything. See `cargo xtask --help` and tests/README.md.
#![forbid(unsafe_code)]

mod bench_report;
mod deb;
mod deps;
mod dist;
mod systemd_vm;
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
    /// Install the Debian packages and fetch the VM kernels (idempotent).
    Deps,
    /// The main job: boot the VM, start two nodes, run a protected
    /// client/server exchange and narrate what happened.
    Demo,
    /// Everything: format and lint checks, host tests, `systemd-analyze
    /// verify` of the units, every VM scenario, and the systemd VM.
    Test {
        /// Skip the VM scenarios (host checks only).
        #[arg(long)]
        host_only: bool,
        /// Only VM scenarios whose name contains this (comma-separated
        /// alternatives; `systemd` selects the systemd VM).
        #[arg(long)]
        filter: Option<String>,
        /// The kernels the VM scenarios run on: all, or a comma-separated
        /// list of 6.1, 6.12 (the systemd VM always runs bookworm's 6.1).
        #[arg(long, default_value = "all")]
        kernel: String,
    },
    /// Build the install directory and tarball under target/dist
    /// (binaries, systemd units, example configs, install.sh).
    Dist,
    /// Build the Debian package target/dist/tlshub_VERSION_amd64.deb (the
    /// dist's binaries, units, configs as conffiles, --help texts; prerm
    /// stops the units and detaches the BPF programs).
    Deb,
    /// Build, then install on this machine with the dist's install.sh
    /// (through sudo unless root). Arguments after `--` go to install.sh,
    /// e.g. `cargo xtask install -- --root /tmp/img` or `-- --uninstall`.
    Install {
        /// Passed to install.sh.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks in one VM run (Linux 6.1 unless `--kernel`): plain TCP,
    /// raw kTLS, WireGuard, a stunnel pair and each provider side by side
    /// (setup, throughput, gate holds, collateral stall, concurrency,
    /// request/response, eight streams); figures also written to
    /// `target/bench/figures-<kernel>.{json,csv,md}` (with `--quick`,
    /// `figures-quick-<kernel>.*`).
    Bench {
        /// The kernel the VM boots: 6.1 or 6.12 (one run measures one
        /// kernel; ratios compare only within a run).
        #[arg(long, default_value = "6.1")]
        kernel: String,
        /// An earlier run's `figures-<kernel>.json`: print each figure
        /// of this run next to it, with the ratio.
        #[arg(long)]
        compare: Option<std::path::PathBuf>,
        /// Only a small subset, for use while developing (a few minutes):
        /// setup, request/response and one stream for plain TCP, raw kTLS,
        /// the stunnel pair and each provider, with smaller samples (its own
        /// part, `quick`).
        #[arg(long)]
        quick: bool,
    },
    /// Print a saved run's figures (`target/bench/figures-<kernel>.json`)
    /// as Markdown tables and draw its SVG charts, one per part: how the
    /// README's measurement tables and `docs/bench/` are made.
    BenchReport {
        /// The figures file.
        file: std::path::PathBuf,
        /// Where the charts go.
        #[arg(long, default_value = "target/bench")]
        charts: std::path::PathBuf,
        /// Print each other subject's figure with its ratio to this
        /// subject's (e.g. `"no tlshub"`).
        #[arg(long)]
        against: Option<String>,
    },
    /// Boot the VM in a mode (test, bench, demo, stress, capacity, systemd)
    /// without the host checks.
    Vm {
        /// What the VM runs.
        #[arg(long, value_enum, default_value_t = VmMode::Test)]
        mode: VmMode,
        /// Only scenarios whose name contains this.
        #[arg(long)]
        filter: Option<String>,
        /// Runs each selected scenario this many times in one boot (for
        /// hunting rare failures; every run must pass).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
        repeat: u32,
        /// The kernels: all, or a comma-separated list of 6.1, 6.12 (test
        /// mode; the other modes take the first one named).
        #[arg(long, default_value = "6.1")]
        kernel: String,
        /// Capacity mode: protected connections to open and hold at once.
        #[arg(long, default_value_t = 100_000)]
        connections: u64,
        /// Bench mode: an earlier run's `figures-<kernel>.json` to print
        /// this run's figures against.
        #[arg(long)]
        compare: Option<std::path::PathBuf>,
    },
}

/// What a VM boot runs (`cargo xtask vm --mode`); the in-VM runner reads
/// the same names from the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum VmMode {
    /// The scenarios of `cargo xtask test`.
    Test,
    /// The benchmark's parts (`--filter` picks some); their figures are
    /// written to `target/bench/figures-<kernel>.{json,csv,md}`, or
    /// `figures-<parts>-<kernel>.*` for some parts.
    Bench,
    /// The narrated demo.
    Demo,
    /// Attach and detach under hook traffic, 40 rounds.
    Stress,
    /// Open and hold `--connections` protected connections on one node
    /// (in a VM with more memory), then check a new one is still keyed.
    Capacity,
    /// The systemd VM (Debian userland, systemd as PID 1).
    Systemd,
    /// Where the core's CPU goes: `perf record` on one node's core while
    /// 300 connections are keyed (TLSHub provider) and then for 20 s idle,
    /// with `perf report` of each (needs `perf` on this machine: Debian's
    /// `linux-perf`).
    Profile,
}

impl VmMode {
    /// The name on the command line and the kernel command line.
    fn name(self) -> &'static str {
        match self {
            Self::Test => "test",
            Self::Bench => "bench",
            Self::Demo => "demo",
            Self::Stress => "stress",
            Self::Capacity => "capacity",
            Self::Systemd => "systemd",
            Self::Profile => "profile",
        }
    }
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

/// Whether the systemd VM runs under `filter` (none: yes): an alternative
/// that is part of its scenario's name selects it.
fn wants_systemd(filter: Option<&str>) -> bool {
    filter.is_none_or(|f| f.split(',').any(|f| systemd_vm::SCENARIO.contains(f)))
}

/// Whether the plain VM runs under `filter`: unless every alternative
/// names the systemd VM.
fn wants_plain(filter: Option<&str>) -> bool {
    filter.is_none_or(|f| f.split(',').any(|f| !f.contains("systemd")))
}

/// One lane per kernel line, each running `run`'s scenarios. The kernels
/// are fetched here, one after the other, before any lane starts, so that
/// lanes on a clean clone never download and unpack into the kernel cache
/// (`target/vm-cache`) at the same time.
fn test_lanes<'a>(
    run: &'a vm::Run,
    kernels: &[deps::KernelLine],
    bins: &'a std::path::Path,
) -> Result<Vec<vm::Lane<'a>>> {
    for line in kernels {
        deps::kernel(*line)?;
    }
    Ok(kernels
        .iter()
        .map(|&line| vm::Lane {
            name: line.name.to_string(),
            steps: vec![Box::new(move || vm::run_mode(run, line, bins)) as vm::Step<'a>],
        })
        .collect())
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Deps => {
            deps::install()?;
            for line in deps::KERNEL_LINES {
                deps::kernel(*line)?;
            }
        }
        Cmd::Demo => {
            deps::install()?;
            let bins = vm::build_binaries()?;
            vm::run_mode(&vm::Run::new("demo"), deps::KERNEL_LINES[0], &bins)?;
        }
        Cmd::Test {
            host_only,
            filter,
            kernel,
        } => {
            deps::install()?;
            let kernels = deps::kernel_lines(&kernel)?;
            host_checks()?;
            if host_only {
                let dist = dist::assemble(&dist::build_product()?)?;
                dist::verify_units(&dist)?;
                deb::build(&dist)?;
            } else {
                let bins = vm::build_binaries()?;
                let dist = dist::assemble(&bins)?;
                dist::verify_units(&dist)?;
                deb::build(&dist)?;
                let run = vm::Run {
                    filter: filter.clone(),
                    ..vm::Run::new("test")
                };
                let kernels = match wants_plain(filter.as_deref()) {
                    true => kernels,
                    false => Vec::new(),
                };
                let lanes = vm::run_lanes(test_lanes(&run, &kernels, &bins)?);
                // The systemd VM runs alone, after the lanes: it measures
                // how long a core restart leaves new connections waiting,
                // and next to another boot the restart took twice as long
                // (a core's start loads and verifies every BPF program).
                let systemd = match wants_systemd(filter.as_deref()) {
                    true => systemd_vm::run_systemd(&bins),
                    false => Ok(()),
                };
                lanes?;
                systemd?;
            }
        }
        Cmd::Dist => {
            deps::install()?;
            dist::assemble(&dist::build_product()?)?;
        }
        Cmd::Deb => {
            deps::install()?;
            deb::build(&dist::assemble(&dist::build_product()?)?)?;
        }
        Cmd::Install { args } => {
            deps::install()?;
            dist::install_here(&args)?;
        }
        Cmd::Bench {
            kernel,
            compare,
            quick,
        } => {
            let compare = bench_report::load_compare(compare)?;
            let line = deps::kernel_line(&kernel)?;
            deps::install()?;
            let bins = vm::build_binaries()?;
            let mut run = vm::Run::new("bench");
            run.compare = compare;
            if quick {
                run.filter = Some("quick".into());
            }
            vm::run_mode(&run, line, &bins)?;
        }
        Cmd::BenchReport {
            file,
            charts,
            against,
        } => {
            let report = bench_report::load(&file)?;
            std::fs::create_dir_all(&charts)?;
            for part in report.parts() {
                let svg = charts.join(format!("{part}-{}.svg", report.kernel));
                bench_report::chart(&report, part, &svg)?;
                eprintln!("== chart: {}", svg.display());
            }
            print!("{}", report.to_markdown_against(against.as_deref()));
        }
        Cmd::Vm {
            mode,
            filter,
            repeat,
            kernel,
            connections,
            compare,
        } => {
            let compare = bench_report::load_compare(compare)?;
            deps::install()?;
            let kernels = deps::kernel_lines(&kernel)?;
            let bins = vm::build_binaries()?;
            let mut run = vm::Run::new(mode.name());
            run.filter = filter;
            run.repeat = repeat;
            run.compare = compare;
            if mode == VmMode::Capacity {
                run.connections = Some(connections);
                run.memory_mib = vm::CAPACITY_MEMORY_MIB;
            }
            match mode {
                VmMode::Systemd => systemd_vm::run_systemd(&bins)?,
                VmMode::Test => vm::run_lanes(test_lanes(&run, &kernels, &bins)?)?,
                VmMode::Bench
                | VmMode::Demo
                | VmMode::Stress
                | VmMode::Capacity
                | VmMode::Profile => vm::run_mode(&run, kernels[0], &bins)?,
            }
        }
    }
    Ok(())
}
