//! Request/response multiplexing for clients over one bidirectional stream.
//!
//! Every client connection carries exactly one bidirectional stream, opened
//! by the client. Each direction is a sequence of [frames](crate::frame)
//! whose payload is postcard's encoding of `(request_id: u64, body)`: the id
//! as a varint, then the body. Responses carry the id of their request and
//! may come back in any order, so many calls share the stream without a
//! handshake or a stream per operation.
//!
//! Client ([`RpcClient`]): cheap to clone; one writer task owns the send half,
//! one reader task routes responses by id to the waiting calls. When the
//! connection ends, every call in flight fails with the same error, and so do
//! later calls. A server that refused our certificate is reported as
//! [`RpcError::Refused`]: with mutual TLS in QUIC the client's handshake
//! completes before the server has checked the client's certificate, so the
//! refusal may arrive only when the stream is first used.
//!
//! Server ([`RpcServer`]): decodes each request, runs the handler for it in a
//! task of its own (at most [`RpcServerConfig::max_concurrent`] per
//! connection; further requests wait in QUIC flow control), and writes the
//! responses through one writer. A malformed, truncated, oversized or
//! wrong-version request frame closes that connection with
//! [`CloseCode::Protocol`] and a logged reason; other connections are
//! unaffected.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, warn};

use crate::endpoint::{ClientHandler, CloseCode, peer_identity};
use crate::frame::{self, DEFAULT_MAX_FRAME, FrameError};
use crate::pki::{Identity, SERVER_NAME};
use crate::tls::{Alpn, Tls, TlsError};

/// Frames gathered into one stream write, at most.
const BATCH_FRAMES: usize = 64;

/// Why a payload could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// postcard refused the bytes.
    #[error("{0}")]
    Postcard(postcard::Error),
    /// The value was followed by extra bytes.
    #[error("{extra} trailing bytes")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
}

/// Why a connection is gone.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LossCause {
    /// The QUIC connection failed or was closed.
    #[error("{0}")]
    Connection(quinn::ConnectionError),
    /// The other side sent a bad frame.
    #[error("bad frame: {0}")]
    Frame(FrameError),
    /// The other side sent a frame whose request id does not decode.
    #[error("malformed frame: {0}")]
    Malformed(DecodeError),
    /// The server stopped or finished the stream.
    #[error("the server ended the stream")]
    StreamEnded,
}

/// Why connecting failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ConnectFailure {
    /// No local UDP socket.
    #[error("cannot bind a local socket: {0}")]
    Bind(Arc<std::io::Error>),
    /// quinn refused to start (bad address, endpoint closed).
    #[error("{0}")]
    Start(quinn::ConnectError),
    /// The handshake failed.
    #[error("{0}")]
    Handshake(quinn::ConnectionError),
    /// The server is not a node.
    #[error("the server's certificate is for {0}, not a node")]
    NotANode(String),
}

/// Errors of RPC calls.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RpcError {
    /// Our TLS material cannot be used.
    #[error("TLS: {0}")]
    Tls(Arc<TlsError>),
    /// The connection could not be established.
    #[error("cannot connect to {addr}: {failure}")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// Why.
        failure: ConnectFailure,
    },
    /// The server refused us, e.g. our certificate.
    #[error("refused by server: {reason}")]
    Refused {
        /// The server's or the TLS layer's reason.
        reason: String,
    },
    /// No response within the call's timeout. The request may still be
    /// carried out.
    #[error("no response within {after:?}")]
    Timeout {
        /// The timeout.
        after: Duration,
    },
    /// The connection ended before the response came.
    #[error("connection lost: {cause}")]
    ConnectionLost {
        /// Why.
        cause: LossCause,
    },
    /// The request could not be encoded.
    #[error("cannot encode request: {0}")]
    Encode(postcard::Error),
    /// The response did not decode as the expected type.
    #[error("cannot decode response: {0}")]
    Decode(DecodeError),
    /// The request exceeds the frame limit.
    #[error("request of {len} bytes exceeds the frame limit of {max}")]
    FrameTooLarge {
        /// Encoded size.
        len: usize,
        /// Limit.
        max: usize,
    },
}

