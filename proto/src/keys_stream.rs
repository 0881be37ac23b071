//! The keys stream: `GetConnectionKeys` without HTTP/2, on a second Unix
//! socket next to the provider's gRPC socket (`ProviderInfo.keys_stream`
//! in `provider.proto`). Each message is a protobuf `KeysStreamRequest` or
//! `KeysStreamResponse` after its length (4 bytes, little-endian);
//! answers find their requests by `id`, so many are under way on one
//! connection. Why: on the host a key request over gRPC cost 25 to 130 us
//! of transport, and the same request framed like this 6 us
//! (`examples/round-trip.rs`); in the benchmark's VM the transport was
//! most of a key-only provider's key time. The server half answers
//! through the same code as gRPC (the server module's `Service`); the
//! client half is used by [`crate::client::ProviderClient`].

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Notify, oneshot};
use tokio_stream::{Stream, StreamExt};
use tracing::warn;

use crate::client::PeerHook;
use crate::pb;
use crate::server::{Provider, Service};

/// The largest message either side accepts (a request is about 100 bytes,
/// an answer about 150); a longer length prefix ends the connection.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The keys stream's socket for a provider whose gRPC socket is `grpc`:
/// the same path with `.keys` appended.
pub fn socket_path(grpc: &Path) -> PathBuf {
    let mut p = grpc.as_os_str().to_owned();
    p.push(".keys");
    PathBuf::from(p)
}

/// `message` with its length before it.
fn framed(message: &impl Message) -> Vec<u8> {
    let len = message.encoded_len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    message.encode_raw(&mut out);
    out
}

