//! The in-VM side of the test bed: topology, processes, nodes and scenarios.
//! Only meaningful inside the VM that `cargo xtask vm` boots (it needs kTLS,
//! the BPF LSM and root); on the host these modules only compile.

pub mod admin;
pub mod alternatives;
pub mod bench;
pub mod capacity;
pub mod credentials;
pub mod dnat;
pub mod event_loops;
pub mod exchange;
pub mod failure;
pub mod gate_abuse;
pub mod gate_calls;
pub mod gate_capacity;
pub mod gate_edges;
pub mod gate_opens;
pub mod gate_paths;
pub mod gate_shutdown;
pub mod node;
pub mod node_pair;
pub mod outcome;
pub mod process;
pub mod profile;
pub mod providers;
pub mod restarts;
pub mod rollout;
pub mod scenarios;
pub mod service;
pub mod stress;
pub mod support;
pub mod systemd;
pub mod topology;
pub mod wire_check;