/// Whether a QUIC transport error code is a TLS alert (RFC 9001 §4.8).
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// Maps the end of a connection to the error calls see. Only what the
/// server sent counts as a refusal; a TLS failure on our side (we did not
/// trust the server) is a connection failure.
fn classify(err: &quinn::ConnectionError) -> RpcError {
    use quinn::ConnectionError as E;
    match err {
        E::ConnectionClosed(close) if is_tls_alert(close.error_code) => RpcError::Refused {
            reason: format!("certificate rejected in the TLS handshake ({close})"),
        },
        E::ApplicationClosed(close)
            if CloseCode::from_varint(close.error_code) == Some(CloseCode::Refused) =>
        {
            RpcError::Refused {
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            }
        }
        other => RpcError::ConnectionLost {
            cause: LossCause::Connection(other.clone()),
        },
    }
}

fn classify_write(err: &quinn::WriteError) -> RpcError {
    match err {
        quinn::WriteError::ConnectionLost(e) => classify(e),
        _ => RpcError::ConnectionLost {
            cause: LossCause::StreamEnded,
        },
    }
}

fn classify_frame(err: FrameError) -> RpcError {
    RpcError::ConnectionLost {
        cause: LossCause::Frame(err),
    }
}

/// Decodes a whole payload as `T`, refusing trailing bytes.
fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(DecodeError::Postcard)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { extra: rest.len() });
    }
    Ok(value)
}

/// Splits a frame into its request id and the body's bytes.
fn split_id(bytes: &Bytes) -> Result<(u64, Bytes), DecodeError> {
    let (id, rest) = postcard::take_from_bytes::<u64>(bytes).map_err(DecodeError::Postcard)?;
    let offset = bytes.len() - rest.len();
    Ok((id, bytes.slice(offset..)))
}

/// Encodes `(id, body)` as a complete frame.
fn encode_frame<T: Serialize>(id: u64, body: &T, max: usize) -> Result<Bytes, RpcError> {
    let mut buf = Vec::new();
    let start = frame::begin_frame(&mut buf);
    let mut buf = postcard::to_extend(&(id, body), buf).map_err(RpcError::Encode)?;
    frame::end_frame(&mut buf, start, max).map_err(|e| match e {
        FrameError::TooLarge { len, max } => RpcError::FrameTooLarge { len, max },
        other => classify_frame(other),
    })?;
    Ok(Bytes::from(buf))
}

/// Writes frames from `rx` until it closes, gathering what is queued.
async fn write_frames(
    stream: &mut quinn::SendStream,
    rx: &mut mpsc::Receiver<Bytes>,
) -> Result<(), quinn::WriteError> {
    let mut batch = Vec::with_capacity(BATCH_FRAMES);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH_FRAMES {
            match rx.try_recv() {
                Ok(frame) => batch.push(frame),
                Err(_) => break,
            }
        }
        stream.write_all_chunks(&mut batch).await?;
        batch.clear();
    }
    Ok(())
}

/// Client settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RpcClientConfig {
    /// Largest request sent and response accepted.
    pub max_frame: usize,
    /// Requests queued for the writer before callers wait.
    pub max_queued: usize,
}

impl Default for RpcClientConfig {
    fn default() -> Self {
        RpcClientConfig {
            max_frame: DEFAULT_MAX_FRAME,
            max_queued: 1024,
        }
    }
}

type Reply = Result<Bytes, RpcError>;

/// Calls awaiting responses, and the error that ended the connection.
#[derive(Default)]
struct Calls {
    state: Mutex<CallState>,
}

#[derive(Default)]
struct CallState {
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    lost: Option<RpcError>,
}

impl Calls {
    fn lock(&self) -> std::sync::MutexGuard<'_, CallState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a call, unless the connection is already gone. Checked under
    /// the same lock that `fail_all` takes, so no call can slip in after the
    /// failure and wait forever.
    fn register(&self, id: u64, tx: oneshot::Sender<Reply>) -> Result<(), RpcError> {
        let mut state = self.lock();
        if let Some(lost) = &state.lost {
            return Err(lost.clone());
        }
        state.waiting.insert(id, tx);
        Ok(())
    }

    fn complete(&self, id: u64, body: Bytes) {
        // A missing id is a call that timed out: its answer is dropped.
        if let Some(tx) = self.lock().waiting.remove(&id) {
            let _ = tx.send(Ok(body));
        }
    }

    fn forget(&self, id: u64) {
        self.lock().waiting.remove(&id);
    }

