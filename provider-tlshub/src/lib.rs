//! The TLSHub kernel-module provider, in pieces (issue #3).
//!
//! Landed so far, all host-tested:
//! - [`codec`]: the module's netlink request layouts v1 and v2 and its
//!   replies, checked by type and length;
//! - [`schedule`]: per-connection, per-direction kTLS keys derived from the
//!   module's 32-byte master key (documented with test vectors);
//! - [`pod_map`]: the pod-to-node mapping file;
//! - [`module`]: the netlink client (INIT, FETCH, START, FETCH) with
//!   timeouts, reply checks and log forwarding, and a socket pool.
//!
//! Not yet: the stand-in module and the provider binary. The crate has no binary until they exist, so nothing can be
//! deployed that pretends to provide keys.
#![forbid(unsafe_code)]

pub mod codec;
pub mod module;
pub mod pod_map;
pub mod provider;
pub mod schedule;
