//! Talking to the TLSHub module over netlink: INIT once per socket, then per
//! connection FETCH, START when there is no key, FETCH again. Every receive
//! has a timeout, every reply is checked (`codec`), log lines are forwarded
//! to our logs, and replies from anyone but the module's port are ignored.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Mutex;
use std::time::Duration;

use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::codec::{self, CodecError, Layout, Opcode, Reply, Request};

/// How to reach the module.
#[derive(Debug, Clone)]
pub struct ModuleConfig {
    /// Netlink protocol number (31 for the module; 2, `NETLINK_USERSOCK`,
    /// for the stand-in).
    pub protocol: isize,
    /// The module's port id (0: the kernel).
    pub port_id: u32,
    /// Request layout.
    pub layout: Layout,
    /// Limit for each wait on the module.
    pub timeout: Duration,
    /// Most sockets open at once (one request in flight per socket).
    pub max_sockets: usize,
}

/// Why the module gave no key.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The protocol is not registered: the module is not loaded.
    #[error(
        "netlink protocol {protocol} is not available (is the TLSHub module loaded?): {source}"
    )]
    NotLoaded {
        /// The protocol number.
        protocol: isize,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// A socket call failed.
    #[error("netlink {action} failed: {source}")]
    Io {
        /// What was done.
        action: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The module did not answer in time.
    #[error("no {waiting_for} from the module within {millis} ms")]
    Timeout {
        /// What was awaited.
        waiting_for: &'static str,
        /// The limit.
        millis: u64,
    },
    /// A reply that does not parse.
    #[error("malformed reply from the module: {0}")]
    Malformed(#[from] CodecError),
    /// A well-formed reply of the wrong kind.
    #[error("the module answered {got} while we waited for {waiting_for}")]
    Unexpected {
        /// What was awaited.
        waiting_for: &'static str,
        /// What came.
        got: String,
    },
    /// The node-level handshake failed.
    #[error("the module's handshake failed: {0}")]
    HandshakeFailed(String),
    /// Still no key after a successful handshake.
    #[error("the module has no key for the connection even after a handshake ({0})")]
    NoKey(&'static str),
}

/// One netlink socket with INIT done.
pub struct ModuleSocket {
    socket: TokioSocket,
    own_port: u32,
    config: ModuleConfig,
}

impl std::fmt::Debug for ModuleSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleSocket")
            .field("own_port", &self.own_port)
            .finish()
    }
}

fn describe(r: &Reply) -> String {
    match r {
        Reply::Key(_) => "a key".into(),
        other => format!("{other:?}"),
    }
}

impl ModuleSocket {
    /// Opens, binds (the kernel picks our port id) and sends INIT.
    pub async fn open(config: ModuleConfig) -> Result<Self, ModuleError> {
        let mut socket = TokioSocket::new(config.protocol).map_err(|source| {
            if source.raw_os_error() == Some(libc::EPROTONOSUPPORT) {
                ModuleError::NotLoaded {
                    protocol: config.protocol,
                    source,
                }
            } else {
                ModuleError::Io {
                    action: "socket",
                    source,
                }
            }
        })?;
        let addr = socket
            .socket_mut()
            .bind_auto()
            .map_err(|source| ModuleError::Io {
                action: "bind",
                source,
            })?;
        let mut s = Self {
            socket,
            own_port: addr.port_number(),
            config,
        };
        s.send(Opcode::Init, None).await?;
        s.wait("INIT complete", |r| matches!(r, Reply::InitComplete))
            .await?;
        debug!(port = s.own_port, "module socket ready");
        Ok(s)
    }

    async fn send(&mut self, opcode: Opcode, target: Option<&Target>) -> Result<(), ModuleError> {
        let unspecified = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
        let req = Request {
            client: target.map_or(unspecified, |t| t.client),
            server: target.map_or(unspecified, |t| t.server),
            server_node: target
                .and_then(|t| t.server_node)
                .or(match self.config.layout {
                    Layout::V2 if target.is_none() => Some(Ipv4Addr::UNSPECIFIED),
                    _ => None,
                }),
            opcode,
            server_side: target.is_some_and(|t| t.server_side),
        };
        let bytes = codec::encode(&req, self.config.layout, self.own_port)?;
        let to = SocketAddr::new(self.config.port_id, 0);
        self.socket
            .send_to(&bytes, &to)
            .await
            .map_err(|source| ModuleError::Io {
                action: "send",
                source,
            })?;
        Ok(())
    }

    /// Receives until a reply `wanted` accepts arrives; log lines are
    /// forwarded, anything else ends the wait with an error.
    async fn wait(
        &mut self,
        waiting_for: &'static str,
        wanted: impl Fn(&Reply) -> bool,
    ) -> Result<Reply, ModuleError> {
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        loop {
            let received = tokio::time::timeout_at(deadline, self.socket.recv_from_full()).await;
            let (bytes, from) = match received {
                Err(_) => {
                    return Err(ModuleError::Timeout {
                        waiting_for,
                        millis: self.config.timeout.as_millis() as u64,
                    });
                }
                Ok(Err(source)) => {
                    return Err(ModuleError::Io {
                        action: "receive",
                        source,
                    });
                }
                Ok(Ok(x)) => x,
            };
            if from.port_number() != self.config.port_id {
                warn!(
                    from = from.port_number(),
                    "ignoring a netlink message not sent by the module"
                );
                continue;
            }
            let reply = codec::decode(&bytes)?;
            if let Reply::Log(line) = &reply {
                info!(module = %line, "TLSHub module");
                continue;
            }
            if wanted(&reply) {
                return Ok(reply);
            }
            return Err(ModuleError::Unexpected {
                waiting_for,
                got: describe(&reply),
            });
        }
    }

    async fn fetch(&mut self, t: &Target) -> Result<Reply, ModuleError> {
        self.send(Opcode::Fetch, Some(t)).await?;
        self.wait("a FETCH answer", |r| {
            matches!(r, Reply::Key(_) | Reply::NoKey | Reply::Expired)
        })
        .await
    }

    /// The master key of a connection: FETCH; on no key or an expired key,
    /// START (the node-level handshake), then FETCH once more.
    pub async fn master_key(&mut self, t: &Target) -> Result<Zeroizing<[u8; 32]>, ModuleError> {
        match self.fetch(t).await? {
            Reply::Key(k) => return Ok(k),
            other => debug!(reply = %describe(&other), "no key yet; starting a handshake"),
        }
        self.send(Opcode::Start, Some(t)).await?;
        match self
            .wait("a handshake answer", |r| {
                matches!(
                    r,
                    Reply::Handshake { .. } | Reply::AlreadyConnected | Reply::HandshakeFailed(_)
                )
            })
            .await?
        {
            Reply::HandshakeFailed(text) => return Err(ModuleError::HandshakeFailed(text)),
            other => debug!(reply = %describe(&other), "handshake done"),
        }
        match self.fetch(t).await? {
            Reply::Key(k) => Ok(k),
            Reply::Expired => Err(ModuleError::NoKey("expired")),
            _ => Err(ModuleError::NoKey("status -1")),
        }
    }
}

/// The connection as the module names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The connecting pod.
    pub client: SocketAddrV4,
    /// The accepting pod.
    pub server: SocketAddrV4,
    /// The accepting pod's node (layout v2).
    pub server_node: Option<Ipv4Addr>,
    /// Whether we are the accepting side.
    pub server_side: bool,
}