    fn fail_all(&self, err: RpcError) {
        let waiting = {
            let mut state = self.lock();
            state.lost.get_or_insert(err.clone());
            std::mem::take(&mut state.waiting)
        };
        for (_, tx) in waiting {
            let _ = tx.send(Err(err.clone()));
        }
    }

    fn lost(&self) -> Option<RpcError> {
        self.lock().lost.clone()
    }
}

/// Removes a call's entry when the call ends early (timeout, cancellation).
struct Forget<'a> {
    calls: &'a Calls,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.calls.forget(self.id);
    }
}

struct ClientInner {
    conn: quinn::Connection,
    server: Identity,
    outgoing: mpsc::Sender<Bytes>,
    calls: Arc<Calls>,
    next_id: AtomicU64,
    max_frame: usize,
    tasks: [AbortHandle; 2],
    // A standalone client owns its endpoint; it must outlive the connection.
    _endpoint: Option<quinn::Endpoint>,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.conn.close(CloseCode::Done.into(), b"client closed");
    }
}

/// A multiplexing RPC client on one connection; clones share it.
#[derive(Clone)]
pub struct RpcClient {
    inner: Arc<ClientInner>,
}

impl fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcClient")
            .field("remote", &self.inner.conn.remote_address())
            .field("server", &self.inner.server)
            .finish()
    }
}

impl RpcClient {
    /// Connects to a node's client port with the identity in `tls`, from a
    /// new local socket.
    pub async fn connect(addr: SocketAddr, tls: &Tls) -> Result<RpcClient, RpcError> {
        RpcClient::connect_with(addr, tls, RpcClientConfig::default()).await
    }

    /// [`RpcClient::connect`] with explicit settings.
    pub async fn connect_with(
        addr: SocketAddr,
        tls: &Tls,
        config: RpcClientConfig,
    ) -> Result<RpcClient, RpcError> {
        let bind: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| RpcError::Connect {
            addr,
            failure: ConnectFailure::Bind(Arc::new(e)),
        })?;
        RpcClient::connect_on(&endpoint, Some(endpoint.clone()), addr, tls, config).await
    }

    pub(crate) async fn connect_on(
        endpoint: &quinn::Endpoint,
        owned: Option<quinn::Endpoint>,
        addr: SocketAddr,
        tls: &Tls,
        config: RpcClientConfig,
    ) -> Result<RpcClient, RpcError> {
        let client_config = tls
            .client_config(Alpn::Client)
            .map_err(|e| RpcError::Tls(Arc::new(e)))?;
        let connecting = endpoint
            .connect_with(client_config, addr, SERVER_NAME)
            .map_err(|e| RpcError::Connect {
                addr,
                failure: ConnectFailure::Start(e),
            })?;
        let conn = connecting.await.map_err(|e| match classify(&e) {
            refused @ RpcError::Refused { .. } => refused,
            _ => RpcError::Connect {
                addr,
                failure: ConnectFailure::Handshake(e),
            },
        })?;
        // TLS has checked the server's chain and its server name, which only
        // node certificates carry; reading the identity also tells the
        // caller which node it reached.
        let server = match peer_identity(&conn) {
            Ok(server @ Identity::Node(_)) => server,
            Ok(other) => {
                conn.close(CloseCode::Refused.into(), b"server is not a node");
                return Err(RpcError::Connect {
                    addr,
                    failure: ConnectFailure::NotANode(other.to_string()),
                });
            }
            Err(e) => {
                conn.close(CloseCode::Refused.into(), b"server has no identity");
                return Err(RpcError::Connect {
                    addr,
                    failure: ConnectFailure::NotANode(e.to_string()),
                });
            }
        };
        let (send, recv) = conn.open_bi().await.map_err(|e| classify(&e))?;
        let calls = Arc::new(Calls::default());
        let (outgoing, rx) = mpsc::channel(config.max_queued.max(1));
        let writer = tokio::spawn(client_writer(send, rx, calls.clone()));
        let reader = tokio::spawn(client_reader(
            recv,
            conn.clone(),
            calls.clone(),
            config.max_frame,
        ));
        Ok(RpcClient {
            inner: Arc::new(ClientInner {
                conn,
                server,
                outgoing,
                calls,
                next_id: AtomicU64::new(1),
                max_frame: config.max_frame,
                tasks: [writer.abort_handle(), reader.abort_handle()],
                _endpoint: owned,
            }),
        })
    }

    /// The node this client is connected to.
    pub fn server(&self) -> &Identity {
        &self.inner.server
    }

    /// The server's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.conn.remote_address()
    }

    /// The error that ended the connection, if it has ended.
    pub fn lost(&self) -> Option<RpcError> {
        self.inner.calls.lost()
    }

    /// Sends `request` and waits at most `timeout` for the response.
    pub async fn call<Req, Resp>(&self, request: &Req, timeout: Duration) -> Result<Resp, RpcError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let inner = &*self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(id, &request, inner.max_frame)?;
        let (tx, rx) = oneshot::channel();
        inner.calls.register(id, tx)?;
        let _forget = Forget {
            calls: &inner.calls,
            id,
        };
        let exchange = async {
            if inner.outgoing.send(frame).await.is_err() {
                return Err(inner.calls.lost().unwrap_or(RpcError::ConnectionLost {
                    cause: LossCause::StreamEnded,
                }));
            }
            match rx.await {
                Ok(reply) => reply,
                Err(_) => Err(inner.calls.lost().unwrap_or(RpcError::ConnectionLost {
                    cause: LossCause::StreamEnded,
                })),
            }
        };
        let body = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| RpcError::Timeout { after: timeout })??;
        decode_exact(&body).map_err(RpcError::Decode)
    }
}

