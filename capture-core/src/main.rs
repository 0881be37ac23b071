//! `tlshub-core`: the node agent. Loads the eBPF programs, keys selected
//! connections through a provider and installs kTLS on them.
#![forbid(unsafe_code)]

mod admin;
mod agent;
mod bpf;
mod config;
mod conntrack;
mod files;
mod keying;
mod metrics;
mod netns;
mod outcomes;
mod peers;
mod pidfds;
mod preflight;
mod procfs;
mod providers;
mod release;
mod service;
mod sockdiag;
mod state;
mod sys;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::config::{Config, FailurePolicy};

/// The tlshub node agent: captures selected TCP connections with eBPF,
/// holds their processes until keys are installed, gets keys from a
/// provider over gRPC and installs them with kernel TLS.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short, global = true, default_value = "/etc/tlshub/core.toml")]
    config: PathBuf,
    /// Use one provider at this socket (named `default`), instead of the
    /// config's `[provider]` socket or endpoints.
    #[arg(long)]
    provider_socket: Option<PathBuf>,
    /// Override `admin.socket`.
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Override `metrics.listen` (ADDR:PORT).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Override `provider.timeout_ms`, the key timeout (one name for the
    /// setting: the flag is the config key).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    provider_timeout_ms: Option<u64>,
    /// Override `failure_policy`.
    #[arg(long, value_enum)]
    failure_policy: Option<FailurePolicy>,
    /// Write counters and samples as JSON to this file every second and at exit.
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// DEBUGGING AND TESTS ONLY: append every installed key to this file
    /// (one JSON line per connection) so captures can be decrypted.
    #[arg(long)]
    keylog_file: Option<PathBuf>,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// For when no core is coming back: apply the failure policy to the
    /// connections still waiting for keys (reset them, or let them through),
    /// make the gate stop holding, continue the processes it stopped. The
    /// programs stay attached (refusing or passing per the policy) unless
    /// --detach removes them.
    Release {
        /// Also detach the programs and remove the pinned maps (new
        /// connections are then not protected at all).
        #[arg(long)]
        detach: bool,
        /// First give a restarting core its grace (`core_restart_grace_ms`)
        /// to come back: if a core beats again in that time, do nothing.
        /// This is what the systemd stop hook runs, so that a restart
        /// (crash or `systemctl restart`) keeps waiting connections and an
        /// ordinary stop still releases them.
        #[arg(long)]
        wait_for_core: bool,
    },
    /// Check whether this host can run the core: kernel TLS, BTF, the BPF
    /// LSM, cgroup v2, bpffs, capabilities, pidfd_getfd, and a trial load
    /// of every BPF program (nothing is attached). Reads --config when it
    /// exists, the defaults otherwise. Exit status: 0 every requirement
    /// met, 1 something missing (each MISSING line says what to change).
    Check {
        /// Print the report as JSON (`{"checks": [{name, ok, found,
        /// remedy}]}`).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    tlshub_provider_sdk::runtime::init_logging();
    // Before the configuration loads: a fresh host has none yet.
    if let Some(Command::Check { json }) = args.command {
        let report = preflight::assess(&preflight::Facts::read(&args.config));
        if json {
            match serde_json::to_string_pretty(&report) {
                Ok(text) => println!("{text}"),
                Err(e) => {
                    eprintln!("tlshub-core check: cannot encode the report: {e}");
                    return ExitCode::from(2);
                }
            }
        } else {
            print!("{}", preflight::render(&report));
        }
        return if report.ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    tlshub_provider_sdk::runtime::raise_open_files_limit();
    let mut config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tlshub-core: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(s) = args.provider_socket {
        config.provider.socket = Some(s);
        config.provider.endpoints.clear();
        config.provider.active = None;
        config.provider.fallback = None;
    }
    if let Some(s) = args.admin_socket {
        config.admin.socket = s;
    }
    if let Some(l) = args.metrics_listen {
        config.metrics.listen = l;
    }
    if let Some(t) = args.provider_timeout_ms {
        config.provider.timeout_ms = t;
    }
    if let Some(p) = args.failure_policy {
        config.failure_policy = p;
    }
    // The named providers as the flags left them (the file's were checked
    // when it loaded; `--provider-socket` replaces them).
    let providers = match config.provider.resolve() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tlshub-core: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("{}: OK", args.config.display());
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Release {
        detach,
        wait_for_core,
    }) = args.command
    {
        return match release::release(&config, detach, wait_for_core) {
            Ok(None) => {
                println!("a core is running again: nothing released");
                ExitCode::SUCCESS
            }
            Ok(Some(r)) => {
                println!(
                    "released: {} reset, {} let through, {} failing with ECONNRESET, {} aborted by their tuple, {} processes continued{}",
                    r.reset,
                    r.passed,
                    r.terminal,
                    r.aborted,
                    r.continued,
                    if r.detached {
                        ", programs detached"
                    } else {
                        ""
                    }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tlshub-core release: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    // One thread for everything async: the event loop (which polls the
    // keying jobs itself), the provider clients' connections, the admin
    // and metrics endpoints. Why not a worker pool: each wakeup that
    // crossed threads (the ring buffer's readiness noticed by a worker and
    // handed to the thread running the event loop; a provider's answer read
    // by one thread for a job polled by another) was a millisecond or more
    // of every connection's setup in the benchmark's VM (ARCHITECTURE.md,
    // "Where setup time goes"). The work between awaits is a few system
    // calls per connection; what can take long (a search of a process's
    // fds, a conntrack lookup) runs on blocking threads.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tlshub-core: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let keylog = match &args.keylog_file {
            None => None,
            Some(path) => {
                tracing::warn!(path = %path.display(), "KEY EXPORT IS ON: every installed key is written to this file; never use this in production");
                match std::fs::OpenOptions::new().create(true).append(true).open(path) {
                    Ok(f) => Some(keying::KeyLog(std::sync::Arc::new(std::sync::Mutex::new(f)))),
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "cannot open key export file");
                        return ExitCode::FAILURE;
                    }
                }
            }
        };
        let metrics = std::sync::Arc::new(metrics::Metrics::new());
        let admin_socket = config.admin.socket.clone();
        let metrics_config = config.metrics.clone();
        let agent = match agent::Agent::start(
            config,
            &providers,
            args.config.clone(),
            metrics.clone(),
            args.stats_file,
            keylog,
        ) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "cannot start");
                return ExitCode::FAILURE;
            }
        };
        let (admin_tx, admin_rx) = tokio::sync::mpsc::channel(16);
        let service = admin::AdminService::new(
            admin_tx,
            agent.providers(),
            metrics.clone(),
            agent.peers(),
        );
        let admin_task = match admin::serve(admin_socket.clone(), service) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "cannot serve the admin API");
                return ExitCode::FAILURE;
            }
        };
        let metrics_task = if metrics_config.enabled {
            match metrics::serve(metrics_config.listen, metrics).await {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "cannot serve metrics");
                    return ExitCode::FAILURE;
                }
            }
        } else {
            None
        };
        // systemd Type=notify: ready once programs are attached and the
        // admin and metrics endpoints listen (no-op outside systemd).
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let result = agent
            .run(admin_rx, tlshub_provider_sdk::server::shutdown_signal())
            .await;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        admin_task.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        let _ = std::fs::remove_file(&admin_socket);
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "event loop failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// An error with all its sources, `outer: inner: ...`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
