//! `bench` part three: new connections from 1, 8 and 64 clients at once.

use super::*;
use crate::failed;
use crate::vm::outcome::{Failure, Outcome};

/// Clients at once in the concurrency part (threads).
const CONCURRENCY: [u32; 3] = [1, 8, 64];
/// Event-loop clients at once in the concurrency part (one client is the
/// sequential case, which the threads' level 1 measures).
const EVENT_LOOP_CONCURRENCY: [u32; 2] = [8, 64];
/// Seconds each concurrency level runs.
const CONCURRENCY_S: u64 = 10;

/// `bench` part three, concurrency: new connections (connect, 64 bytes
/// each way, close) opened back to back by 1, 8 and 64 clients at once
/// (threads of one blocking client process in pod-a, against a
/// thread-per-connection server in pod-b), and by 8 and 64 tasks of one
/// event-loop client against an event-loop server (no tlshub and each
/// provider), for [`CONCURRENCY_S`] seconds:
/// the rate sustained, the connections that failed, and the setup latency, with no tlshub, through
/// WireGuard and with each provider, how many times the gate stopped a
/// process on each node, the providers' failed key requests by node and
/// kind (with the in-band ones that timed out waiting for a slot), and where the VM's CPU time went per connection
/// (idle near 0: the emulated CPU, not the gate, sets the rate). The
/// cores' and the providers' CPU per connection (both nodes together),
/// and per second while idle, are figures of their own.
pub fn concurrency() -> Outcome {
    // Each level leaves thousands of client sockets in TIME_WAIT for 60 s,
    // all to the one server address, and connect()'s search for a free
    // port walks past them: without reuse the later levels paid for the
    // earlier ones (64 event-loop clients with no tlshub, run after four
    // levels, made 155 connections/s with a third of the CPU idle, against
    // 385/s for 8). Reusing TIME_WAIT ports (TCP timestamps keep it
    // safe) is what busy clients configure.
    let _reuse = PodSetting::sysctl("pod-a", "net/ipv4/tcp_tw_reuse", "1")?;
    let mut lines = Vec::new();
    let level = |lines: &mut Vec<String>,
                 label: &str,
                 server_addr: &str,
                 nodes: Option<(&Node, &Node, ProviderKind)>,
                 apps: AppStyle| {
        let _server = apps.start()?;
        let levels: &[u32] = match apps {
            AppStyle::Threads => &CONCURRENCY,
            AppStyle::EventLoop => &EVENT_LOOP_CONCURRENCY,
        };
        for &clients in levels {
            let named = match apps {
                AppStyle::Threads => format!("{clients} clients"),
                AppStyle::EventLoop => format!("{clients} event-loop clients"),
            };
            let stops = |n: &Node| n.stats().map(|s| s.gate_stops);
            let before = nodes
                .map(|(a, b, _)| Ok::<_, Failure>((stops(a)?, stops(b)?)))
                .transpose()?;
            let trouble_before = nodes
                .map(|(a, b, kind)| ProviderTrouble::of(a, b, kind))
                .transpose()?;
            let tcp_before = TcpTrouble::now();
            let cpu = CpuSample::now();
            let workers = clients.to_string();
            let duration = CONCURRENCY_S.to_string();
            let mut args = vec![
                "--long",
                "0",
                "--workers",
                &workers,
                "--duration",
                &duration,
                "--short-size",
                "64",
            ];
            if apps == AppStyle::EventLoop {
                args.push("--event-loop");
            }
            let load = spawn_load_client(server_addr, &args)?;
            let r: LoadReport = last_report(&finish(load, Duration::from_secs(120))?)?;
            let cpu_after = CpuSample::now();
            if nodes.is_some() {
                record_agents_cpu(label, &cpu_after, &cpu, r.short_ok, |who| {
                    format!("{named}: {who} CPU per connection")
                });
            }
            let cpu = cpu_after.since(&cpu, r.short_ok);
            // A connection that fails (its keys took longer than the key
            // timeout on the saturated emulated CPU, say) is a result, not
            // a broken run: it is reported. Corrupt bytes are not.
            if !r.ok || r.short_ok == 0 {
                return Err(failed!("{label}, {named}: {r}"));
            }
            // The stats file is rewritten once a second: a shorter wait
            // left the last holds of a level to the next one's count.
            std::thread::sleep(Duration::from_millis(1500));
            let after = nodes
                .map(|(a, b, _)| Ok::<_, Failure>((stops(a)?, stops(b)?)))
                .transpose()?;
            let rate = r.short_ok as f64 / r.duration_s.max(0.001);
            record(
                "concurrency",
                label,
                &format!("{named}: connections"),
                rate,
                Unit::PerSecond,
            );
            for (p, ms) in [("p50", r.short_p50_ms), ("p99", r.short_p99_ms)] {
                record(
                    "concurrency",
                    label,
                    &format!("{named}: setup {p}"),
                    ms,
                    Unit::Milliseconds,
                );
            }
            let mut line = format!(
                "concurrency {label}, {named}: {:.1} connections/s ({} in {:.1} s, {} failed), setup p50 {:.1} ms p99 {:.1} ms",
                rate, r.short_ok, r.duration_s, r.short_failed, r.short_p50_ms, r.short_p99_ms,
            );
            if let (Some(b), Some(a)) = (before, after) {
                line.push_str(&format!(
                    "; processes stopped: client node {}, server node {}",
                    a.0.saturating_sub(b.0),
                    a.1.saturating_sub(b.1)
                ));
            }
            if let (Some(before), Some((a, b, kind))) = (&trouble_before, nodes) {
                let trouble = ProviderTrouble::of(a, b, kind)?.since(before);
                line.push_str(&format!("; providers: {trouble}"));
            }
            line.push_str(&format!("; CPU ms per connection: {cpu}"));
            line.push_str(&format!("; {}", TcpTrouble::now().since(&tcp_before)));
            println!("TLSHUB-BENCH {line}");
            lines.push(line);
        }
        Ok::<_, Failure>(())
    };
    for apps in [AppStyle::Threads, AppStyle::EventLoop] {
        level(&mut lines, "no tlshub", POD_B, None, apps)?;
    }
    {
        let _tunnel = WireGuard::up()?;
        level(&mut lines, "wireguard", WG_POD_B, None, AppStyle::Threads)?;
    }
    for provider in PROVIDERS {
        let label = provider.label;
        let (a, b) = nodes_with(provider)?;
        // What the agents cost with nothing to do: CPU per second over
        // 10 s with both nodes up and no connection.
        let cpu = CpuSample::now();
        std::thread::sleep(Duration::from_secs(10));
        let cpu_after = CpuSample::now();
        record_agents_cpu(label, &cpu_after, &cpu, 10, |who| {
            format!("idle: {who} CPU per second")
        });
        let idle = format!(
            "idle {label}, both nodes up, no connections: CPU ms per second: {}",
            cpu_after.since(&cpu, 10)
        );
        println!("TLSHUB-BENCH {idle}");
        lines.push(idle);
        for apps in [AppStyle::Threads, AppStyle::EventLoop] {
            level(
                &mut lines,
                label,
                POD_B,
                Some((&a, &b, provider.kind)),
                apps,
            )?;
        }
    }
    Ok(lines.join(" | "))
}

