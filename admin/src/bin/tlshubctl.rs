//! `tlshubctl`: the administration CLI of a tlshub node (talks to the local
//! `tlshub-core` over its root-only Unix socket).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tlshub_admin::ab::AbRun;
use tlshub_admin::{ConnectError, CtlError, CtlErrorKind, CtlFailure, pb};

const AFTER_HELP: &str = "\
Examples:
  tlshubctl status                     what the core runs: providers, health, BPF programs, policy
  tlshubctl connections                connections waiting for keys or protected now
  tlshubctl provider list              the configured providers and their health
  tlshubctl provider use boringssl     new connections go to `boringssl` from now on
                                       (refused unless it is serving; --force; kept by a
                                       restarted core until `active` is edited in its config)
  tlshubctl policy reload              re-read [policy] from the core's config file
  tlshubctl peers                      peers seen: announced tlshub or not, connections
                                       protected, plain, silent though known (keyed)
  tlshubctl peers forget node-b        node-b left the rollout for good: opportunistic
                                       rules may let it through as plain again
  tlshubctl ab openssl boringssl --duration 10m --switch-every 30s
                                       alternate the two providers on this node, then
                                       compare them on its own traffic
  tlshubctl --json status              any command's answer as JSON

A/B runs across nodes: both ends of a connection must run compatible
providers; switch every node with one command, e.g.
  parallel-ssh -h nodes.txt tlshubctl provider use boringssl
or run `tlshubctl ab` on every node at once with the same arguments
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
  130  ab only: interrupted (SIGINT or SIGTERM); the original provider was
     restored and what was measured so far is printed
With --json, an error is printed on stdout as {\"error\": {\"kind\": ..., \"message\": ...}}
as well.";

/// What the exit status says when the command did its work (documented
/// in `--help`; failures have theirs from [`CtlErrorKind::exit_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Done = 0,
    Degraded = 5,
    Interrupted = 130,
}

