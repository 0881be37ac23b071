//! `cargo xtask demo`: one protected exchange, narrated.

use super::*;
use crate::failed;
use crate::vm::outcome::Outcome;

/// `cargo xtask demo`: one protected exchange, narrated.
pub fn demo() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let say = |s: &str| println!("TLSHUB-DEMO {s}");
    say(
        "two nodes up: pod-a 10.0.1.2 (node-a) <-> pod-b 10.0.2.2 (node-b); each node runs tlshub-core + tlshub-provider-openssl",
    );
    say(&format!(
        "policy: node-a protects 10.0.1.0/24 -> 10.0.2.0/24 port {PROTECTED_PORT}; node-b the reverse"
    ));
    let cap = Capture::start("demo")?;
    let app = App {
        mode: "client-first",
        ..App::exchange(16 << 20, PROTECTED_PORT)
    };
    let listen = format!("0.0.0.0:{PROTECTED_PORT}");
    let connect = format!("{POD_B}:{PROTECTED_PORT}");
    let args = app.args();
    let mut sargv = vec!["tlshub-testapp", "server", "--listen", &listen];
    sargv.extend(args.iter().map(String::as_str));
    let server = spawn_ready("pod-b", &sargv, "listening", Duration::from_secs(10))?;
    let mut cargv = vec!["tlshub-testapp", "client", "--connect", &connect];
    cargv.extend(args.iter().map(String::as_str));
    say(
        "app: an unmodified client in pod-a connects and writes 16 MiB at once; the server in pod-b answers with 16 MiB",
    );
    let client = process::spawn_app("pod-a", &cargv)?;
    // Shown as it was last seen, kTLS on or not.
    let ss = wait_for(
        Duration::from_secs(30),
        Duration::from_millis(20),
        || {
            process::run(
                Some("pod-a"),
                &["ss", "-tni", "state", "established", "( dport = :8443 )"],
            )
            .unwrap_or_default()
        },
        |ss| ss.contains("tls"),
    )
    .unwrap_or_else(|last| last);
    let c = app_report(&finish(client, Duration::from_secs(120))?)?;
    let s = app_report(&finish(server, Duration::from_secs(30))?)?;
    both_ok(&app, &s, &c)?;
    say("the kernel's own view of the client socket during the transfer (ss -tni):");
    for l in ss.lines() {
        say(&format!("  {l}"));
    }
    let Some(ulp) = ss
        .find("tcp-ulp-tls")
        .map(|i| ss[i..].lines().next().unwrap_or("").trim())
    else {
        return Err(failed!("ss did not show kTLS on the socket: {ss}"));
    };
    say(&format!("=> the kernel says: {ulp}"));
    for (name, n) in [("node-a", &a), ("node-b", &b)] {
        for k in n.keys() {
            say(&format!(
                "{name}: selected connection {} -> {} keyed by provider openssl: {} {} (keys installed with kTLS, not shown)",
                k.local, k.remote, k.version, k.suite
            ));
        }
        if let Some(line) = n.core_log().lines().find(|l| l.contains("kTLS installed")) {
            say(&format!("{name} core log: {}", line.trim()));
        }
    }
    // The control: the same capture must show plaintext where there is
    // some, or its "no plaintext" would prove nothing.
    super::super::wire_check::plain_control()?;
    let report = check_wire(&cap.finish()?, &a, &b)?;
    report.expect_at_least(1, 2)?;
    say(&format!(
        "wire check on the node-to-node veth: {} flows, TLS records only, no plaintext marker; decrypted with the reported keys to {} bytes = exactly what the apps sent",
        report.protected_flows, report.plaintext_bytes
    ));
    say(&format!(
        "the control: an unselected connection (port {PLAIN_PORT}) under the same capture showed its plaintext marker in {} flow(s), so the capture sees plaintext where there is some",
        report.plain_flows_with_marker
    ));
    say(&format!(
        "apps: client sent {} and received {} bytes, all verified",
        c.bytes_sent, c.bytes_received
    ));
    Ok("demo exchange protected end to end".into())
}
