//! `cargo xtask bench --quick`: the main figures three times over, with
//! what each BPF program costs a connection.

use super::*;
use crate::failed;
use crate::vm::outcome::{Failure, Outcome};

/// One BPF program's run counters (`/proc/PID/fdinfo` of a program fd,
/// counted while `kernel.bpf_stats_enabled` is 1).
#[derive(Debug, Clone, Default)]
struct ProgramRuns {
    name: String,
    run_time_ns: u64,
    run_cnt: u64,
}

/// The run counters of the BPF programs whose fds the processes `pids`
/// hold, by program id. Names come from `/proc/kallsyms`
/// (`bpf_prog_<tag>_<name>`), since fdinfo gives only the tag.
fn program_runs(pids: &[u32]) -> HashMap<u64, ProgramRuns> {
    let names: HashMap<String, String> = std::fs::read_to_string("/proc/kallsyms")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let symbol = l.split_whitespace().nth(2)?;
            let (tag, name) = symbol.strip_prefix("bpf_prog_")?.split_once('_')?;
            Some((tag.to_owned(), name.to_owned()))
        })
        .collect();
    let mut runs = HashMap::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let is_program = std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf-prog");
            if !is_program {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            let field = |key: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                    .map(str::trim)
                    .unwrap_or_default()
                    .to_owned()
            };
            let Ok(id) = field("prog_id").parse::<u64>() else {
                continue;
            };
            let tag = field("prog_tag");
            runs.insert(
                id,
                ProgramRuns {
                    name: names.get(&tag).cloned().unwrap_or(tag),
                    run_time_ns: field("run_time_ns").parse().unwrap_or(0),
                    run_cnt: field("run_cnt").parse().unwrap_or(0),
                },
            );
        }
    }
    runs
}

/// What each of the cores' BPF programs cost `conns` connections of
/// `app` (setup and one echoed byte): runs per connection and time per
/// run, summed over both nodes' programs (both run in this VM's kernel),
/// the costliest first. The kernel counts only while
/// `kernel.bpf_stats_enabled` is 1, which adds two clock reads per run, so
/// the connections are not timed meanwhile.
fn hook_costs(cores: &[u32], app: &App, conns: u32) -> Result<Vec<String>, Failure> {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    std::fs::write(STATS, "1").map_err(|e| format!("{STATS}: {e}"))?;
    let before = program_runs(cores);
    let run = setup_latencies(app, conns);
    let after = program_runs(cores);
    let _ = std::fs::write(STATS, "0");
    run?;
    let mut by_name: HashMap<String, (u64, u64)> = HashMap::new();
    for (id, a) in &after {
        let b = before.get(id).cloned().unwrap_or_default();
        let sum = by_name.entry(a.name.clone()).or_default();
        sum.0 += a.run_time_ns.saturating_sub(b.run_time_ns);
        sum.1 += a.run_cnt.saturating_sub(b.run_cnt);
    }
    if by_name.is_empty() {
        return Err(failed!("no BPF program fds in the cores {cores:?}"));
    }
    let mut costs: Vec<(String, u64, u64)> = by_name
        .into_iter()
        .filter(|(_, (_, runs))| *runs > 0)
        .map(|(name, (ns, runs))| (name, ns, runs))
        .collect();
    costs.sort_by_key(|c| std::cmp::Reverse(c.1));
    let n = u64::from(conns).max(1);
    Ok(costs
        .into_iter()
        .map(|(name, ns, runs)| {
            let (runs_each, us_each) = (runs as f64 / n as f64, ns as f64 / n as f64 / 1000.0);
            // As figures too: the runs are the same from run to run where
            // the times move with the host, so `--compare` sees a program
            // that runs more often.
            record(
                "quick_hooks",
                &name,
                "runs per connection",
                runs_each,
                Unit::Count,
            );
            record(
                "quick_hooks",
                &name,
                "time per connection",
                us_each,
                Unit::Microseconds,
            );
            format!(
                "{name}: {runs_each:.1} runs and {us_each:.1} us per connection, {} ns per run",
                ns / runs.max(1)
            )
        })
        .collect())
}

/// Repetitions of each measurement in [`quick`].
const QUICK_RUNS: usize = 3;

/// Prints a figure measured once per entry of `values` (the median, with
/// the range as its spread; see [`Figure::repeated`]).
fn record_repeated(part: &str, subject: &str, measure: &str, values: &[f64], unit: Unit) {
    match Figure::repeated(part, subject, measure, values, unit).map(|f| f.line()) {
        Some(Ok(line)) => println!("{line}"),
        Some(Err(e)) => println!("TLSHUB-BENCH figure not recorded: {e}"),
        None => println!("TLSHUB-BENCH figure not recorded: {subject} {measure}: no values"),
    }
}