/// The next message's bytes; `None` at a clean end of the stream (between
/// messages). A length above [`MAX_MESSAGE`] is an error.
async fn read_message(r: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message of {len} bytes (at most {MAX_MESSAGE})"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// The `id` of a provider's last message on a connection: `not_run`, it
/// says that the provider reads nothing more there, so every request on
/// it that has no answer was not run (the core sent it while the provider
/// was closing) and may go to the next instance. The core numbers its
/// requests from 1.
pub const CLOSING_ID: u64 = 0;

/// The provider's last message on a connection ([`CLOSING_ID`]), framed.
fn last_word() -> Vec<u8> {
    framed(&pb::KeysStreamResponse {
        id: CLOSING_ID,
        code: tonic::Code::Unavailable as i32,
        message:
            "the provider stopped reading this connection; a request without an answer was not run"
                .into(),
        not_run: true,
        ..Default::default()
    })
}

/// What the server tracks across its connections.
#[derive(Debug, Default)]
struct ServerState {
    /// Set when the provider begins to stop: new requests are answered
    /// `not_run`, so the core sends them to the next instance.
    stopping: AtomicBool,
    /// Requests under way.
    in_flight: AtomicUsize,
    /// Connections not closed yet (each closes with [`CLOSING_ID`] once
    /// the provider stops and no request is under way).
    connections: AtomicUsize,
    /// Signalled when `in_flight` or `connections` drops or `stopping` is
    /// set.
    changed: Notify,
    /// Signalled when `stopping` is set, and only then: what waits for the
    /// stop is not woken by every answer.
    stop_signal: Notify,
}

/// Counts one connection in [`ServerState::connections`] until dropped.
struct Counted(Arc<ServerState>);

impl Counted {
    fn new(state: &Arc<ServerState>) -> Self {
        state.connections.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(state))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// The serving half, started by [`crate::server::serve_until`]. Dropping
/// it closes the listener.
#[derive(Debug)]
pub(crate) struct Server {
    state: Arc<ServerState>,
    accepting: tokio::task::JoinHandle<()>,
}

/// Tells a [`Server`] that the provider is stopping.
#[derive(Debug, Clone)]
pub(crate) struct Stopping(Arc<ServerState>);

impl Stopping {
    /// From now on new requests are answered `not_run`, and every
    /// connection, old or new, ends with the last word once no request is
    /// under way.
    pub(crate) fn stop(&self) {
        self.0.stopping.store(true, Ordering::SeqCst);
        self.0.stop_signal.notify_waiters();
        self.0.changed.notify_waiters();
    }
}

impl Server {
    /// Serves `service` to every connection `incoming` yields (callers
    /// checked already), until dropped.
    ///
    /// Connections are accepted while the provider stops too: the socket's
    /// name is gone by then, but a connection the core made just before
    /// may still wait in the listener's backlog. Closing the listener would
    /// reset it, and the core could not tell a request it wrote there from
    /// one a crashed provider had read; accepted, it is answered `not_run`
    /// and gets the last word like any other.
    pub(crate) fn start<P: Provider>(
        incoming: impl Stream<Item = io::Result<UnixStream>> + Send + 'static,
        service: Arc<Service<P>>,
    ) -> Self {
        let state = Arc::new(ServerState::default());
        let for_loop = Arc::clone(&state);
        let accepting = tokio::spawn(async move {
            let mut incoming = std::pin::pin!(incoming);
            while let Some(next) = incoming.next().await {
                match next {
                    Ok(stream) => {
                        // Counted before the task runs, so that
                        // `finished` cannot miss it.
                        let counted = Counted::new(&for_loop);
                        tokio::spawn(serve_connection(
                            stream,
                            Arc::clone(&service),
                            Arc::clone(&for_loop),
                            counted,
                        ));
                    }
                    Err(e) => warn!(error = %e, "keys stream: cannot accept"),
                }
            }
        });
        Self { state, accepting }
    }

    /// The handle that stops it.
    pub(crate) fn stopping(&self) -> Stopping {
        Stopping(Arc::clone(&self.state))
    }

    /// Completes once no request is under way and every connection has
    /// closed (after [`Stopping::stop`]).
    pub(crate) async fn finished(&self) {
        self.state
            .changed_until(|s| {
                s.in_flight.load(Ordering::SeqCst) == 0 && s.connections.load(Ordering::SeqCst) == 0
            })
            .await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl ServerState {
    /// Completes once `done` holds, checked again at every `changed`.
    async fn changed_until(&self, done: impl Fn(&Self) -> bool) {
        loop {
            let changed = self.changed.notified();
            if done(self) {
                return;
            }
            changed.await;
        }
    }
}

/// Completes once `state` is stopping and no request is under way: a
/// connection then closes.
async fn drained(state: &ServerState) {
    stopped(state).await;
    state
        .changed_until(|s| s.in_flight.load(Ordering::SeqCst) == 0)
        .await;
}

/// Completes once `state` is stopping.
async fn stopped(state: &ServerState) {
    loop {
        let signal = state.stop_signal.notified();
        if state.stopping.load(Ordering::SeqCst) {
            return;
        }
        signal.await;
    }
}

/// One connection: reads requests, runs each as its own task (a
/// handshake may take long, and the others must not wait for it), and
/// writes the answers as they come. A malformed message ends the
/// connection (the core then fails its requests under way). Once the
/// provider stops and nothing is under way, it stops reading and closes
/// with [`CLOSING_ID`], so that a request the core sent meanwhile is
/// known not to have run.
async fn serve_connection<P: Provider>(
    stream: UnixStream,
    service: Arc<Service<P>>,
    state: Arc<ServerState>,
    _counted: Counted,
) {
    let (reader, writer) = stream.into_split();
    // Buffered: a message's length and body, and any messages behind it,
    // come in one read (three system calls per message became two).
    let mut reader = tokio::io::BufReader::new(reader);
    // Each request's task writes its answer itself (a writer task would be
    // one more wakeup per answer, which costs as much as the rest here).
    let answers = Arc::new(tokio::sync::Mutex::new(writer));
    loop {
        let read = tokio::select! {
            read = read_message(&mut reader) => read,
            () = drained(&state) => {
                // A request cut off half-read here was not run either.
                let closing = last_word();
                // Bounded: a core that reads nothing must not hold the
                // provider's exit.
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    async { answers.lock().await.write_all(&closing).await },
                )
                .await;
                break;
            }
        };
        let message = match read {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                warn!(error = %e, "keys stream: closing a connection that sent a bad message");
                break;
            }
        };
        let request = match pb::KeysStreamRequest::decode(message.as_slice()) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "keys stream: closing a connection that sent a bad message");
                break;
            }
        };
        let id = request.id;
        if state.stopping.load(Ordering::SeqCst) {
            let refusal = framed(&pb::KeysStreamResponse {
                id,
                code: tonic::Code::Unavailable as i32,
                message: "the provider is stopping; the request was not started".into(),
                not_run: true,
                ..Default::default()
            });
            if answers.lock().await.write_all(&refusal).await.is_err() {
                break;
            }
            continue;
        }
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        let (service, state, answers) = (Arc::clone(&service), Arc::clone(&state), answers.clone());
        tokio::spawn(async move {
            let response = match request.request {
                None => pb::KeysStreamResponse {
                    id,
                    code: tonic::Code::InvalidArgument as i32,
                    message: "a keys stream request without its request".into(),
                    ..Default::default()
                },
                Some(r) => match service.answer(r).await {
                    Ok(keys) => pb::KeysStreamResponse {
                        id,
                        keys: Some(keys),
                        ..Default::default()
                    },
                    Err(status) => pb::KeysStreamResponse {
                        id,
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                        ..Default::default()
                    },
                },
            };
            let _ = answers.lock().await.write_all(&framed(&response)).await;
            // The answer held keys (its encoded bytes are gone with the
            // writer's buffer, as gRPC's are with HTTP/2's).
            if let Some(mut keys) = response.keys {
                crate::types::zeroize_wire(&mut keys);
            }
            state.in_flight.fetch_sub(1, Ordering::SeqCst);
            state.changed.notify_waiters();
        });
    }
}

