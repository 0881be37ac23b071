//! `tlshub-core check` on the machine the tests run on: its report must
//! agree with what the test reads itself, and its exit status with the
//! report. (On the development and CI machine it says kernel TLS and the
//! BPF LSM are missing; in the VM, `core_check_passes_in_the_vm` requires
//! every check to pass.)

use std::path::Path;
use std::process::Command;

use tlshub_admin::preflight::{NAMES, Report};

#[test]
fn the_report_agrees_with_the_host_and_the_exit_status() {
    let out = Command::new(env!("CARGO_BIN_EXE_tlshub-core"))
        .args(["check", "--json", "--config", "/nonexistent/core.toml"])
        .output()
        .unwrap();
    let report: Report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not a report ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, NAMES);
    assert_eq!(out.status.code(), Some(if report.ok() { 0 } else { 1 }));
    let check = |name: &str| report.get(name).unwrap();
    assert_eq!(
        check("kernel TLS").ok,
        Path::new("/proc/net/tls_stat").exists(),
        "{:?}",
        check("kernel TLS")
    );
    let bpf_lsm = std::fs::read_to_string("/sys/kernel/security/lsm")
        .is_ok_and(|l| l.trim().split(',').any(|m| m == "bpf"));
    assert_eq!(check("BPF LSM").ok, bpf_lsm, "{:?}", check("BPF LSM"));
    assert!(check("configuration").ok && check("configuration").found.contains("not found"));
    for c in report.checks.iter().filter(|c| !c.ok) {
        assert!(c.remedy.is_some(), "{c:?} names no remedy");
    }
}
