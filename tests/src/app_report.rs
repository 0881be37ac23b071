//! The report `tlshub-testapp` prints as its last line, shared by the app
//! that writes it and the scenarios that read it back.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::app_io::ProbeStep;

/// Which side of the exchange the app was.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppRole {
    /// It connected.
    #[default]
    Client,
    /// It accepted.
    Server,
    /// It ran a probe (`tlshub-testapp probe`).
    Probe,
}

/// What became of the first bytes a client sent with Fast Open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FastOpenOutcome {
    /// They went with the connecting call.
    Sent,
    /// The call was refused (`EOPNOTSUPP`) and the client fell back to
    /// `connect()` and `send()`.
    Refused,
}

/// What became of an app's Multipath TCP socket (`--mptcp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MptcpOutcome {
    /// The connect() or listen() over MPTCP succeeded.
    Used,
    /// It failed with this errno, and the app fell back to TCP.
    FellBack(i32),
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What one run of `tlshub-testapp` did: its connections' bytes, and the
/// error that ended it, if one did.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AppReport {
    /// Every connection's exchange was exact, both ways.
    pub ok: bool,
    /// Which side it was.
    pub role: AppRole,
    /// Its pid as it sees it (`getpid()`, in its own pid namespace: 1 for
    /// a container's main process).
    pub pid: u32,
    /// Its real uid.
    pub uid: u32,
    /// Connections that completed their exchange.
    pub connections: u32,
    /// Bytes it sent, and received (checked against the pattern).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// What ended the run early.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The error's errno, when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// Microseconds: connect start to first echoed byte per connection
    /// (echo mode), or send to echo per transaction (rr mode).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub latency_us: Vec<u64>,
    /// Bytes per second of the transfer (throughput mode); with
    /// `--parallel`, all connections' bytes over the slowest one's time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_sec: Option<f64>,
    /// Transactions per second (rr mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transactions_per_sec: Option<f64>,
    /// fd numbers reused (fd-reuse scenario).
    pub reused_fds: u32,
    /// What became of Fast Open's first bytes (`--fastopen`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fastopen: Option<FastOpenOutcome>,
    /// What became of the app's Multipath TCP socket (`--mptcp`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mptcp: Option<MptcpOutcome>,
    /// Accepted sockets that were Multipath TCP (an MPTCP listener's
    /// clients that offered MPTCP; the others get TCP sockets).
    #[serde(skip_serializing_if = "is_zero")]
    pub mptcp_accepted: u64,
    /// connect() calls on connected sockets that failed with EISCONN
    /// (`--connect-again`).
    #[serde(skip_serializing_if = "is_zero")]
    pub eisconn: u64,
    /// io_uring data requests that completed with EINTR and were submitted
    /// again (`--send io-uring`, `--recv io-uring`).
    #[serde(skip_serializing_if = "is_zero")]
    pub uring_interrupted: u64,
    /// `--reconnect`: attempts (client) or connections (server) that ended
    /// in a clean I/O error.
    #[serde(skip_serializing_if = "is_zero")]
    pub failed_cleanly: u64,
    /// `--reconnect`, client: attempts whose `connect(AF_UNSPEC)` was
    /// refused (the socket was keyed already: the tls ULP cannot be
    /// disconnected), so the exchange ran on the first connection.
    #[serde(skip_serializing_if = "is_zero")]
    pub disconnect_refused: u64,
    /// `--mode fill-half-close`, client: how long `shutdown()` took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_ms: Option<u64>,
    /// SO_SNDBUF of the last connection after its exchange.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_buffer: Option<usize>,
    /// `probe`: each call and its errno.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub probe: Vec<ProbeStep>,
}

/// As the app printed it (one JSON line), for failure messages.
impl fmt::Display for AppReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::fmt_report(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_reads_back_as_written() {
        let written = AppReport {
            ok: false,
            role: AppRole::Probe,
            connections: 2,
            bytes_sent: 10,
            error: Some("reset".into()),
            errno: Some(104),
            fastopen: Some(FastOpenOutcome::Refused),
            mptcp: Some(MptcpOutcome::FellBack(95)),
            eisconn: 3,
            probe: vec![ProbeStep {
                call: "send".into(),
                errno: 11,
            }],
            ..AppReport::default()
        };
        let line = written.to_string();
        assert!(line.contains(r#""role":"probe""#), "{line}");
        assert!(!line.contains("shutdown_ms"), "{line}");
        let read: AppReport = serde_json::from_str(&line).unwrap();
        assert_eq!(read, written);
    }
}