/// Records the cores' and the providers' CPU (both nodes' processes of
/// each kind together) per unit, over `n` units since `before`, as
/// concurrency figures of `label` named by `measure("core" | "provider")`.
fn record_agents_cpu(
    label: &str,
    after: &CpuSample,
    before: &CpuSample,
    n: u64,
    measure: impl Fn(&str) -> String,
) {
    for (who, command) in [("core", "tlshub-core"), ("provider", "tlshub-provider")] {
        record(
            "concurrency",
            label,
            &measure(who),
            after.command_ms(before, n, command),
            Unit::Milliseconds,
        );
    }
}

/// The providers' counters that say why connections failed: key requests
/// answered with an error, by node and kind of error (`timeout`,
/// `handshake`, ...), and of the time-outs, the in-band connecting sides
/// that ran out of time waiting for an admission slot.
#[derive(Debug, Clone)]
struct ProviderTrouble(std::collections::BTreeMap<String, f64>);

impl ProviderTrouble {
    fn of(a: &Node, b: &Node, kind: ProviderKind) -> Result<Self, Failure> {
        let mut counts = std::collections::BTreeMap::new();
        for (node, n) in [("client node", a), ("server node", b)] {
            let requests = n.provider_requests(kind)?;
            for (result, count) in requests.failed_by_result {
                counts.insert(format!("{node} {result}"), count);
            }
            counts.insert(format!("{node} slot timeout"), requests.slot_timeouts);
        }
        Ok(Self(counts))
    }

    /// The counts that grew since `before`, as one phrase.
    fn since(&self, before: &Self) -> String {
        let grown: Vec<String> = self
            .0
            .iter()
            .filter_map(|(name, after)| {
                let n = after - before.0.get(name).copied().unwrap_or(0.0);
                (n > 0.0).then(|| format!("{name} {n}"))
            })
            .collect();
        if grown.is_empty() {
            "no failed request".into()
        } else {
            grown.join(", ")
        }
    }
}

/// The TCP counters of the two pods that say why a setup took seconds
/// rather than milliseconds: a SYN sent again (1 s, then 2 s more), a
/// retransmission timeout, a full accept queue.
#[derive(Debug, Clone, Copy)]
struct TcpTrouble {
    /// pod-a (clients): `TCPSynRetrans`, `TCPTimeouts`.
    client: (u64, u64),
    /// pod-b (servers): `TCPTimeouts`, `ListenOverflows`, `ListenDrops`.
    server: (u64, u64, u64),
}

impl TcpTrouble {
    fn now() -> Self {
        let ext = |ns, name| super::super::wire_check::tcp_ext(ns, name);
        Self {
            client: (ext("pod-a", "TCPSynRetrans"), ext("pod-a", "TCPTimeouts")),
            server: (
                ext("pod-b", "TCPTimeouts"),
                ext("pod-b", "ListenOverflows"),
                ext("pod-b", "ListenDrops"),
            ),
        }
    }

    /// What happened between `before` and this sample, as one phrase.
    fn since(&self, before: &Self) -> String {
        format!(
            "TCP: client SYN retransmits {}, client timeouts {}, server timeouts {}, listen overflows {}, listen drops {}",
            self.client.0.saturating_sub(before.client.0),
            self.client.1.saturating_sub(before.client.1),
            self.server.0.saturating_sub(before.server.0),
            self.server.1.saturating_sub(before.server.1),
            self.server.2.saturating_sub(before.server.2),
        )
    }
}
