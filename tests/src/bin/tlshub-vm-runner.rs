//! `tlshub-vm-runner`: runs inside the test VM (started by its /init). Builds
//! the two-node topology, runs the scenarios of the mode given on the
//! kernel command line (`tlshub.mode=test|bench|demo|systemd|stress|capacity`,
//! `tlshub.filter=`, `tlshub.repeat=N` to run each of them N times) and
//! prints one `TLSHUB-RESULT` line per run, then `TLSHUB-DONE`.

use std::time::Instant;

use tlshub_bench_report::console::{DONE_LINE, PLAN_PREFIX, ScenarioResult, Verdict};
use tlshub_vm_tests::vm::scenarios::{self, Scenario, ScenarioFn};
use tlshub_vm_tests::vm::support::cmdline;
use tlshub_vm_tests::vm::systemd;
use tlshub_vm_tests::vm::topology::Topology;
use tlshub_vm_tests::vm::wire_check;

fn main() {
    tlshub_vm_tests::panics::record_panics();
    let mode = std::env::args()
        .nth(1)
        .or_else(|| cmdline("tlshub.mode"))
        .unwrap_or_else(|| "test".into());
    let filter = cmdline("tlshub.filter").unwrap_or_default();
    let repeat: usize = cmdline("tlshub.repeat")
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let list: Vec<Scenario> = match mode.as_str() {
        // `tlshub.filter` picks parts, as for the tests.
        "bench" => [
            ("bench", tlshub_vm_tests::vm::bench::bench as ScenarioFn),
            (
                "collateral_stall",
                tlshub_vm_tests::vm::bench::collateral_stall,
            ),
            ("concurrency", tlshub_vm_tests::vm::bench::concurrency),
            (
                "request_response_and_streams",
                tlshub_vm_tests::vm::bench::request_response_and_streams,
            ),
            ("quick", tlshub_vm_tests::vm::bench::quick),
        ]
        .into_iter()
        // `quick` repeats a few of the others with smaller samples: only
        // when asked for by name (`cargo xtask bench --quick`).
        .filter(|(n, _)| {
            if filter.is_empty() {
                *n != "quick"
            } else {
                filter.split(',').any(|f| n.contains(f))
            }
        })
        .collect(),
        "demo" => vec![("demo", tlshub_vm_tests::vm::bench::demo)],
        // Not part of `cargo xtask test`: repeats a risky operation to hunt
        // rare kernel or emulator problems.
        "stress" => vec![(
            "attach_detach_under_hook_traffic_40_rounds",
            tlshub_vm_tests::vm::stress::attach_detach_under_hook_traffic_long,
        )],
        // Not part of `cargo xtask test` either: opens and holds
        // `tlshub.connections` protected connections.
        "capacity" => vec![(
            "capacity_protected_connections_held_at_once",
            tlshub_vm_tests::vm::capacity::capacity,
        )],
        // Not a test: where the core's CPU goes (`perf report`).
        "profile" => vec![
            ("profile_core", tlshub_vm_tests::vm::profile::profile_core),
            (
                "profile_openssl_provider",
                tlshub_vm_tests::vm::profile::profile_openssl_provider,
            ),
            (
                "profile_tlshub_provider",
                tlshub_vm_tests::vm::profile::profile_tlshub_provider,
            ),
        ],
        // The systemd VM (Debian userland, systemd as PID 1).
        "systemd" => vec![(
            "systemd_install_units_and_restarts",
            systemd::systemd_install_units_and_restarts,
        )],
        "test" => scenarios::TESTS
            .iter()
            .copied()
            // Several filters separated by commas: a scenario runs if any matches.
            .filter(|(n, _)| filter.is_empty() || filter.split(',').any(|f| n.contains(f)))
            .collect(),
        other => {
            println!("{PLAN_PREFIX}1");
            let unknown = ScenarioResult {
                name: "mode".into(),
                verdict: Verdict::Fail,
                seconds: None,
                wire: None,
                detail: format!(
                    "unknown mode {other:?} (test, bench, demo, stress, capacity, systemd)"
                ),
            };
            println!("{unknown}");
            println!("{DONE_LINE}");
            return;
        }
    };
    let runs: Vec<(String, ScenarioFn)> = list
        .iter()
        .flat_map(|&(name, body)| {
            (1..=repeat).map(move |i| {
                let name = if repeat > 1 {
                    format!("{name}#{i}")
                } else {
                    name.to_string()
                };
                (name, body)
            })
        })
        .collect();
    println!("{PLAN_PREFIX}{}", runs.len());
    let topology = match Topology::up() {
        Ok(t) => t,
        Err(e) => {
            for (name, _) in &runs {
                let failed = ScenarioResult {
                    name: name.clone(),
                    verdict: Verdict::Fail,
                    seconds: None,
                    wire: None,
                    detail: format!("topology: {e}"),
                };
                println!("{failed}");
            }
            println!("{DONE_LINE}");
            return;
        }
    };
    for (name, body) in runs {
        // What an earlier scenario's stray worker checked is not this one's.
        let _ = wire_check::take_tally();
        let started = Instant::now();
        let result = tlshub_vm_tests::panics::failing_on_panic(body);
        let seconds = Some(started.elapsed().as_secs_f64());
        let wire = wire_check::take_tally();
        // Every scenario that checks protected flows must also have seen
        // plaintext where there was some (see `wire_check::blind`).
        let result = match (result, wire.as_ref().and_then(wire_check::blind)) {
            (Ok(_), Some(blind)) => Err(blind),
            (result, _) => result,
        };
        let (verdict, detail) = match result {
            Ok(summary) => (Verdict::Pass, summary),
            Err(why) => (why.verdict(), why.to_string()),
        };
        let failed = verdict != Verdict::Pass;
        println!(
            "{}",
            ScenarioResult {
                name,
                verdict,
                seconds,
                wire,
                detail
            }
        );
        if failed {
            // Every agent log of the scenario (cores, providers, stand-ins).
            let mut logs: Vec<_> = std::fs::read_dir("/tmp/logs")
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            logs.sort();
            for log in logs.iter().filter(|l| {
                l.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("node-"))
            }) {
                let warnings = tlshub_vm_tests::vm::process::warnings(log);
                if !warnings.is_empty() {
                    println!("--- {} (warnings) ---\n{warnings}", log.display());
                }
                let tail = tlshub_vm_tests::vm::process::tail(log);
                println!("--- {} (tail) ---\n{tail}", log.display());
            }
        }
        let _ = std::fs::remove_dir_all("/tmp/logs");
    }
    drop(topology);
    println!("{DONE_LINE}");
}
