//! `tlshubctl`: the administration CLI of a tlshub node (talks to the local
//! `tlshub-core` over its root-only Unix socket).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tlshub_admin::{ConnectError, pb};

const AFTER_HELP: &str = "\
Examples:
  tlshubctl status                     what the core runs: providers, health, BPF programs, policy
  tlshubctl connections                connections waiting for keys or protected now
  tlshubctl provider list              the configured providers and their health
  tlshubctl provider use boringssl     new connections go to `boringssl` from now on
                                       (refused unless it is serving; --force; kept by a
                                       restarted core until `active` is edited in its config)
  tlshubctl policy reload              re-read [policy] from the core's config file
  tlshubctl --json status              any command's answer as JSON

A/B runs across nodes: both ends of a connection must run compatible
providers; switch every node with one command, e.g.
  parallel-ssh -h nodes.txt tlshubctl provider use boringssl
(see the README, \"Comparing providers\").

Exit codes:
  0  done (for status: the active provider is serving and BPF programs are attached)
  1  the core refused or failed the request
  2  usage error
  3  no core: nothing listens at the admin socket (not running, or a stale socket)
  4  not permitted: the admin socket is root-only (or the core refused this user)
  5  status only: the core answered but is degraded (the active provider is not
     serving, or no BPF program is attached)
  6  any other failure to reach the core
With --json, an error is printed on stdout as {\"error\": {\"kind\": ..., \"message\": ...}}
as well.";

/// What the exit status says (documented in `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Done = 0,
    Refused = 1,
    NoCore = 3,
    NotPermitted = 4,
    Degraded = 5,
    Unreachable = 6,
}

impl Exit {
    /// The `kind` of a JSON error.
    fn kind(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Refused => "refused",
            Self::NoCore => "no-core",
            Self::NotPermitted => "not-permitted",
            Self::Degraded => "degraded",
            Self::Unreachable => "unreachable",
        }
    }

    /// Says why on stderr (and as JSON on stdout with `--json`), then
    /// exits so.
    fn report(self, json: bool, message: &str) -> ExitCode {
        eprintln!("tlshubctl: {message}");
        if json {
            let error = serde_json::json!({"error": {"kind": self.kind(), "message": message}});
            println!("{error}");
        }
        ExitCode::from(self as u8)
    }
}

