//! The handshake providers' credentials: certificates and CAs replaced
//! under load without a restart, and a peer whose certificate must name
//! the node that owns its address.

use std::time::{Duration, Instant};

use super::node::{NodeSpec, PROTECTED_PORT, ProviderKind};
use super::process::{self};
use super::support::*;
use super::wire_check::*;
use crate::failed;
use crate::vm::outcome::{Failure, Outcome};

/// Node a's OpenSSL provider while its certificate is replaced under load
/// (10 long connections, 2 new ones a second for 24 s):
/// 1. the expiry it reports (`tlshubctl status`, the core's metric) is the
///    loaded certificate's notAfter;
/// 2. a broken certificate file is refused (a log line), the old one stays
///    in use and the expiry does not move;
/// 3. a renewal (same key, 30 days) is taken without a restart: the expiry
///    follows within seconds;
/// 4. not one connection of the load fails or is corrupted meanwhile;
/// 5. SIGHUP reloads without ending the provider;
/// 6. new handshakes use the new files: with a certificate and key from a
///    CA node b does not trust, a new connection fails on both ends with
///    nothing received, and with the renewal back it is keyed again.
pub fn certificate_reload() -> Outcome {
    use super::service::{LoadServer, report, start_load_with};
    use tlshub_provider_sdk::handshake::files::certificate_credential;
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let files = a.provider_files();
    let (cert, key) = (files.cert, files.key);
    let expiry_of = |path: &std::path::Path| {
        certificate_credential(path)
            .map(|c| c.not_after_unix_seconds)
            .map_err(|e| e.to_string())
    };
    // What tlshubctl and the metrics say node a's provider holds.
    let reported = || -> Result<(i64, i64), Failure> {
        let s = a.status()?;
        let status = s
            .providers
            .first()
            .and_then(|p| p.credentials.first())
            .map(|c| c.not_after_unix_seconds)
            .ok_or(format!("no credential in the status: {s:?}"))?;
        let metrics = a.metrics()?;
        let metric = metrics
            .lines()
            .find(|l| l.starts_with("tlshub_provider_credential_expiry_timestamp_seconds{"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .ok_or("no credential expiry metric")?;
        Ok((status, metric))
    };
    let wait_for = |want: i64| -> Result<Duration, Failure> {
        let t = Instant::now();
        loop {
            let now = reported()?;
            if now == (want, want) {
                return Ok(t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(20) {
                return Err(failed!("status and metric say {now:?}, want {want}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let replace = replace_file;
    let read = read_pki;

    // 1.
    let original = expiry_of(&cert)?;
    wait_for(original)?;
    let server = LoadServer::start()?;
    let load = start_load_with(10, 24, 2.0)?;
    std::thread::sleep(Duration::from_secs(4));
    // 2.
    replace(
        &cert,
        b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    )?;
    let t = Instant::now();
    while !a
        .provider_log(ProviderKind::OpenSsl)
        .contains("new TLS files refused")
    {
        if t.elapsed() > Duration::from_secs(15) {
            return Err("a broken certificate file was not refused in the log".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if reported()? != (original, original) {
        return Err(failed!(
            "the expiry moved with a refused file: {:?}",
            reported()?
        ));
    }
    let own = a.provider_metrics(ProviderKind::OpenSsl)?;
    if !own.contains("tlshub_keyprovider_files_refused 1")
        || metric(&own, "tlshub_keyprovider_reloads_total{result=\"refused\"}") != 1.0
    {
        return Err(failed!(
            "the provider's metrics do not show the refused file once:\n{own}"
        ));
    }
    std::thread::sleep(Duration::from_secs(4));
    // 3.
    let renewed_pem = read("node-a-renewed.pem")?;
    replace(&cert, &renewed_pem)?;
    let renewed = expiry_of(&cert)?;
    let took = wait_for(renewed)?;
    let days = (original - renewed) / 86_400;
    let own = a.provider_metrics(ProviderKind::OpenSsl)?;
    if !own.contains("tlshub_keyprovider_files_refused 0")
        || metric(
            &own,
            "tlshub_keyprovider_reloads_total{result=\"reloaded\"}",
        ) < 1.0
    {
        return Err(failed!(
            "the provider's metrics do not show the renewal taken:\n{own}"
        ));
    }
    // 4.
    let r = report(&process::finish(load, Duration::from_secs(120))?)?;
    drop(server);
    if !r.ok
        || r.long_opened != 10
        || r.long_broken != 0
        || r.corrupt != 0
        || r.short_attempted == 0
        || r.short_ok != r.short_attempted
    {
        return Err(failed!(
            "connections failed while the certificate changed: {r}"
        ));
    }
    // 5.
    let pid = a.provider_pid(ProviderKind::OpenSsl);
    let before = reloads(&a);
    process::run(None, &["kill", "-HUP", &pid.to_string()])?;
    wait_reloaded(&a, before).map_err(|e| e.context("SIGHUP"))?;
    let exchange = App::exchange(10_000, PROTECTED_PORT);
    let (s, c) = run_pair(&exchange, &[], Duration::from_secs(30))?;
    both_ok(&exchange, &s, &c).map_err(|e| e.context("after SIGHUP"))?;
    // 6.
    replace(&key, &read("node-a-rogue.key")?)?;
    replace(&cert, &read("node-a-rogue.pem")?)?;
    wait_for(expiry_of(&cert)?)?;
    // Node a's side may finish its handshake (a TLS 1.3 client does before
    // the server checks its certificate) and then read node b's alert
    // through kTLS (EIO) instead of a reset: either way nothing arrives.
    let (s, c) = run_pair(&exchange, &[], Duration::from_secs(30))?;
    expect_server_failed_clean(&s).map_err(|e| e.context("with another CA's certificate"))?;
    if c.ok || c.bytes_received != 0 {
        return Err(failed!(
            "with another CA's certificate the client must fail with nothing received: {c}"
        ));
    }
    replace(&key, &read("node-a.key")?)?;
    replace(&cert, &renewed_pem)?;
    wait_for(renewed)?;
    let (s, c) = run_pair(&exchange, &[], Duration::from_secs(30))?;
    both_ok(&exchange, &s, &c).map_err(|e| e.context("with the renewal back"))?;
    drop((a, b));
    Ok(format!(
        "expiry {original} reported by status and metric; a broken file refused, the old certificate kept; the renewal ({days} days earlier expiry) taken in {:.1} s; {} short and 10 long connections all exact meanwhile; SIGHUP reloaded; with another CA's certificate a new connection failed on both ends with nothing received, with the renewal back keyed again",
        took.as_secs_f64(),
        r.short_ok
    ))
}

/// Replaces `to` at once (a rename), as a deployment tool does.
fn replace_file(to: &std::path::Path, bytes: &[u8]) -> Result<(), Failure> {
    let tmp = to.with_extension("new");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, to))
        .map_err(|e| failed!("{}: {e}", to.display()))
}

/// A file of the test PKI (see [`super::node::CERTS`]).
fn read_pki(file: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(format!("{}/{file}", super::node::CERTS)).map_err(|e| failed!("{file}: {e}"))
}

/// How often `node`'s OpenSSL provider has reloaded its files so far.
fn reloads(node: &super::node::Node) -> usize {
    node.provider_log(ProviderKind::OpenSsl)
        .matches("TLS files reloaded")
        .count()
}

/// Waits (10 s at most) until `node`'s OpenSSL provider reloaded its files
/// once more than `before`.
fn wait_reloaded(node: &super::node::Node, before: usize) -> Result<(), Failure> {
    let t = Instant::now();
    while reloads(node) <= before {
        if t.elapsed() > Duration::from_secs(10) {
            return Err("the provider did not reload its files within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Replaces files of `node`'s OpenSSL provider, in order, and waits until
/// the provider reloaded them.
fn change_files(
    node: &super::node::Node,
    files: &[(&std::path::Path, Vec<u8>)],
) -> Result<(), Failure> {
    let before = reloads(node);
    for (path, bytes) in files {
        replace_file(path, bytes)?;
    }
    wait_reloaded(node, before)
}

/// A node holding a valid certificate of the cluster CA cannot stand in
/// for another: both nodes' providers have the node map (pod-a's addresses
/// are node a's), and node a's provider is given node c's certificate and
/// key. A new connection must fail on both ends with nothing received,
/// node b's provider must log the refusal naming node c and node a, and
/// with node a's own certificate back a new connection must be keyed.
pub fn peer_must_be_its_node() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let exchange = App::exchange(10_000, PROTECTED_PORT);
    let (s, c) = run_pair(&exchange, &[], Duration::from_secs(30))?;
    both_ok(&exchange, &s, &c).map_err(|e| e.context("with the node map"))?;
    let fa = a.provider_files();
    change_files(
        &a,
        &[
            (&fa.key, read_pki("node-c.key")?),
            (&fa.cert, read_pki("node-c.pem")?),
        ],
    )?;
    let (s, c) = run_pair(&exchange, &[], Duration::from_secs(30))?;
    expect_server_failed_clean(&s).map_err(|e| e.context("node c's certificate"))?;
    if c.ok || c.bytes_received != 0 {
        return Err(failed!(
            "with node c's certificate the client must fail with nothing received: {c}"
        ));
    }
    let line = b
        .provider_log(ProviderKind::OpenSsl)
        .lines()
        .find(|l| l.contains("its certificate is not its node's"))
        .map(str::to_owned)
        .ok_or("node b's provider logged no refusal")?;
    if !(line.contains("node-c") && line.contains("node-a")) {
        return Err(failed!("the refusal must name both nodes: {line}"));
    }
    change_files(
        &a,
        &[
            (&fa.key, read_pki("node-a.key")?),
            (&fa.cert, read_pki("node-a.pem")?),
        ],
    )?;
    let (s, c) = run_pair(&exchange, &[], Duration::from_secs(30))?;
    both_ok(&exchange, &s, &c).map_err(|e| e.context("with node a's certificate back"))?;
    Ok(format!(
        "node c's valid certificate on node a refused by node b ({}); node a's own certificate keyed again",
        line.split("reason=").nth(1).unwrap_or(&line).trim()
    ))
}

/// Rotating the cluster CA without a flag day, each step a file change
/// the providers pick up by themselves (no restart), an exchange after
/// each: (1) both nodes trust the old and the new CA (one CA file with
/// both); (2) node a, then (3) node b, get certificates from the new CA;
/// (4) both trust only the new CA. Every exchange must be keyed, exact and
/// on the wire TLS only. Then (5) node a going back to its old-CA
/// certificate must fail on both ends with nothing received: the old CA
/// is no longer trusted.
pub fn ca_rotation() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let cap = Capture::start("ca-rotation")?;
    let exchange = App::exchange(10_000, PROTECTED_PORT);
    let run = |step: &str| -> Result<(), Failure> {
        let (s, c) = run_pair(&exchange, &[], Duration::from_secs(30))?;
        both_ok(&exchange, &s, &c).map_err(|e| e.context(step))
    };
    let change = change_files;
    let (fa, fb) = (a.provider_files(), b.provider_files());
    let both_cas = [read_pki("ca.pem")?, read_pki("rogue-ca.pem")?].concat();
    run("before")?;
    change(&a, &[(&fa.ca, both_cas.clone())])?;
    change(&b, &[(&fb.ca, both_cas)])?;
    run("both CAs trusted")?;
    // The key first: a pair seen half-replaced is refused, then taken.
    change(
        &a,
        &[
            (&fa.key, read_pki("node-a-rogue.key")?),
            (&fa.cert, read_pki("node-a-rogue.pem")?),
        ],
    )?;
    run("node a on the new CA")?;
    change(
        &b,
        &[
            (&fb.key, read_pki("node-b-rogue.key")?),
            (&fb.cert, read_pki("node-b-rogue.pem")?),
        ],
    )?;
    run("both nodes on the new CA")?;
    change(&a, &[(&fa.ca, read_pki("rogue-ca.pem")?)])?;
    change(&b, &[(&fb.ca, read_pki("rogue-ca.pem")?)])?;
    run("only the new CA trusted")?;
    change(
        &a,
        &[
            (&fa.key, read_pki("node-a.key")?),
            (&fa.cert, read_pki("node-a.pem")?),
        ],
    )?;
    let (s, c) = run_pair(&exchange, &[], Duration::from_secs(30))?;
    expect_server_failed_clean(&s).map_err(|e| e.context("an old-CA certificate"))?;
    if c.ok || c.bytes_received != 0 {
        return Err(failed!(
            "an old-CA certificate after the rotation: the client must fail with nothing received: {c}"
        ));
    }
    let control = App::exchange(10_000, super::node::PLAIN_PORT);
    let (s, c) = run_pair(&control, &[], Duration::from_secs(30))?;
    both_ok(&control, &s, &c)?;
    let wire = check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    // 10 or more: node a's side of the refused connection may have keyed
    // (a TLS 1.3 client finishes first) and sent its records.
    wire.expect_at_least(1, 2 * 5)?;
    Ok(format!(
        "old+new CA, node a then node b on the new CA, new CA only: 5 exchanges keyed and exact, each step a file change reloaded without a restart; an old-CA certificate then refused on both ends; wire: {} decrypted flows, no marker",
        wire.decrypted
    ))
}