async fn client_writer(
    mut stream: quinn::SendStream,
    mut rx: mpsc::Receiver<Bytes>,
    calls: Arc<Calls>,
) {
    match write_frames(&mut stream, &mut rx).await {
        // Every handle is gone: tell the server we are done.
        Ok(()) => {
            let _ = stream.finish();
        }
        Err(e) => calls.fail_all(classify_write(&e)),
    }
}

async fn client_reader(
    mut stream: quinn::RecvStream,
    conn: quinn::Connection,
    calls: Arc<Calls>,
    max_frame: usize,
) {
    let err = loop {
        match frame::read_frame(&mut stream, max_frame).await {
            Ok(Some(bytes)) => match split_id(&bytes) {
                Ok((id, body)) => calls.complete(id, body),
                Err(e) => {
                    conn.close(CloseCode::Protocol.into(), b"malformed response frame");
                    break RpcError::ConnectionLost {
                        cause: LossCause::Malformed(e),
                    };
                }
            },
            Ok(None) => {
                break RpcError::ConnectionLost {
                    cause: LossCause::StreamEnded,
                };
            }
            Err(FrameError::Io(io)) => {
                // The stream failed because the connection did: report the
                // connection's reason (a refusal reads better than "reset").
                break match conn.close_reason() {
                    Some(reason) => classify(&reason),
                    None => classify_frame(FrameError::Io(io)),
                };
            }
            Err(e) => {
                conn.close(CloseCode::Protocol.into(), e.to_string().as_bytes());
                break classify_frame(e);
            }
        }
    };
    debug!(error = %err, "rpc connection ended");
    calls.fail_all(err);
}

/// Server settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RpcServerConfig {
    /// Largest request accepted and response sent.
    pub max_frame: usize,
    /// Handlers running at once per connection.
    pub max_concurrent: usize,
}

impl Default for RpcServerConfig {
    fn default() -> Self {
        RpcServerConfig {
            max_frame: DEFAULT_MAX_FRAME,
            max_concurrent: 1024,
        }
    }
}