/// Why a request on the keys stream got no answer.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// It was not sent: nothing listens on the stream's socket, or the
    /// connection failed before the whole request was written. No
    /// provider runs it.
    #[error("not sent: {0}")]
    NotSent(#[source] io::Error),
    /// The connection ended after the request was sent and before its
    /// answer: the provider may have started it (it stopped or crashed).
    #[error("the provider closed the keys stream before answering")]
    Closed,
    /// No answer within the wait.
    #[error("no answer within the wait")]
    Timeout,
}

/// Answers still to come on one connection, by request id.
type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<pb::KeysStreamResponse>>>>;

/// One connection to a provider's keys stream.
#[derive(Debug)]
struct Connection {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    waiting: Waiting,
    /// False once the reader saw the connection end.
    open: Arc<AtomicBool>,
}

/// The calling half: one connection to the provider's keys stream, made
/// on first use and again after it ends.
pub(crate) struct Client {
    path: PathBuf,
    on_connect: Option<PeerHook>,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("keys_stream::Client")
            .field("path", &self.path)
            .finish()
    }
}

impl Client {
    /// A client for the keys stream at `path`; `on_connect` is called with
    /// the provider's pid on every new connection (as for gRPC).
    pub(crate) fn new(path: PathBuf, on_connect: Option<PeerHook>) -> Self {
        Self {
            path,
            on_connect,
            connection: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> io::Result<Arc<Connection>> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.open.load(Ordering::SeqCst)) {
            return Ok(Arc::clone(c));
        }
        let stream = crate::client::connect(&self.path, self.on_connect.as_ref()).await?;
        let (reader, writer) = stream.into_split();
        // Buffered, as the server's reader is.
        let mut reader = tokio::io::BufReader::new(reader);
        let waiting: Waiting = Arc::default();
        let open = Arc::new(AtomicBool::new(true));
        let (for_reader, open_for_reader) = (Arc::clone(&waiting), Arc::clone(&open));
        tokio::spawn(async move {
            let mut closing = None;
            while let Ok(Some(message)) = read_message(&mut reader).await {
                let Ok(answer) = pb::KeysStreamResponse::decode(message.as_slice()) else {
                    warn!("keys stream: the provider sent a bad message; closing");
                    break;
                };
                if answer.id == CLOSING_ID {
                    closing = Some(answer);
                    break;
                }
                let to = for_reader
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&answer.id);
                if let Some(to) = to {
                    let _ = to.send(answer);
                }
            }
            // Before the requests still waiting are answered: one that
            // registers later sees the connection closed (see `request`).
            open_for_reader.store(false, Ordering::SeqCst);
            let waiting =
                std::mem::take(&mut *for_reader.lock().unwrap_or_else(PoisonError::into_inner));
            // Closed by the provider's last word: none of them was run.
            // Otherwise (a crash, or a broken stream) each learns that no
            // answer comes, and the provider may have started it.
            if let Some(closing) = closing {
                for (id, to) in waiting {
                    let _ = to.send(pb::KeysStreamResponse {
                        id,
                        ..closing.clone()
                    });
                }
            }
        });
        let c = Arc::new(Connection {
            writer: tokio::sync::Mutex::new(writer),
            waiting,
            open,
        });
        *slot = Some(Arc::clone(&c));
        Ok(c)
    }

    /// Sends `request` and waits up to `wait` for its answer.
    pub(crate) async fn request(
        &self,
        request: pb::ConnectionKeysRequest,
        wait: Duration,
    ) -> Result<pb::KeysStreamResponse, StreamError> {
        let deadline = tokio::time::Instant::now() + wait;
        let c = tokio::time::timeout_at(deadline, self.connection())
            .await
            .map_err(|_| StreamError::Timeout)?
            .map_err(StreamError::NotSent)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let forget = || {
            c.waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        };
        c.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        // The reader closes the connection before it answers those waiting,
        // so a request registered after that is caught here, unsent.
        if !c.open.load(Ordering::SeqCst) {
            forget();
            return Err(StreamError::NotSent(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the provider closed the keys stream",
            )));
        }
        let bytes = framed(&pb::KeysStreamRequest {
            id,
            request: Some(request),
        });
        let written = tokio::time::timeout_at(deadline, async {
            c.writer.lock().await.write_all(&bytes).await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                c.open.store(false, Ordering::SeqCst);
                forget();
                return Err(StreamError::NotSent(e));
            }
            Err(_) => {
                // Part of it may be in the socket: the connection can no
                // longer be trusted to frame the next request.
                c.open.store(false, Ordering::SeqCst);
                forget();
                return Err(StreamError::Timeout);
            }
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(StreamError::Closed),
            Err(_) => {
                forget();
                Err(StreamError::Timeout)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request the provider never read, on a connection it closed with
    /// its last word ([`CLOSING_ID`]), comes back `not_run` (for the next
    /// instance); on a connection that just ends (a crash) it is
    /// [`StreamError::Closed`]: the provider may have started it.
    #[tokio::test]
    async fn a_request_left_unread_is_not_run_only_after_the_last_word() {
        for last_word in [true, false] {
            let dir = std::env::temp_dir().join(format!(
                "tlshub-keys-stream-{}-{last_word}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("p.sock.keys");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let provider = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                // The request arrives; the provider stops without running it.
                read_message(&mut s).await.unwrap().unwrap();
                if last_word {
                    s.write_all(&super::last_word()).await.unwrap();
                }
            });
            let client = Client::new(path, None);
            let answer = client
                .request(pb::ConnectionKeysRequest::default(), Duration::from_secs(5))
                .await;
            provider.await.unwrap();
            match (last_word, answer) {
                (true, Ok(a)) if a.not_run && a.id == 1 => {}
                (false, Err(StreamError::Closed)) => {}
                (_, other) => panic!("last word {last_word}: {other:?}"),
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
