//! The netlink client against a scripted peer on `NETLINK_USERSOCK`, the
//! same datagrams the module sends: the flow, log forwarding, and each
//! documented failure (silence, wrong type, short reply, -1/-2 statuses,
//! module not loaded).
#![expect(
    clippy::unwrap_used,
    reason = "test helpers panic on setup failure, like the tests"
)]

use std::time::Duration;

use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
use provider_tlshub::codec::{self, Layout, NLMSG_HDRLEN, reply_type};
use provider_tlshub::module::{ModuleConfig, ModuleError, ModuleSocket, Target};

const NETLINK_USERSOCK: isize = 2;

/// What the scripted peer answers to one request: datagrams (type, message).
type Script = fn(opcode: u8, fetches_so_far: usize) -> Vec<(u8, Vec<u8>)>;

fn config(port_id: u32) -> ModuleConfig {
    ModuleConfig {
        protocol: NETLINK_USERSOCK,
        port_id,
        layout: Layout::V1,
        timeout: Duration::from_millis(300),
        max_sockets: 2,
    }
}

fn target() -> Target {
    Target {
        client: "10.0.1.2:40000".parse().unwrap(),
        server: "10.0.2.2:8443".parse().unwrap(),
        server_node: None,
        server_side: false,
    }
}

/// Binds `port_id` and answers requests by `script` until the test ends.
async fn scripted_module(port_id: u32, script: Script) {
    let mut s = TokioSocket::new(NETLINK_USERSOCK).unwrap();
    s.socket_mut().bind(&SocketAddr::new(port_id, 0)).unwrap();
    tokio::spawn(async move {
        let mut fetches = 0;
        loop {
            let Ok((req, from)) = s.recv_from_full().await else {
                return;
            };
            let opcode = req[NLMSG_HDRLEN + 12];
            for (ty, msg) in script(opcode, fetches) {
                let reply = codec::encode_reply(ty, &msg, port_id);
                let _ = s.send_to(&reply, &from).await;
            }
            if opcode == 2 {
                fetches += 1;
            }
        }
    });
}

fn log(text: &str) -> (u8, Vec<u8>) {
    let mut m = text.as_bytes().to_vec();
    m.push(0);
    (reply_type::LOG, m)
}

#[tokio::test]
async fn fetch_start_fetch_with_logs_in_between() {
    scripted_module(61_001, |op, fetches| match (op, fetches) {
        (0, _) => vec![log("init"), (reply_type::INIT_COMPLETE, vec![])],
        (2, 0) => vec![(reply_type::KEY, codec::key_message(-1, &[0; 32]))],
        (1, _) => vec![log("handshaking"), (reply_type::HANDSHAKE_FIRST, vec![])],
        (2, _) => vec![
            log("fetch"),
            (reply_type::KEY, codec::key_message(0, &[9; 32])),
        ],
        _ => vec![],
    })
    .await;
    let mut m = ModuleSocket::open(config(61_001)).await.unwrap();
    let key = m.master_key(&target()).await.unwrap();
    assert_eq!(*key, [9; 32]);
}

#[tokio::test]
async fn silence_is_a_timeout() {
    scripted_module(61_002, |op, _| match op {
        0 => vec![(reply_type::INIT_COMPLETE, vec![])],
        _ => vec![],
    })
    .await;
    let mut m = ModuleSocket::open(config(61_002)).await.unwrap();
    match m.master_key(&target()).await {
        Err(ModuleError::Timeout { millis: 300, .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn a_reply_of_the_wrong_type_is_an_error() {
    scripted_module(61_003, |op, _| match op {
        0 => vec![(reply_type::INIT_COMPLETE, vec![])],
        _ => vec![(reply_type::INIT_COMPLETE, vec![])],
    })
    .await;
    let mut m = ModuleSocket::open(config(61_003)).await.unwrap();
    assert!(matches!(
        m.master_key(&target()).await,
        Err(ModuleError::Unexpected { .. })
    ));
}

#[tokio::test]
async fn a_short_key_reply_is_malformed_never_a_key() {
    scripted_module(61_004, |op, _| match op {
        0 => vec![(reply_type::INIT_COMPLETE, vec![])],
        _ => vec![(reply_type::KEY, vec![0, 0, 0, 0, 1, 2, 3])],
    })
    .await;
    let mut m = ModuleSocket::open(config(61_004)).await.unwrap();
    assert!(matches!(
        m.master_key(&target()).await,
        Err(ModuleError::Malformed(_))
    ));
}

#[tokio::test]
async fn expired_after_a_handshake_is_no_key() {
    scripted_module(61_005, |op, _| match op {
        0 => vec![(reply_type::INIT_COMPLETE, vec![])],
        1 => vec![(reply_type::ALREADY_CONNECTED, vec![])],
        _ => vec![(reply_type::KEY, codec::key_message(-2, &[0; 32]))],
    })
    .await;
    let mut m = ModuleSocket::open(config(61_005)).await.unwrap();
    assert!(matches!(
        m.master_key(&target()).await,
        Err(ModuleError::NoKey("expired"))
    ));
}

#[tokio::test]
async fn a_failed_handshake_is_reported_with_the_module_text() {
    scripted_module(61_006, |op, _| match op {
        0 => vec![(reply_type::INIT_COMPLETE, vec![])],
        1 => vec![(
            reply_type::HANDSHAKE_FAILED,
            b"peer certificate rejected\0".to_vec(),
        )],
        _ => vec![(reply_type::KEY, codec::key_message(-1, &[0; 32]))],
    })
    .await;
    let mut m = ModuleSocket::open(config(61_006)).await.unwrap();
    match m.master_key(&target()).await {
        Err(ModuleError::HandshakeFailed(t)) => assert_eq!(t, "peer certificate rejected"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn no_module_is_a_clear_error() {
    // Protocol 31 is not registered on a kernel without the module.
    let cfg = ModuleConfig {
        protocol: 31,
        ..config(0)
    };
    match ModuleSocket::open(cfg).await {
        Err(e @ ModuleError::NotLoaded { .. }) => assert!(e.to_string().contains("TLSHub module")),
        other => panic!("expected NotLoaded, got {other:?}"),
    }
}
