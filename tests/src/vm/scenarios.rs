//! The index of the kernel scenarios: each returns an
//! [`Outcome`](super::outcome::Outcome), a summary or a typed failure, and
//! the runner prints one result line per scenario. The
//! bodies live by topic (`exchange`, `providers`, `credentials`,
//! `failure`, `service`, `admin`, `restarts`, `gate_paths`, `gate_edges`,
//! `gate_calls`, `gate_abuse`, `gate_capacity`, `dnat`, `rollout`,
//! `node_pair`, `event_loops`, `stress`); what
//! they share is in `support` and `wire_check`. tests/README.md says how to
//! add one.

use crate::vm::outcome::Outcome;

/// A scenario: name and body.
pub type Scenario = (&'static str, ScenarioFn);

/// A scenario's body: a one-line summary, or why it failed.
pub type ScenarioFn = fn() -> Outcome;

/// Every scenario of `cargo xtask test`, in order.
pub const TESTS: &[Scenario] = &[
    (
        "kernel_has_ktls_and_bpf_lsm",
        super::exchange::kernel_has_ktls_and_bpf_lsm,
    ),
    (
        "attach_detach_under_hook_traffic",
        super::stress::attach_detach_under_hook_traffic_short,
    ),
    (
        "exchange_matrix_wire_is_tls_and_decrypts",
        super::exchange::exchange_matrix,
    ),
    (
        "cipher_suites_aes256_chacha20",
        super::exchange::cipher_suites,
    ),
    ("large_transfers_64mib", super::exchange::large_transfers),
    (
        "sendfile_splice_small_send_buffer_no_stall",
        super::exchange::small_send_buffer_sendpage,
    ),
    (
        "ipv6_exchange_wire_is_tls_and_decrypts",
        super::exchange::ipv6_exchange,
    ),
    (
        "dual_stack_sockets_v4_mapped_exchange",
        super::exchange::dual_stack_exchange,
    ),
    (
        "concurrent_keying_200_connections",
        super::exchange::concurrent_keying,
    ),
    (
        "tlshub_provider_with_standin_module",
        super::providers::tlshub_provider,
    ),
    (
        "key_only_providers_key_before_accept",
        super::providers::keys_before_accept,
    ),
    (
        "tlshub_expired_node_secret_rehandshakes",
        super::providers::tlshub_expiry,
    ),
    (
        "boringssl_and_openssl_interoperate",
        super::providers::boringssl_interop,
    ),
    (
        "node_pair_openssl_boringssl_both_ways",
        super::node_pair::openssl_boringssl_both_ways,
    ),
    (
        "node_pair_sessions_replaced_and_restarted",
        super::node_pair::sessions_replaced_and_restarted,
    ),
    (
        "provider_certificate_reload_under_load",
        super::credentials::certificate_reload,
    ),
    (
        "provider_ca_rotation_without_restart",
        super::credentials::ca_rotation,
    ),
    (
        "provider_peer_must_be_its_node",
        super::credentials::peer_must_be_its_node,
    ),
    (
        "conformance_suite_all_providers",
        super::providers::conformance_all,
    ),
    (
        "fail_closed_provider_missing",
        super::failure::fail_closed_provider_missing,
    ),
    (
        "fail_open_provider_missing",
        super::failure::fail_open_provider_missing,
    ),
    (
        "provider_hangs_fail_closed_in_time",
        super::failure::provider_hangs,
    ),
    (
        "provider_malformed_answers_reset",
        super::failure::provider_malformed,
    ),
    (
        "close_early_fd_reuse_and_idle_maps",
        super::failure::churn_and_fd_reuse,
    ),
    ("admin_cli_and_metrics", super::admin::admin_cli_and_metrics),
    (
        "hot_swap_providers_under_load_60s",
        super::service::hot_swap_under_load,
    ),
    ("tlshubctl_ab_under_load", super::service::ab_under_load),
    (
        "provider_kill9_under_load",
        super::restarts::provider_kill9_under_load,
    ),
    (
        "mismatched_providers_fail_closed",
        super::service::mismatched_providers_fail_closed,
    ),
    (
        "core_kill9_under_load",
        super::restarts::core_kill9_under_load,
    ),
    ("core_gone_release", super::restarts::core_gone_release),
    (
        "malformed_config_is_refused",
        super::failure::malformed_config,
    ),
    (
        "gate_owner_from_hold_io_uring_and_fork",
        super::gate_paths::owner_from_hold,
    ),
    (
        "gate_socket_in_a_thread_fd_table",
        super::gate_paths::socket_in_a_thread_fd_table,
    ),
    (
        "gate_event_loop_on_an_unreachable_socket_is_woken",
        super::gate_paths::event_loop_on_an_unreachable_socket,
    ),
    (
        "gate_io_uring_direct_socket_fails_closed",
        super::gate_paths::io_uring_direct_socket,
    ),
    (
        "gate_tcp_fast_open_refused_and_falls_back",
        super::gate_edges::fast_open,
    ),
    (
        "gate_exempt_pid_reused_is_held",
        super::gate_abuse::exempt_pid_reuse,
    ),
    (
        "gate_event_flood_from_one_app",
        super::gate_abuse::event_flood,
    ),
    (
        "gate_conns_map_full_fails_closed",
        super::gate_capacity::conns_map_full,
    ),
    (
        "gate_connect_flood_costs_no_capacity",
        super::gate_capacity::connect_flood,
    ),
    (
        "gate_process_and_cgroup_bounded_others_keyed",
        super::gate_capacity::process_and_cgroup_bound,
    ),
    (
        "gate_burst_beyond_the_open_files_soft_limit",
        super::gate_capacity::burst_beyond_the_open_files_soft_limit,
    ),
    (
        "gate_hold_unrecorded_answers_eintr",
        super::gate_abuse::hold_unrecorded,
    ),
    (
        "gate_hold_continued_by_another_process",
        super::gate_abuse::hold_continued_by_another_process,
    ),
    ("gate_half_close_before_keys", super::gate_edges::half_close),
    (
        "gate_shutdown_after_full_send_buffer",
        super::gate_edges::shutdown_after_full_send_buffer,
    ),
    (
        "gate_shutdown_after_more_writes",
        super::gate_edges::shutdown_after_more_writes,
    ),
    (
        "gate_shutdown_hold_is_bounded",
        super::gate_edges::shutdown_hold_is_bounded,
    ),
    ("gate_same_node_pods", super::gate_edges::same_node),
    (
        "gate_contained_apps_pid1_unprivileged",
        super::gate_edges::contained_apps,
    ),
    ("gate_traced_apps", super::gate_edges::traced_apps),
    (
        "gate_tcp_simultaneous_open",
        super::gate_opens::simultaneous_open,
    ),
    ("gate_self_connect", super::gate_opens::self_connect),
    ("gate_deferred_accept", super::gate_opens::deferred_accept),
    (
        "gate_syn_cookies_every_connection",
        super::gate_opens::syn_cookies,
    ),
    (
        "gate_reuseport_accept_queue_migrates",
        super::gate_opens::reuseport_accept_queue_migrates,
    ),
    (
        "service_dnat_to_selected_backend_all_providers",
        super::dnat::to_a_selected_backend,
    ),
    (
        "service_dnat_unselected_plain_and_source_nat_refused",
        super::dnat::unselected_backend_plain_and_source_nat_refused,
    ),
    (
        "rollout_opportunistic_peer_without_tlshub",
        super::rollout::opportunistic_peer_without_tlshub,
    ),
    (
        "rollout_opportunistic_both_nodes_protect",
        super::rollout::opportunistic_both_nodes_protect,
    ),
    (
        "rollout_listener_older_than_its_port_selection",
        super::rollout::listener_older_than_its_port_selection,
    ),
    (
        "rollout_downgrade_refused",
        super::rollout::downgrade_refused,
    ),
    (
        "rollout_opportunistic_incompatible_providers_plain",
        super::rollout::opportunistic_incompatible_providers_plain,
    ),
    (
        "rollout_upgrade_in_turn_under_load",
        super::rollout::upgrade_in_turn_under_load,
    ),
    (
        "gate_reconnect_during_keying",
        super::gate_edges::reconnect_during_keying,
    ),
    (
        "gate_unusual_socket_calls",
        super::gate_calls::unusual_socket_calls,
    ),
    (
        "gate_multipath_tcp_refused",
        super::gate_calls::multipath_tcp,
    ),
    (
        "gate_shared_memory_communications",
        super::gate_calls::shared_memory_communications,
    ),
    (
        "gate_io_uring_send_recv",
        super::gate_paths::uring_send_recv,
    ),
    (
        "gate_event_loops_are_never_stopped",
        super::event_loops::never_stopped,
    ),
    (
        "gate_tokio_server_never_stopped",
        super::event_loops::tokio_server_never_stopped,
    ),
    (
        "gate_go_runtime_never_stopped",
        super::event_loops::go_runtime_never_stopped,
    ),
    (
        "gate_edge_reader_with_records_queued",
        super::event_loops::edge_reader_with_records_queued,
    ),
    (
        "gate_event_loop_close_after_answer_not_deferred",
        super::event_loops::close_after_answer_not_deferred,
    ),
];