/// Inspect and steer the tlshub node agent (tlshub-core) on this host.
#[derive(Debug, Parser)]
#[command(version, about, after_help = AFTER_HELP)]
struct Args {
    /// The core's admin socket.
    #[arg(long, short, global = true, default_value = tlshub_admin::DEFAULT_SOCKET, env = "TLSHUB_ADMIN_SOCKET")]
    socket: PathBuf,
    /// Print the answer as JSON instead of text: one object (`provider
    /// list`: an array of providers), or an error object.
    #[arg(long, short, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Version, uptime, active provider and each provider's health, BPF
    /// programs attached, policy and counters.
    Status,
    /// Connections the core tracks now: 4-tuple, pid, provider, cipher,
    /// state (waiting-owner, keying, protected) and time to key.
    #[command(alias = "conns")]
    Connections,
    /// Providers: list them, or choose the active one.
    #[command(subcommand)]
    Provider(ProviderCommand),
    /// The selection policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
enum ProviderCommand {
    /// The configured providers, their health and which one is active.
    List,
    /// Make NAME the active provider. Connections already keyed and key
    /// requests in flight are not touched; new connections use NAME. The
    /// core asks NAME's health first and refuses (exit 1) unless it is
    /// serving. The switch is recorded and kept by a restarted core, until
    /// the configuration's `active` is edited.
    Use {
        /// A provider name from the core's `[provider.endpoints]`.
        name: String,
        /// Switch even to a provider that is not serving.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Re-read `[policy]` from the core's configuration file and apply it to
    /// new connections (a bad file is refused and the old policy stays).
    Reload,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return Exit::Unreachable.report(args.json, &format!("cannot start runtime: {e}"));
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let mut client = match tlshub_admin::connect(&args.socket).await {
        Ok(c) => c,
        Err(e) => {
            let exit = match e {
                ConnectError::NoCore { .. } => Exit::NoCore,
                ConnectError::NotPermitted { .. } => Exit::NotPermitted,
                ConnectError::Connect { .. } => Exit::Unreachable,
            };
            return exit.report(args.json, &e.to_string());
        }
    };
    let mut exit = Exit::Done;
    let result = match &args.command {
        Command::Status => client.status(pb::StatusRequest {}).await.map(|r| {
            let status = r.into_inner();
            show(args.json, &status, print_status);
            if let Some(why) = degraded(&status) {
                eprintln!("tlshubctl: degraded: {why}");
                exit = Exit::Degraded;
            }
        }),
        Command::Connections => client
            .list_connections(pb::ListConnectionsRequest {})
            .await
            .map(|r| show(args.json, &r.into_inner(), print_connections)),
        Command::Provider(ProviderCommand::List) => {
            client.status(pb::StatusRequest {}).await.map(|r| {
                let s = r.into_inner();
                if args.json {
                    println!("{}", to_json(&s.providers));
                } else {
                    print_providers(&s.providers);
                }
            })
        }
        Command::Provider(ProviderCommand::Use { name, force }) => client
            .use_provider(pb::UseProviderRequest {
                name: name.clone(),
                force: *force,
            })
            .await
            .map(|r| {
                show(args.json, &r.into_inner(), |r| {
                    println!("active provider: {} (was {})", r.active, r.previous);
                });
            }),
        Command::Policy(PolicyCommand::Reload) => client
            .reload_policy(pb::ReloadPolicyRequest {})
            .await
            .map(|r| {
                show(args.json, &r.into_inner(), |r| {
                    println!("policy reloaded:");
                    print_policy(r.policy.as_ref());
                });
            }),
    };
    match result {
        Ok(()) => ExitCode::from(exit as u8),
        Err(status) => {
            let exit = if status.code() == tonic::Code::PermissionDenied {
                Exit::NotPermitted
            } else {
                Exit::Refused
            };
            let message = format!(
                "the core answered {:?}: {}",
                status.code(),
                status.message()
            );
            exit.report(args.json, &message)
        }
    }
}

/// Why a core's status counts as degraded, if it does: its active
/// provider is not serving, or no BPF program is attached.
fn degraded(s: &pb::StatusResponse) -> Option<String> {
    if s.bpf_programs.is_empty() {
        return Some("no BPF program is attached".into());
    }
    let active = s.providers.iter().find(|p| p.active)?;
    (active.health != "serving").then(|| {
        format!(
            "the active provider {} is {}{}",
            active.name,
            active.health,
            if active.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", active.detail)
            }
        )
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn show<T: serde::Serialize>(json: bool, v: &T, text: impl FnOnce(&T)) {
    if json {
        println!("{}", to_json(v));
    } else {
        text(v);
    }
}

fn print_status(s: &pb::StatusResponse) {
    println!("tlshub-core {} on node {}", s.version, s.node_name);
    println!("  uptime          {}", duration(s.uptime_seconds));
    println!("  config          {}", s.config_file);
    println!(
        "  failure policy  {} (key timeout {} ms)",
        s.failure_policy, s.key_timeout_ms
    );
    println!(
        "  active provider {}{}{}",
        s.active_provider,
        if s.configured_provider.is_empty() || s.configured_provider == s.active_provider {
            String::new()
        } else {
            format!(
                " (switched by `provider use`; the configuration says {})",
                s.configured_provider
            )
        },
        if s.fallback_provider.is_empty() {
            String::new()
        } else {
            format!(" (fallback {})", s.fallback_provider)
        }
    );
    println!("providers:");
    print_providers(&s.providers);
    println!("BPF programs attached:");
    for p in &s.bpf_programs {
        println!("  {:<28} {}", p.name, p.attach);
    }
    if !s.bpf_pin_dir.is_empty() {
        println!("  pinned under {}", s.bpf_pin_dir);
    }
    println!("policy:");
    print_policy(s.policy.as_ref());
    if let Some(c) = &s.counters {
        println!("connections:");
        println!(
            "  selected {}  protected {}  failed {}  reset {}  plaintext {}  closed-before-keys {}",
            c.selected, c.protected, c.failed, c.reset, c.plaintext, c.closed_before_keys
        );
        println!(
            "  pending {}  tracked {}  gate holds {}  ring-buffer drops {}",
            c.pending, c.tracked, c.gate_holds, c.ringbuf_drops
        );
    }
}

fn print_providers(providers: &[pb::ProviderStatus]) {
    let mut t = table(
        &[
            "",
            "NAME",
            "HEALTH",
            "FOR",
            "IN-FLIGHT",
            "PROTECTED",
            "SOCKET / DETAIL",
        ],
        &[4, 5],
    );
    // A line under a provider: only the last column.
    let note = |t: &mut comfy_table::Table, text: String| {
        t.add_row(vec![String::new(); 6].into_iter().chain([text]));
    };
    for p in providers {
        let mark = if p.active {
            "*"
        } else if p.fallback {
            "f"
        } else {
            ""
        };
        let what = if p.implementation.is_empty() {
            p.socket.clone()
        } else {
            format!(
                "{} ({} {})",
                p.socket, p.implementation, p.implementation_version
            )
        };
        t.add_row(vec![
            mark.to_owned(),
            p.name.clone(),
            p.health.clone(),
            duration(p.health_since_seconds),
            p.requests_in_flight.to_string(),
            p.connections_protected.to_string(),
            what,
        ]);
        if !p.detail.is_empty() {
            note(&mut t, p.detail.clone());
        }
        for c in &p.credentials {
            note(&mut t, credential_line(c, std::time::SystemTime::now()));
        }
    }
    for line in t.to_string().lines() {
        println!(" {}", line.trim_end());
    }
    println!("  (* active, f fallback)");
}

/// "certificate PATH expires DATE (in N days)", or "EXPIRED DATE".
fn credential_line(c: &pb::ProviderCredential, now: std::time::SystemTime) -> String {
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    };
    let at = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs(u64::try_from(c.not_after_unix_seconds).unwrap_or(0));
    let date = httpdate::fmt_http_date(at);
    let left = c.not_after_unix_seconds.saturating_sub(unix(now));
    if left <= 0 {
        format!("{} EXPIRED {date}", c.name)
    } else {
        format!(
            "{} expires {date} (in {})",
            c.name,
            duration(left.unsigned_abs())
        )
    }
}

fn print_policy(p: Option<&pb::Policy>) {
    let Some(p) = p else {
        println!("  (none)");
        return;
    };
    println!("  local pods      {}", p.local_cidrs.join(", "));
    for (i, r) in p.rules.iter().enumerate() {
        let ports = if r.ports.is_empty() {
            "every port".to_owned()
        } else {
            r.ports
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  rule {i}          peers {} ports {ports}",
            r.peer_cidrs.join(", ")
        );
    }
}

/// A table for people: columns as wide as their widest cell (IPv6
/// addresses included), no borders, the given columns right-aligned.
fn table(header: &[&str], right_aligned: &[usize]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for &i in right_aligned {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    t
}

fn print_connections(r: &pb::ListConnectionsResponse) {
    let mut t = table(
        &[
            "LOCAL", "REMOTE", "ROLE", "PID", "PROVIDER", "CIPHER", "STATE", "KEY-MS", "AGE",
        ],
        &[3, 7, 8],
    );
    for c in &r.connections {
        t.add_row(vec![
            c.local.clone(),
            c.remote.clone(),
            c.role.clone(),
            c.pid.to_string(),
            dash(&c.provider).to_owned(),
            dash(&c.cipher).to_owned(),
            c.state.clone(),
            if c.key_ms > 0.0 {
                format!("{:.1}", c.key_ms)
            } else {
                "-".into()
            },
            duration(c.age_ms / 1000),
        ]);
    }
    println!("{t}");
    println!("{} connection(s)", r.connections.len());
}

fn dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_shows_its_date_and_what_is_left() {
        let c = pb::ProviderCredential {
            name: "certificate /n.pem".into(),
            // Thu, 01 Jan 2032 00:00:00 GMT
            not_after_unix_seconds: 1_956_528_000,
        };
        let day = std::time::Duration::from_secs(86_400);
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_956_528_000);
        assert_eq!(
            credential_line(&c, at - 30 * day),
            "certificate /n.pem expires Thu, 01 Jan 2032 00:00:00 GMT (in 30d)"
        );
        assert_eq!(
            credential_line(&c, at + day),
            "certificate /n.pem EXPIRED Thu, 01 Jan 2032 00:00:00 GMT"
        );
    }
}