/// Serves requests of type `Req` with `handler`, answering `Resp`; install
/// it with [`Endpoint::serve_clients`](crate::endpoint::Endpoint::serve_clients).
pub struct RpcServer<Req, Resp, F> {
    handler: Arc<F>,
    config: RpcServerConfig,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp, F> RpcServer<Req, Resp, F> {
    /// A server with default settings.
    pub fn new(handler: F) -> Self {
        RpcServer::with_config(handler, RpcServerConfig::default())
    }

    /// A server with explicit settings.
    pub fn with_config(handler: F, config: RpcServerConfig) -> Self {
        RpcServer {
            handler: Arc::new(handler),
            config,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp, F, Fut> ClientHandler for RpcServer<Req, Resp, F>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Identity, Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    fn handle(&self, identity: Identity, connection: quinn::Connection) {
        tokio::spawn(serve_connection(
            identity,
            connection,
            self.handler.clone(),
            self.config,
        ));
    }
}

async fn serve_connection<Req, Resp, F, Fut>(
    identity: Identity,
    conn: quinn::Connection,
    handler: Arc<F>,
    config: RpcServerConfig,
) where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Identity, Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let remote = conn.remote_address();
    let (mut send, mut recv) = match conn.accept_bi().await {
        Ok(streams) => streams,
        Err(e) => {
            debug!(%remote, %identity, error = %e, "client left before its first request");
            return;
        }
    };
    let max_concurrent = config.max_concurrent.max(1);
    let (tx, mut rx) = mpsc::channel::<Bytes>(max_concurrent);
    let writer = tokio::spawn(async move {
        let result = write_frames(&mut send, &mut rx).await;
        if result.is_ok() {
            let _ = send.finish();
        }
        result
    });
    let permits = Arc::new(Semaphore::new(max_concurrent));
    // Dropping the set aborts the handlers: when the connection is closed
    // for a protocol error, nothing is answered any more.
    let mut handlers = JoinSet::new();
    let outcome: Result<(), String> = loop {
        while handlers.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break Ok(());
        };
        let bytes = match frame::read_frame(&mut recv, config.max_frame).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => break Ok(()),
            // The connection itself ended; nobody to tell.
            Err(FrameError::Io(e)) => {
                debug!(%remote, %identity, error = %e, "client connection ended");
                return;
            }
            Err(e) => break Err(format!("malformed request frame: {e}")),
        };
        let (id, request) = match decode_exact::<(u64, Req)>(&bytes) {
            Ok(decoded) => decoded,
            Err(e) => break Err(format!("malformed request: {e}")),
        };
        let handler = handler.clone();
        let identity = identity.clone();
        let tx = tx.clone();
        let conn = conn.clone();
        let max_frame = config.max_frame;
        handlers.spawn(async move {
            let response = handler(identity, request).await;
            match encode_frame(id, &response, max_frame) {
                Ok(frame) => {
                    let _ = tx.send(frame).await;
                }
                Err(e) => {
                    // The response type cannot say "too large"; closing
                    // tells the client clearly instead of letting it time out.
                    warn!(%remote, request = id, error = %e, "response not sendable; closing connection");
                    conn.close(CloseCode::Protocol.into(), e.to_string().as_bytes());
                }
            }
            drop(permit);
        });
    };
    match outcome {
        Ok(()) => {
            // The client finished its side: answer what is in flight, then
            // finish ours.
            while handlers.join_next().await.is_some() {}
            drop(tx);
            let _ = writer.await;
        }
        Err(reason) => {
            warn!(%remote, %identity, %reason, "closing client connection");
            conn.close(CloseCode::Protocol.into(), reason.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_id_then_body() {
        let frame = encode_frame(300, &"hi".to_string(), 100).unwrap();
        let payload = frame.slice(frame::HEADER_LEN..);
        let (id, body) = split_id(&payload).unwrap();
        assert_eq!(id, 300);
        assert_eq!(decode_exact::<String>(&body).unwrap(), "hi");
        // The whole payload is also postcard's encoding of the tuple.
        assert_eq!(
            decode_exact::<(u64, String)>(&payload).unwrap(),
            (300, "hi".to_string())
        );
        assert!(matches!(
            encode_frame(1, &vec![0u8; 100], 100),
            Err(RpcError::FrameTooLarge { max: 100, .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        assert!(matches!(
            decode_exact::<u8>(&[1, 2]),
            Err(DecodeError::TrailingBytes { extra: 1 })
        ));
        assert!(split_id(&Bytes::from_static(&[0xff; 11])).is_err());
    }

    #[test]
    fn refusals_are_told_apart_from_losses() {
        let refused = quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: CloseCode::Refused.into(),
            reason: Bytes::from_static(b"no"),
        });
        assert!(matches!(classify(&refused), RpcError::Refused { reason } if reason == "no"));
        let tls = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(42),
            frame_type: None,
            reason: Bytes::new(),
        });
        assert!(matches!(classify(&tls), RpcError::Refused { .. }));
        assert!(matches!(
            classify(&quinn::ConnectionError::TimedOut),
            RpcError::ConnectionLost { .. }
        ));
    }
}
