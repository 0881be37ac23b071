//! The admin CLI (`tlshubctl`) and the Prometheus endpoint as an operator
//! uses them: every command in text and JSON, exit codes, provider
//! switches that outlive a restart, policy reloads, the root-only socket.

use std::time::Duration;

use tlshub_admin::{CtlErrorKind, pb};

use super::node::{Node, NodeSpec, PROTECTED_PORT, ProviderKind};
use super::process::finish;
use super::service::{LoadServer, start_load_with, two_providers};
use super::support::{metric, wait_for};
use super::topology::POD_B;
use crate::failed;
use crate::vm::outcome::{Failure, Outcome};

/// `tlshubctl` as a person uses it: text output of every command, JSON of
/// every command, a refused switch to an unknown provider, a policy reload
/// (and a refused bad one), and the root-only socket.
pub fn admin_cli_and_metrics() -> Outcome {
    let mut a = Node::start(two_providers("a", 2000))?;
    let socket = a.dir.join("admin.sock");
    let s = socket.to_string_lossy().into_owned();
    let text = |args: &[&str]| -> Result<String, Failure> {
        let mut argv = vec!["tlshubctl", "--socket", &s];
        argv.extend_from_slice(args);
        let out = super::process::command(None, &argv)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(failed!(
                "{args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // Wait for the first health checks.
    if let Err(st) = wait_for(
        Duration::from_secs(10),
        Duration::from_millis(200),
        || a.status(),
        |st| {
            st.as_ref().map_or(true, |st| {
                st.providers.iter().all(|p| p.health == "serving")
            })
        },
    ) {
        return Err(failed!("providers not serving after 10 s: {:?}", st?));
    }
    let status = text(&["status"])?;
    for want in [
        "active provider openssl",
        "boringssl",
        "serving",
        // Both are built on the SDK, so key requests take their keys
        // stream once their GetInfo said so.
        "keys over keys-stream",
        "lsm/file_permission",
        "sockops on cgroup",
        "10.0.1.0/24",
        "ports 8443",
    ] {
        if !status.contains(want) {
            return Err(failed!("`tlshubctl status` lacks {want:?}:\n{status}"));
        }
    }
    // Protected connections show in the list with provider and cipher.
    let b = Node::start(NodeSpec::new("b"))?;
    let _server = LoadServer::start()?;
    let connect = format!("{POD_B}:{PROTECTED_PORT}");
    let client = start_load_with(3, 4, 0.01)?;
    let conns: pb::ListConnectionsResponse = a.ctl(&["connections"])?;
    let protected: Vec<&pb::Connection> = conns
        .connections
        .iter()
        .filter(|c| c.state == "protected")
        .collect();
    if protected.len() < 3
        || !protected
            .iter()
            .all(|c| c.provider == "openssl" && c.cipher == "aes-gcm-128" && c.role == "client")
    {
        return Err(failed!("connections: {conns:?}"));
    }
    // The kTLS gauges, read at the scrape from the protected connections'
    // network namespaces (resolved within a second of their keys).
    let ktls_sockets = wait_for(
        Duration::from_secs(5),
        Duration::from_millis(200),
        || {
            a.metrics()
                .map(|text| metric(&text, "tlshub_ktls_sockets{counter=\"TlsCurrTxSw\"}"))
        },
        |n| n.as_ref().map_or(true, |&n| n >= 3.0),
    )
    .unwrap_or_else(|last| last)?;
    if ktls_sockets < 3.0 {
        return Err(failed!(
            "tlshub_ktls_sockets{{counter=\"TlsCurrTxSw\"}} is {ktls_sockets} with 3 protected connections open"
        ));
    }
    let listing = text(&["connections"])?;
    if !listing.contains("protected") || !listing.contains(&connect) {
        return Err(failed!("`tlshubctl connections`:\n{listing}"));
    }
    let _ = finish(client, Duration::from_secs(60))?;
    drop(b);
    let (code, refused) =
        a.ctl_with_exit::<pb::UseProviderResponse>(&["provider", "use", "nosuch"])?;
    if code != 1
        || !refused.as_ref().is_err_and(|e| {
            e.kind == CtlErrorKind::Refused
                && e.message.contains("NotFound")
                && e.message.contains("nosuch")
        })
    {
        return Err(failed!("unknown provider: exit {code}, {refused:?}"));
    }
    let used = a.use_provider("boringssl")?;
    if used.previous != "openssl" || used.active != "boringssl" {
        return Err(failed!("provider use: {used:?}"));
    }
    // Policy reload: a new port is applied; a broken file is refused and
    // the old policy stays.
    let cfg = a.dir.join("core.toml");
    let original = std::fs::read_to_string(&cfg).map_err(|e| e.to_string())?;
    std::fs::write(
        &cfg,
        original.replace("ports = [8443]", "ports = [8443, 8444]"),
    )
    .map_err(|e| e.to_string())?;
    let reloaded: pb::ReloadPolicyResponse = a.ctl(&["policy", "reload"])?;
    if first_rule_ports(reloaded.policy.as_ref()) != [8443, 8444] {
        return Err(failed!("policy reload: {reloaded:?}"));
    }
    std::fs::write(&cfg, original.replace("ports = [8443]", "ports = [\"x\"]"))
        .map_err(|e| e.to_string())?;
    let bad = a.ctl::<pb::ReloadPolicyResponse>(&["policy", "reload"]);
    // Put the file back before anything can fail: the node's cleanup
    // (`tlshub-core release --detach`) reads it.
    std::fs::write(&cfg, &original).map_err(|e| e.to_string())?;
    let Err(bad) = bad else {
        return Err("a broken policy file was accepted".into());
    };
    let bad = bad.message();
    if !bad.contains("FailedPrecondition") || !bad.contains("core.toml") || !bad.contains("ports") {
        return Err(failed!("a broken policy file: {bad}"));
    }
    // The exit codes a health check relies on: serving 0; the active
    // provider down 5 (degraded), with the status still printed.
    let (serving, _) = a.ctl_with_exit::<pb::StatusResponse>(&["status"])?;
    let boringssl = a.provider_pid(ProviderKind::BoringSsl).to_string();
    super::process::run(None, &["kill", "-9", &boringssl])?;
    let (down, status) = wait_for(
        Duration::from_secs(10),
        Duration::from_millis(200),
        || a.ctl_with_exit::<pb::StatusResponse>(&["status"]),
        |answer| answer.as_ref().map_or(true, |(code, _)| *code != 0),
    )
    .unwrap_or_else(|last| last)?;
    let active = status.as_ref().map(|s| s.active_provider.as_str());
    if serving != 0 || down != super::node::DEGRADED || active != Ok("boringssl") {
        return Err(failed!(
            "status exit codes: serving {serving}, active provider killed {down} (want 0 and {}): {status:?}",
            super::node::DEGRADED
        ));
    }
    let still = a.status()?;
    if first_rule_ports(still.policy.as_ref()) != [8443, 8444] {
        return Err(failed!("the old policy did not stay: {still:?}"));
    }
    // A switch to a provider that is down is refused unless forced.
    a.use_provider("openssl")?;
    let (code, refused) =
        a.ctl_with_exit::<pb::UseProviderResponse>(&["provider", "use", "boringssl"])?;
    let message = refused.as_ref().err().map_or("", |e| e.message.as_str());
    if code != 1 || !message.contains("FailedPrecondition") || !message.contains("--force") {
        return Err(failed!(
            "a switch to a killed provider: want exit 1 and a refusal naming --force, got {code}: {refused:?}"
        ));
    }
    let forced: pb::UseProviderResponse = a.ctl(&["provider", "use", "boringssl", "--force"])?;
    if forced.active != "boringssl" {
        return Err(failed!("provider use --force: {forced:?}"));
    }
    // Root only: a uid-65534 caller is turned away.
    let nobody = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("tlshubctl")
            .args(["--socket", &s, "status"])
            .uid(65534)
            .gid(65534)
            .output()
            .map_err(|e| e.to_string())?
    };
    if nobody.status.code() != Some(4) {
        return Err(failed!(
            "a non-root caller: want exit 4 (not permitted), got {:?}: {}",
            nobody.status.code(),
            String::from_utf8_lossy(&nobody.stderr)
        ));
    }
    let metrics = a.metrics()?;
    for want in [
        "tlshub_provider_up{provider=\"openssl\"} 1",
        "tlshub_provider_active{provider=\"boringssl\"} 1",
        "tlshub_provider_switches_total 3",
        "# TYPE tlshub_key_duration_seconds histogram",
        "# TYPE tlshub_gate_hold_duration_seconds histogram",
        "tlshub_gate_no_core_total 0",
    ] {
        if !metrics.contains(want) {
            return Err(failed!("metrics lack {want:?}:\n{metrics}"));
        }
    }
    let help = text(&["--help"])?;
    if !help.contains("Examples:") || !help.contains("provider use") {
        return Err(failed!("--help: {help}"));
    }
    // The switch outlives the core: a restarted core keeps boringssl
    // although the configuration says openssl.
    a.stop_core();
    a.restart_core("restarted")?;
    let restarted = wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || a.status(),
        Result::is_ok,
    )
    .unwrap_or_else(|last| last)
    .map_err(|e| e.context("the restarted core does not answer"))?;
    // Degraded (boringssl is still down, exit 5), but printed.
    let status_text = super::process::command(None, &["tlshubctl", "--socket", &s, "status"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if restarted.active_provider != "boringssl"
        || restarted.configured_provider != "openssl"
        || !status_text.contains("switched by `provider use`; the configuration says openssl")
    {
        return Err(failed!(
            "the restarted core did not keep the switch to boringssl, or its status does not say so: {restarted:?}\n{status_text}"
        ));
    }
    Ok(format!(
        "status (text and JSON; exit 0 serving, 5 with the active provider killed), connections, provider use (and a refused unknown name, exit 1; a killed provider refused, exit 1, then forced; the switch kept by a restarted core), policy reload (and a refused broken file, old policy kept), non-root refused (exit 4), metrics: {} lines",
        metrics.lines().count()
    ))
}

/// The ports of a policy's first rule (none without a policy or rule).
fn first_rule_ports(policy: Option<&pb::Policy>) -> Vec<u32> {
    policy
        .and_then(|p| p.rules.first())
        .map(|r| r.ports.clone())
        .unwrap_or_default()
}
