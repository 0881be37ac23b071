//! The benchmark's figures, read back from a bench boot's serial log and
//! written as JSON, CSV and Markdown tables under `target/bench/`.

use std::path::Path;

use anyhow::{Context, Result};
use tlshub_bench_report::Report;

use crate::root;

/// Reads the figures of the bench boot `label` (its serial log under
/// `target/vm`) on kernel line `kernel`, writes
/// `target/bench/figures-<kernel>.{json,csv,md}` and prints the tables,
/// and this run against `compare` (an earlier run's JSON) if given.
pub fn write(label: &str, kernel: &str, compare: Option<&Path>) -> Result<()> {
    let serial = root().join(format!("target/vm/serial-{label}.log"));
    let console = std::fs::read_to_string(&serial)
        .with_context(|| format!("cannot read {}", serial.display()))?;
    let mut report = Report::from_console(kernel, &console)
        .with_context(|| format!("in {}", serial.display()))?;
    report.commit = commit();
    report.cpu = cpu_model();
    if report.figures.is_empty() {
        println!("== no benchmark figures in {}", serial.display());
        return Ok(());
    }
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    // Not `with_extension`: the kernel's name has a dot of its own.
    let file = |ext: &str| dir.join(format!("figures-{kernel}.{ext}"));
    let markdown = report.to_markdown();
    std::fs::write(file("json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(file("csv"), report.to_csv())?;
    std::fs::write(file("md"), &markdown)?;
    println!(
        "== {} figures written to {}/figures-{kernel}.{{json,csv,md}}\n\n{markdown}",
        report.figures.len(),
        dir.display()
    );
    if let Some(old) = compare {
        let text = std::fs::read_to_string(old)
            .with_context(|| format!("cannot read {}", old.display()))?;
        let old_report: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a figures file", old.display()))?;
        println!(
            "== this run against {}\n\n{}",
            old.display(),
            report.compare(&old_report)
        );
    }
    Ok(())
}

/// `git describe --always --dirty` of the work tree, if git can say.
fn commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(root())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

/// The host's CPU model (the first `model name` in /proc/cpuinfo).
fn cpu_model() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, model)| model.trim().to_string())
}
