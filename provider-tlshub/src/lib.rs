//! The TLSHub kernel-module provider (`tlshub-provider-tlshub`).
//!
//! The module performs node-level mutual-TLS handshakes in the kernel and
//! hands out a 32-byte master key per connection 4-tuple over netlink.
//!
//! - [`codec`]: request layouts v1 and v2 and the replies, byte for byte,
//!   checked by type and length (property-tested against arbitrary bytes);
//! - [`module`]: the netlink client (INIT once, then FETCH, START on no key
//!   or an expired key, FETCH again), a timeout on every wait, replies
//!   accepted only from the module's port, log lines forwarded, a pool of
//!   sockets (one request in flight per socket);
//! - [`schedule`]: per-connection, per-direction kTLS keys derived from the
//!   master key (the derivation and its test vectors are documented there);
//! - [`pod_map`]: the pod-to-node mapping for layout v2, from the cluster's
//!   node map or a pod map file, reloaded when it changes;
//! - [`provider`]: the SDK provider tying them together; IPv6 connections
//!   get a clear "not supported by TLSHub" error.
//!
//! Tests use `tlshub-standin` (in `tests/`), which plays the module's side
//! over `NETLINK_USERSOCK` with real node-level handshakes.
#![forbid(unsafe_code)]

pub mod codec;
pub mod module;
pub mod pod_map;
pub mod provider;
pub mod schedule;