/// `cargo xtask bench --quick`, for use while developing (a few minutes
/// in the VM), each measurement [`QUICK_RUNS`] times so that its figures
/// carry their run-to-run spread (which `--compare` judges changes
/// against): setup p50/p99 over 100 sequential connections, 2,000
/// request/response transactions and one 16 MiB stream, for plain TCP,
/// raw kTLS, the stunnel pair and each provider. Its own part: its smaller
/// samples are not comparable with the full parts' figures.
pub fn quick() -> Outcome {
    const PART: &str = "quick";
    let mut lines = Vec::new();
    let mut measure = |label: &str, target: &App| -> Result<(), Failure> {
        let mut runs: [Vec<f64>; 6] = Default::default();
        let mut pooled = Vec::new();
        for _ in 0..QUICK_RUNS {
            let l = setup_latencies(target, 100)?;
            let (p50, p99) = p50_p99(&l);
            pooled.extend(l);
            let (tps, l) = rr_once(label, target, 2000)?;
            let bps = stream_of(target, 16 << 20)?;
            let values = [
                p50 as f64,
                p99 as f64,
                tps,
                percentile(&l, 0.5) as f64,
                percentile(&l, 0.99) as f64,
                bps,
            ];
            for (run, v) in runs.iter_mut().zip(values) {
                run.push(v);
            }
        }
        pooled.sort_unstable();
        record_cdf("quick_setup_cdf", label, &pooled);
        let names = [
            ("setup p50", Unit::Microseconds),
            ("setup p99", Unit::Microseconds),
            ("rr transactions", Unit::PerSecond),
            ("rr round trip p50", Unit::Microseconds),
            ("rr round trip p99", Unit::Microseconds),
            ("one stream", Unit::BytesPerSecond),
        ];
        let mut line = format!("quick {label} (min to max of {QUICK_RUNS} runs):");
        for ((name, unit), values) in names.iter().zip(&runs) {
            record_repeated(PART, label, name, values, *unit);
            let (lo, hi) = values
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            line.push_str(&format!(" {name} {lo:.0} to {hi:.0};"));
        }
        println!("TLSHUB-BENCH {line}");
        lines.push(line);
        Ok(())
    };
    let loop_none = byte_loop_recorded(PART, "no tlshub")?;
    baselines(&mut measure)?;
    proxy_pair(&mut measure)?;
    let mut stages = Vec::new();
    let plain = App::exchange(1, PLAIN_PORT);
    for provider in PROVIDERS {
        let label = provider.label;
        let (mut a, mut b) = nodes_with(provider)?;
        if label == "openssl" {
            // Unselected connections with the agents running, and what
            // each hook costs them.
            measure("plain", &plain)?;
            let costs = hook_costs(&[a.core_pid(), b.core_pid()], &plain, 300)?;
            let line = format!(
                "quick hooks on unselected connections (both nodes' programs, 300 connections): {}",
                costs.join("; ")
            );
            println!("TLSHUB-BENCH {line}");
            stages.push(line);
        }
        measure(label, &App::exchange(1, PROTECTED_PORT))?;
        // The stats file is rewritten once a second.
        std::thread::sleep(Duration::from_millis(1500));
        for (node, client) in [(&a, true), (&b, false)] {
            let line = stage_breakdown("quick_stages", label, provider, node, client, None)?;
            stages.push(line);
        }
        // The same with both apps in an edge-triggered epoll loop (the gate
        // answers them EAGAIN): where an event loop's setup time goes.
        let epoll = App {
            io: "epoll-edge",
            ..App::exchange(1, PROTECTED_PORT)
        };
        let before = (a.stats()?, b.stats()?);
        let (n, p50, p99) = setup_latency(&epoll, QUICK_EVENT_LOOP_CONNS)?;
        for (measure, v) in [
            ("setup p50, event loop", p50),
            ("setup p99, event loop", p99),
        ] {
            record(PART, label, measure, v as f64, Unit::Microseconds);
        }
        let line = format!(
            "quick {label} event loop (epoll-edge both ends): n={n} setup p50 {p50} p99 {p99}"
        );
        println!("TLSHUB-BENCH {line}");
        stages.push(line);
        std::thread::sleep(Duration::from_millis(1500));
        let event_loop = format!("{label} event loop");
        for (node, client, before) in [(&a, true, &before.0), (&b, false, &before.1)] {
            let line = stage_breakdown(
                "quick_stages",
                &event_loop,
                provider,
                node,
                client,
                Some(before),
            )?;
            stages.push(line);
        }
        if label == "openssl" {
            // And with no agent running: the hooks' share of "plain"'s
            // cost, with both nodes' programs and with one node's.
            programs_only([&mut a, &mut b], provider.kind);
            measure("plain, programs only", &plain)?;
            let loop_both = byte_loop_recorded(PART, "plain, programs only")?;
            one_node_programs(&b)?;
            measure("plain, one node's programs", &plain)?;
            let loop_one = byte_loop_recorded(PART, "plain, one node's programs")?;
            // And with none, at this point of the run: the first "no
            // tlshub" came before everything else (no TIME_WAIT sockets
            // of earlier measurements yet, a fresh page cache).
            one_node_programs(&a)?;
            measure("no tlshub, later", &plain)?;
            let loop_later = byte_loop_recorded(PART, "no tlshub, later")?;
            let line = format!(
                "quick byte loop (dd bs=1, {BYTE_LOOP_BYTES} bytes, median of 3): no tlshub {loop_none:.2} s (later {loop_later:.2} s), both nodes' programs x{:.2}, one node's x{:.2}",
                loop_both / loop_none.max(0.001),
                loop_one / loop_none.max(0.001)
            );
            println!("TLSHUB-BENCH {line}");
            stages.push(line);
        }
    }
    lines.extend(stages);
    Ok(lines.join(" | "))
}

/// Connections of the event-loop setup run per provider in [`quick`].
const QUICK_EVENT_LOOP_CONNS: u32 = 100;