/// Says why on stderr (and as JSON on stdout with `--json`), then exits
/// with `kind`'s status.
fn fail(kind: CtlErrorKind, json: bool, message: &str) -> ExitCode {
    eprintln!("tlshubctl: {message}");
    if json {
        let failure = CtlFailure {
            error: CtlError {
                kind,
                message: message.to_owned(),
            },
        };
        println!("{}", serde_json::to_string(&failure).unwrap_or_default());
    }
    ExitCode::from(kind.exit_code())
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
    /// The peers seen in selected connections (nodes with `[peers]
    /// node_map`, else addresses): whether each announced tlshub in a TCP
    /// handshake, the mode of the rule that judges it, the keying protocol
    /// it announced, and its connections protected, let through as plain
    /// (silent under an opportunistic rule) and silent although known to
    /// run tlshub (keyed as under a strict rule: a listener older than its
    /// node's programs, the option stripped on the way, or its tlshub gone)
    /// (silent after announcing: keyed as under a strict rule). With no
    /// subcommand: `list`.
    Peers {
        #[command(subcommand)]
        action: Option<PeersCommand>,
    },
    /// Compare providers A and B on this node's own traffic: make A, then
    /// B, then A ... the active provider, each for `--switch-every`, for
    /// `--duration` in all; then restore the provider that was active
    /// (also on SIGINT or SIGTERM, exit 130) and print, per provider, the
    /// connections keyed, failures by reason, key time and gate hold
    /// p50/p99 with 95% confidence intervals, and whether B differs from A
    /// at p50 (a bootstrap interval of the difference). Each connection
    /// counts for the provider that keyed it, whenever that finished.
    /// Both ends of a connection must run compatible providers.
    Ab {
        /// Provider A (a name from `provider list`).
        a: String,
        /// Provider B.
        b: String,
        /// How long to run in all (`90s`, `10m`, `1h`).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// How long each provider stays active before the other takes over.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        switch_every: Duration,
    },
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

#[derive(Debug, Subcommand)]
enum PeersCommand {
    /// Every peer, by name.
    List,
    /// Forget that peers announced tlshub (for a node that left the
    /// rollout for good): an opportunistic rule may let them through as
    /// plain again. The core keeps announced peers across restarts
    /// otherwise.
    Forget {
        /// Names or addresses as `peers list` shows them.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        peers: Vec<String>,
        /// Every announced peer.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Command::Ab {
        a, b, switch_every, ..
    } = &args.command
    {
        if a == b {
            eprintln!("tlshubctl: ab needs two different providers (got {a} twice)");
            return ExitCode::from(2);
        }
        if switch_every.is_zero() {
            eprintln!("tlshubctl: --switch-every must be more than 0");
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return fail(
                CtlErrorKind::Unreachable,
                args.json,
                &format!("cannot start runtime: {e}"),
            );
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let mut client = match tlshub_admin::connect(&args.socket).await {
        Ok(c) => c,
        Err(e) => {
            let kind = match e {
                ConnectError::NoCore { .. } => CtlErrorKind::NoCore,
                ConnectError::NotPermitted { .. } => CtlErrorKind::NotPermitted,
                ConnectError::Connect { .. } => CtlErrorKind::Unreachable,
            };
            return fail(kind, args.json, &e.to_string());
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
        Command::Ab {
            a,
            b,
            duration,
            switch_every,
        } => match ab(&mut client, a, b, *duration, *switch_every).await {
            Ok(run) => {
                show(args.json, &run, print_ab);
                if run.interrupted {
                    exit = Exit::Interrupted;
                }
                Ok(())
            }
            Err(e) => Err(e),
        },
        Command::Peers {
            action: None | Some(PeersCommand::List),
        } => client
            .list_peers(pb::ListPeersRequest {})
            .await
            .map(|r| show(args.json, &r.into_inner(), print_peers)),
        Command::Peers {
            action: Some(PeersCommand::Forget { peers, all }),
        } => client
            .forget_peers(pb::ForgetPeersRequest {
                peers: peers.clone(),
                all: *all,
            })
            .await
            .map(|r| {
                show(args.json, &r.into_inner(), |r| {
                    if r.forgotten.is_empty() {
                        println!("no such announced peer: nothing forgotten");
                    } else {
                        println!("forgotten: {}", r.forgotten.join(", "));
                    }
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
            let kind = if status.code() == tonic::Code::PermissionDenied {
                CtlErrorKind::NotPermitted
            } else {
                CtlErrorKind::Refused
            };
            let message = format!(
                "the core answered {:?}: {}",
                status.code(),
                status.message()
            );
            fail(kind, args.json, &message)
        }
    }
}

type AdminClient = pb::admin_client::AdminClient<tonic::transport::Channel>;

/// Outcomes after `*cursor` (every page), fed to `sample`; moves the
/// cursor. Returns how many were no longer kept.
async fn drain_outcomes(
    client: &mut AdminClient,
    cursor: &mut u64,
    mut sample: Option<&mut tlshub_admin::ab::AbSample>,
) -> Result<u64, tonic::Status> {
    let mut lost = 0;
    loop {
        let page = client
            .list_outcomes(pb::ListOutcomesRequest { after: *cursor })
            .await?
            .into_inner();
        lost += page.lost;
        for o in &page.outcomes {
            if let Some(s) = sample.as_deref_mut() {
                s.add(o);
            }
            *cursor = o.seq;
        }
        if !page.more || page.outcomes.is_empty() {
            return Ok(lost);
        }
    }
}

/// SIGINT and SIGTERM, caught from the moment this is made: one that
/// arrives before [`Interrupts::recv`] is awaited (during a request to
/// the core, say) is kept for it instead of ending the process with the
/// provider switched and not restored.
struct Interrupts(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl Interrupts {
    fn catch() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(int), Ok(term)) => Self(Some((int, term))),
            _ => Self(None),
        }
    }

    /// Resolves on the next SIGINT or SIGTERM (never, if they could not
    /// be caught). Cancel-safe: a signal is not lost to a dropped call.
    async fn recv(&mut self) {
        match &mut self.0 {
            Some((int, term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            None => std::future::pending().await,
        }
    }
}

/// Alternates `a` and `b` as the active provider, collecting the core's
/// outcomes, then restores the provider that was active.
async fn ab(
    client: &mut AdminClient,
    a: &str,
    b: &str,
    duration: Duration,
    switch_every: Duration,
) -> Result<AbRun, tonic::Status> {
    let mut interrupts = Interrupts::catch();
    let original = client
        .status(pb::StatusRequest {})
        .await?
        .into_inner()
        .active_provider;
    // Only what happens from now on counts.
    let mut cursor = 0;
    drain_outcomes(client, &mut cursor, None).await?;
    let mut sample = tlshub_admin::ab::AbSample::new(a, b);
    let started = Instant::now();
    let (mut switches, mut lost, mut was_interrupted) = (0u32, 0, false);
    let mut measured = Ok(());
    'run: while started.elapsed() < duration {
        let name = if switches % 2 == 0 { a } else { b };
        if let Err(e) = client
            .use_provider(pb::UseProviderRequest {
                name: name.to_owned(),
                force: false,
            })
            .await
        {
            measured = Err(e);
            break;
        }
        switches += 1;
        let period_end = (started + duration).min(Instant::now() + switch_every);
        while Instant::now() < period_end {
            let tick = period_end.saturating_duration_since(Instant::now());
            tokio::select! {
                () = interrupts.recv() => {
                    was_interrupted = true;
                    break 'run;
                }
                () = tokio::time::sleep(tick.min(Duration::from_secs(1))) => {}
            }
            match drain_outcomes(client, &mut cursor, Some(&mut sample)).await {
                Ok(n) => lost += n,
                Err(e) => {
                    measured = Err(e);
                    break 'run;
                }
            }
        }
    }
    // Restore first, whatever happened; a provider that stopped serving
    // meanwhile is restored too (it was the operator's choice).
    let restored = client
        .use_provider(pb::UseProviderRequest {
            name: original.clone(),
            force: true,
        })
        .await;
    measured?;
    restored?;
    // Keys requested before the restore and answered since count too.
    lost += drain_outcomes(client, &mut cursor, Some(&mut sample)).await?;
    Ok(AbRun {
        a: a.to_owned(),
        b: b.to_owned(),
        seconds: started.elapsed().as_secs_f64(),
        switch_every_seconds: switch_every.as_secs_f64(),
        switches,
        interrupted: was_interrupted,
        restored: original,
        lost,
        report: sample.report(),
    })
}

fn print_ab(run: &AbRun) {
    use tlshub_admin::ab::{Estimate, Quantiles};
    let ms = |e: Option<Estimate>| match e {
        None => "-".to_owned(),
        Some(Estimate {
            ms,
            low_ms: Some(lo),
            high_ms: Some(hi),
        }) => format!("{ms:.1} ({lo:.1}-{hi:.1})"),
        Some(e) => format!("{:.1}", e.ms),
    };
    println!(
        "A/B on this node: {} and {}, {:.0} s, {} switch(es) every {:.0} s{}; {} restored",
        run.a,
        run.b,
        run.seconds,
        run.switches,
        run.switch_every_seconds,
        if run.interrupted { ", interrupted" } else { "" },
        run.restored
    );
    let mut t = table(
        &[
            "PROVIDER",
            "KEYED",
            "FAILED",
            "KEY P50 MS (95% CI)",
            "KEY P99 MS (95% CI)",
            "HOLDS",
            "HOLD P50 MS (95% CI)",
            "HOLD P99 MS (95% CI)",
        ],
        &[1, 2, 5],
    );
    for p in &run.report.providers {
        let q = |q: &Quantiles| (ms(q.p50), ms(q.p99));
        let ((k50, k99), (h50, h99)) = (q(&p.key_time), q(&p.gate_hold));
        t.add_row(vec![
            p.provider.clone(),
            p.keyed.to_string(),
            p.failed.values().sum::<u64>().to_string(),
            k50,
            k99,
            p.gate_hold.count.to_string(),
            h50,
            h99,
        ]);
    }
    println!("{t}");
    for p in &run.report.providers {
        if !p.failed.is_empty() {
            let reasons: Vec<String> = p.failed.iter().map(|(r, n)| format!("{r} {n}")).collect();
            println!("failures of {}: {}", p.provider, reasons.join(", "));
        }
    }
    if run.lost > 0 {
        println!(
            "{} outcome(s) were gone from the core before they were read: the sample has a gap",
            run.lost
        );
    }
    for v in &run.report.verdicts {
        println!("{v}");
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
        if c.service_plain + c.peer_silent_plain + c.peer_incompatible_plain > 0 {
            println!(
                "  plain by policy: unselected service backends {}  silent peers (opportunistic) {}  peers of another keying protocol (opportunistic) {}",
                c.service_plain, c.peer_silent_plain, c.peer_incompatible_plain
            );
        }
        if c.peers_announced + c.known_peer_silent > 0 {
            println!(
                "  peers that announced tlshub {}  silent though known (keyed) {}  (tlshubctl peers)",
                c.peers_announced, c.known_peer_silent
            );
        }
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
                "{} ({} {}, keys over {})",
                p.socket,
                p.implementation,
                p.implementation_version,
                if p.key_transport.is_empty() {
                    "grpc"
                } else {
                    &p.key_transport
                }
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
        for session in &p.peer_sessions {
            note(
                &mut t,
                peer_session_line(session, std::time::SystemTime::now()),
            );
        }
    }
    for line in t.to_string().lines() {
        println!(" {}", line.trim_end());
    }
    println!("  (* active, f fallback)");
}

/// A node-pair provider's sessions with one peer node, as `wg show` shows
/// a peer: "session with NODE up 12m (1 generation, 5 set up), renewed in
/// 48m" (or "the peer renews it"), or "session with NODE: NONE, its
/// connections fail", and the last failed attempt after either.
fn peer_session_line(s: &pb::PeerSession, now: std::time::SystemTime) -> String {
    let now = unix_seconds(now);
    let ago = |t: i64| duration(now.saturating_sub(t).unsigned_abs());
    let mut line = if s.generations == 0 {
        format!("session with {}: NONE, its connections fail", s.peer)
    } else {
        let renew = if s.renew_at_unix_seconds == 0 {
            "the peer renews it".to_owned()
        } else if s.renew_at_unix_seconds <= now {
            "being renewed".to_owned()
        } else {
            format!(
                "renewed in {}",
                duration((s.renew_at_unix_seconds - now).unsigned_abs())
            )
        };
        format!(
            "session with {} up {} ({} generation{}, {} set up), {renew}",
            s.peer,
            ago(s.up_since_unix_seconds),
            s.generations,
            if s.generations == 1 { "" } else { "s" },
            s.sessions_total,
        )
    };
    if !s.last_error.is_empty() {
        line.push_str(&format!(
            "; last attempt failed {} ago: {}",
            ago(s.last_error_unix_seconds),
            s.last_error
        ));
    }
    line
}

/// Seconds since the Unix epoch (0 before it), as the admin API's times.
fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// "certificate PATH expires DATE (in N days)", or "EXPIRED DATE".
fn credential_line(c: &pb::ProviderCredential, now: std::time::SystemTime) -> String {
    let at = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs(u64::try_from(c.not_after_unix_seconds).unwrap_or(0));
    let date = httpdate::fmt_http_date(at);
    let left = c.not_after_unix_seconds.saturating_sub(unix_seconds(now));
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
    let ports = |ports: &[u32]| {
        if ports.is_empty() {
            "every port".to_owned()
        } else {
            ports
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    println!("  local pods      {}", p.local_cidrs.join(", "));
    for (i, r) in p.rules.iter().enumerate() {
        println!(
            "  rule {i}          peers {} ports {} ({})",
            r.peer_cidrs.join(", "),
            ports(&r.ports),
            if r.mode.is_empty() { "strict" } else { &r.mode }
        );
    }
    if !p.service_cidrs.is_empty() {
        println!(
            "  services        {} ports {} (judged by their backend)",
            p.service_cidrs.join(", "),
            ports(&p.service_ports)
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

fn print_peers(r: &pb::ListPeersResponse) {
    let mut t = table(
        &[
            "PEER",
            "ANNOUNCED",
            "SINCE",
            "LAST",
            "MODE",
            "KEYING",
            "PROTECTED",
            "PLAIN",
            "KNOWN-SILENT",
        ],
        &[6, 7, 8],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ago = |t: u64| {
        if t == 0 {
            "-".to_owned()
        } else {
            format!("{} ago", duration(now.saturating_sub(t)))
        }
    };
    for p in &r.peers {
        t.add_row(vec![
            p.peer.clone(),
            if p.announced { "yes" } else { "no" }.to_owned(),
            ago(p.first_announced_unix),
            ago(p.last_announced_unix),
            dash(&p.mode).to_owned(),
            dash(&p.keying).to_owned(),
            p.protected.to_string(),
            p.plain.to_string(),
            p.known_peer_silent.to_string(),
        ]);
    }
    println!("{t}");
    let announced = r.peers.iter().filter(|p| p.announced).count();
    println!(
        "{} peer(s), {announced} announced tlshub (kept in {})",
        r.peers.len(),
        r.file
    );
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

    #[test]
    fn a_peer_session_shows_its_age_renewal_and_last_failure() {
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_956_528_000);
        let up = pb::PeerSession {
            peer: "node-b".into(),
            generations: 1,
            up_since_unix_seconds: 1_956_528_000 - 720,
            renew_at_unix_seconds: 1_956_528_000 + 2_880,
            sessions_total: 5,
            ..Default::default()
        };
        assert_eq!(
            peer_session_line(&up, now),
            "session with node-b up 12m (1 generation, 5 set up), renewed in 48m"
        );
        let accepted = pb::PeerSession {
            generations: 2,
            renew_at_unix_seconds: 0,
            ..up.clone()
        };
        assert_eq!(
            peer_session_line(&accepted, now),
            "session with node-b up 12m (2 generations, 5 set up), the peer renews it"
        );
        let down = pb::PeerSession {
            generations: 0,
            last_error: "connection refused".into(),
            last_error_unix_seconds: 1_956_528_000 - 3,
            ..up
        };
        assert_eq!(
            peer_session_line(&down, now),
            "session with node-b: NONE, its connections fail; last attempt failed 3s ago: connection refused"
        );
    }
}
