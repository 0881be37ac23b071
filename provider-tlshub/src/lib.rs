//! The TLSHub kernel-module provider (netlink). Not implemented yet: it is
//! issue #3. This crate has no binary so that nothing can be deployed that
//! pretends to provide keys.
#![forbid(unsafe_code)]
