//! Connections to a Service's virtual address: where they really go, and
//! what that means for them. The sockops program selects a connect to a
//! service address (`[policy] service_cidrs`) and the gate holds its first
//! byte; at establishment the keying job asks the node's connection
//! tracking table for the translated destination ([`crate::conntrack`])
//! and [`route`] decides. Pure, so that every case is unit-tested.

use std::net::SocketAddr;

use crate::config::PolicySection;
use crate::conntrack::{ConntrackError, Translation};

/// What becomes of a connection to a service address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceRoute {
    /// The rules select the backend: key the connection with the backend
    /// as its remote end (the tuple the backend's socket sees too, so a
    /// key-only provider derives the same keys on both sides).
    Keyed {
        /// The translated destination.
        backend: SocketAddr,
    },
    /// No rule selects the backend: let the connection through as plain.
    Plain {
        /// The translated destination.
        backend: SocketAddr,
    },
}

/// Why a connection to a service address cannot be routed; the failure
/// policy applies (fail-closed resets it before any byte left).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The table has no entry for the connection, so where it went is
    /// unknown (connection tracking is off in `[conntrack] netns`, or that
    /// is the wrong namespace). Not judged plain: a wrong namespace would
    /// then send a selected backend's first bytes in clear.
    #[error(
        "no connection tracking entry for {local} -> {service}; is [conntrack] netns the namespace that translates it?"
    )]
    Untranslated {
        /// This side.
        local: SocketAddr,
        /// The service address connected to.
        service: SocketAddr,
    },
    /// The selected backend sees another source address than this side's
    /// (source NAT on the way): the two ends would not agree on the
    /// connection's tuple, and the backend's side would not select it.
    #[error("source NAT on the way to {backend}: it sees {seen}, not {local}")]
    SourceNat {
        /// This side.
        local: SocketAddr,
        /// The translated destination.
        backend: SocketAddr,
        /// The source the backend sees.
        seen: SocketAddr,
    },
    /// The table could not be read.
    #[error(transparent)]
    Conntrack(#[from] ConntrackError),
}

impl ServiceError {
    /// A short label for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Untranslated { .. } => "service_untranslated",
            Self::SourceNat { .. } => "service_source_nat",
            Self::Conntrack(_) => "conntrack",
        }
    }
}

/// Decides for the connection `local` -> `service`, given what the table
/// says about it (`None`: no entry).
pub fn route(
    policy: &PolicySection,
    local: SocketAddr,
    service: SocketAddr,
    translation: Option<Translation>,
) -> Result<ServiceRoute, ServiceError> {
    let t = translation.ok_or(ServiceError::Untranslated { local, service })?;
    let backend = t.reply_source;
    if !policy.selects_client(local, backend) {
        return Ok(ServiceRoute::Plain { backend });
    }
    if !same_endpoint(t.reply_destination, local) {
        return Err(ServiceError::SourceNat {
            local,
            backend,
            seen: t.reply_destination,
        });
    }
    Ok(ServiceRoute::Keyed { backend })
}

/// Equal, counting an IPv4-mapped address as its IPv4 address.
fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |s: SocketAddr| (s.ip().to_canonical(), s.port());
    canon(a) == canon(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn policy() -> PolicySection {
        let text = r#"
local_cidrs = ["10.0.1.0/24"]
service_cidrs = ["10.96.0.0/12"]
[[rules]]
peer_cidrs = ["10.0.2.0/24"]
ports = [8443]
"#;
        toml::from_str(text).unwrap()
    }

    const LOCAL: &str = "10.0.1.2:40000";
    const SERVICE: &str = "10.96.0.10:80";

    fn via(backend: &str, seen: &str) -> Option<Translation> {
        Some(Translation {
            reply_source: sa(backend),
            reply_destination: sa(seen),
        })
    }

    #[test]
    fn a_selected_backend_is_keyed_as_the_remote_end() {
        let r = route(
            &policy(),
            sa(LOCAL),
            sa(SERVICE),
            via("10.0.2.2:8443", LOCAL),
        )
        .unwrap();
        assert_eq!(
            r,
            ServiceRoute::Keyed {
                backend: sa("10.0.2.2:8443")
            }
        );
        // The table may report the connection's own source as IPv4 while
        // the socket's is mapped.
        let mapped = route(
            &policy(),
            sa("[::ffff:10.0.1.2]:40000"),
            sa(SERVICE),
            via("10.0.2.2:8443", LOCAL),
        )
        .unwrap();
        assert_eq!(
            mapped,
            ServiceRoute::Keyed {
                backend: sa("10.0.2.2:8443")
            }
        );
    }

    #[test]
    fn a_backend_no_rule_selects_is_plain() {
        // Selected peer, unselected port.
        let r = route(
            &policy(),
            sa(LOCAL),
            sa(SERVICE),
            via("10.0.2.2:8080", LOCAL),
        )
        .unwrap();
        assert_eq!(
            r,
            ServiceRoute::Plain {
                backend: sa("10.0.2.2:8080")
            }
        );
        // Unselected peer; source NAT does not matter for a plain one.
        let r = route(
            &policy(),
            sa(LOCAL),
            sa(SERVICE),
            via("10.0.9.9:8443", "10.99.0.1:5000"),
        )
        .unwrap();
        assert_eq!(
            r,
            ServiceRoute::Plain {
                backend: sa("10.0.9.9:8443")
            }
        );
        // Nothing translated it: judged on its own addresses.
        let r = route(&policy(), sa(LOCAL), sa(SERVICE), via(SERVICE, LOCAL)).unwrap();
        assert_eq!(
            r,
            ServiceRoute::Plain {
                backend: sa(SERVICE)
            }
        );
    }

    #[test]
    fn no_entry_and_source_nat_to_a_selected_backend_are_errors() {
        let e = route(&policy(), sa(LOCAL), sa(SERVICE), None).unwrap_err();
        assert_eq!(e.reason(), "service_untranslated");
        let e = route(
            &policy(),
            sa(LOCAL),
            sa(SERVICE),
            via("10.0.2.2:8443", "10.99.0.1:5000"),
        )
        .unwrap_err();
        assert!(
            matches!(e, ServiceError::SourceNat { seen, .. } if seen == sa("10.99.0.1:5000")),
            "{e:?}"
        );
        // Port translation alone is source NAT too.
        let e = route(
            &policy(),
            sa(LOCAL),
            sa(SERVICE),
            via("10.0.2.2:8443", "10.0.1.2:40001"),
        )
        .unwrap_err();
        assert_eq!(e.reason(), "service_source_nat");
    }
}