/// Up to `max_sockets` module sockets, reused; a socket that saw an error
/// is closed (a late reply on it could be mistaken for the next answer).
#[derive(Debug)]
pub struct ModulePool {
    config: ModuleConfig,
    idle: Mutex<Vec<ModuleSocket>>,
    permits: tokio::sync::Semaphore,
}

impl ModulePool {
    /// A pool; nothing is opened until the first request.
    pub fn new(config: ModuleConfig) -> Self {
        let permits = tokio::sync::Semaphore::new(config.max_sockets.max(1));
        Self {
            config,
            idle: Mutex::new(Vec::new()),
            permits,
        }
    }

    /// [`ModuleSocket::master_key`] on a pooled socket.
    pub async fn master_key(&self, t: &Target) -> Result<Zeroizing<[u8; 32]>, ModuleError> {
        let _permit = self.permits.acquire().await.map_err(|_| ModuleError::Io {
            action: "acquire a socket",
            source: std::io::Error::other("pool closed"),
        })?;
        let pooled = self.idle.lock().ok().and_then(|mut v| v.pop());
        let mut socket = match pooled {
            Some(s) => s,
            None => ModuleSocket::open(self.config.clone()).await?,
        };
        let result = socket.master_key(t).await;
        if result.is_ok()
            && let Ok(mut idle) = self.idle.lock()
        {
            idle.push(socket);
        }
        result
    }
}
