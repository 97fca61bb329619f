//! One QUIC endpoint (one UDP socket) per node, dispatching connections by
//! ALPN.
//!
//! ```text
//! Endpoint::bind(addr, tls) ──► accept loop ──► handshake (mTLS: CA-signed
//!                                               client cert required)
//!                                   │
//!        ALPN kythira-peer/1 ───────┼──► PeerNet   (Identity::Node only)
//!        ALPN kythira-client/1 ─────┴──► ClientHandler (any identity)
//! ```
//!
//! Usage: bind, then [`Endpoint::start_peers`] and/or
//! [`Endpoint::serve_clients`]. A connection for a service that is not
//! started is refused ([`CloseCode::Refused`]). So a node can serve both on
//! one port, or bind two endpoints — one with peers, one with clients — to
//! listen on separate peer and client ports; the peer network always dials
//! from the endpoint it was started on.
//!
//! Every connection is authenticated before dispatch: TLS has verified the
//! certificate chain against the cluster CA, and the identity URI has been
//! parsed from it. A handler receives the [`Identity`]; authorization (which
//! roles may do what, whether a node may act as a client) is the handler's.
//!
//! Dropping the `Endpoint` stops accepting; [`Endpoint::close`] also closes
//! every connection, and [`Endpoint::wait_idle`] waits until peers were told.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};

use quinn::VarInt;
use quinn::crypto::rustls::HandshakeData;
use rustls::pki_types::CertificateDer;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use kythira_raft::Message;

use crate::peer::{PeerConfig, PeerError, PeerNet, Refusal, Shared};
use crate::pki::{Identity, PkiError};
use crate::rpc::{RpcClient, RpcClientConfig, RpcError};
use crate::tls::{Alpn, Tls, TlsError};

/// Application close codes used on every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Normal end.
    Done = 0,
    /// The peer's identity or service was refused.
    Refused = 1,
    /// The peer sent something malformed or too large.
    Protocol = 2,
    /// A newer connection from the same peer took over.
    Replaced = 3,
    /// The local side is stopping.
    Shutdown = 4,
}

impl From<CloseCode> for VarInt {
    fn from(code: CloseCode) -> VarInt {
        VarInt::from_u32(code as u32)
    }
}

impl CloseCode {
    /// The code of a received close, if it is one of ours.
    pub fn from_varint(code: VarInt) -> Option<CloseCode> {
        [
            CloseCode::Done,
            CloseCode::Refused,
            CloseCode::Protocol,
            CloseCode::Replaced,
            CloseCode::Shutdown,
        ]
        .into_iter()
        .find(|c| VarInt::from(*c) == code)
    }
}

/// Errors of binding and configuring an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The TLS material cannot serve (e.g. a client certificate).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A client handler is already installed.
    #[error("clients are already served on this endpoint")]
    ClientsAlreadyServed,
}

/// Receives every authenticated connection on the client ALPN. It must not
/// block: spawn what takes time.
pub trait ClientHandler: Send + Sync + 'static {
    /// Takes over `connection`, whose certificate names `identity`.
    fn handle(&self, identity: Identity, connection: quinn::Connection);
}

impl<F> ClientHandler for F
where
    F: Fn(Identity, quinn::Connection) + Send + Sync + 'static,
{
    fn handle(&self, identity: Identity, connection: quinn::Connection) {
        self(identity, connection)
    }
}

/// Handshakes in progress at once; beyond, new connection attempts are
/// refused at once (the client retries) instead of piling up tasks.
pub const MAX_HANDSHAKES: usize = 256;

struct Router {
    peers: OnceLock<Weak<Shared>>,
    clients: OnceLock<Arc<dyn ClientHandler>>,
    handshakes: Arc<Semaphore>,
}

impl Default for Router {
    fn default() -> Self {
        Router {
            peers: OnceLock::new(),
            clients: OnceLock::new(),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
        }
    }
}

/// A node's QUIC endpoint.
pub struct Endpoint {
    quic: quinn::Endpoint,
    tls: Tls,
    router: Arc<Router>,
    accept_task: AbortHandle,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_addr", &self.quic.local_addr().ok())
            .field("identity", self.tls.identity())
            .finish()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl Endpoint {
    /// Binds `addr` (port 0 picks a free port) and starts accepting. Needs a
    /// node certificate and a tokio runtime.
    pub fn bind(addr: SocketAddr, tls: &Tls) -> Result<Endpoint, EndpointError> {
        let server_config = tls.server_config()?;
        let quic = quinn::Endpoint::server(server_config, addr)
            .map_err(|source| EndpointError::Bind { addr, source })?;
        let router = Arc::new(Router::default());
        let accept_task = tokio::spawn(accept_loop(quic.clone(), router.clone())).abort_handle();
        Ok(Endpoint {
            quic,
            tls: tls.clone(),
            router,
            accept_task,
        })
    }

    /// The bound address (with the port the OS chose).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.quic.local_addr()
    }

    /// Our identity.
    pub fn identity(&self) -> &Identity {
        self.tls.identity()
    }

    /// Starts the Raft peer network on this endpoint: dials peers with higher
    /// ids from this socket, accepts the others' connections here. Returns
    /// the handle and the channel of incoming messages.
    pub fn start_peers(
        &self,
        config: PeerConfig,
    ) -> Result<(PeerNet, mpsc::Receiver<Message>), PeerError> {
        if self.router.peers.get().is_some() {
            return Err(PeerError::AlreadyStarted);
        }
        let dial_config = self.tls.client_config(Alpn::Peer)?;
        let (net, inbound) =
            PeerNet::start(config, self.tls.identity(), self.quic.clone(), dial_config)?;
        self.router
            .peers
            .set(Arc::downgrade(net.shared()))
            .map_err(|_| PeerError::AlreadyStarted)?;
        Ok((net, inbound))
    }

    /// Hands every client connection to `handler`, e.g. an
    /// [`RpcServer`](crate::rpc::RpcServer).
    pub fn serve_clients(&self, handler: impl ClientHandler) -> Result<(), EndpointError> {
        self.router
            .clients
            .set(Arc::new(handler))
            .map_err(|_| EndpointError::ClientsAlreadyServed)
    }

    /// An RPC client to another node, from this endpoint's socket and with
    /// this node's certificate (for forwarding requests to the leader).
    pub async fn rpc_client(
        &self,
        addr: SocketAddr,
        config: RpcClientConfig,
    ) -> Result<RpcClient, RpcError> {
        RpcClient::connect_on(&self.quic, None, addr, &self.tls, config).await
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.accept_task.abort();
        self.quic
            .close(CloseCode::Shutdown.into(), b"endpoint shutting down");
    }

    /// Waits until closed connections have told their peers.
    pub async fn wait_idle(&self) {
        self.quic.wait_idle().await;
    }
}

/// The identity in a connection's peer certificate.
pub(crate) fn peer_identity(conn: &quinn::Connection) -> Result<Identity, PkiError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(PkiError::NoIdentity)?;
    let leaf = certs.first().ok_or(PkiError::NoIdentity)?;
    Identity::from_cert_der(leaf)
}

fn negotiated_alpn(conn: &quinn::Connection) -> Option<Alpn> {
    let data = conn.handshake_data()?.downcast::<HandshakeData>().ok()?;
    Alpn::from_bytes(data.protocol.as_deref()?)
}

async fn accept_loop(quic: quinn::Endpoint, router: Arc<Router>) {
    while let Some(incoming) = quic.accept().await {
        // Handshakes run concurrently so that one slow or hostile client
        // cannot hold up the others; each is bounded by the idle timeout,
        // and their number by MAX_HANDSHAKES.
        let Ok(permit) = router.handshakes.clone().try_acquire_owned() else {
            warn!(remote = %incoming.remote_address(), "too many handshakes in progress; refused");
            incoming.refuse();
            continue;
        };
        let router = router.clone();
        tokio::spawn(async move {
            dispatch(incoming, router).await;
            drop(permit);
        });
    }
}

async fn dispatch(incoming: quinn::Incoming, router: Arc<Router>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            // Includes clients without a certificate or with one from
            // another CA: rustls has refused them with a TLS alert.
            warn!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    let refuse = |reason: &str| {
        warn!(%remote, %reason, "connection refused");
        conn.close(CloseCode::Refused.into(), reason.as_bytes());
    };
    let Some(alpn) = negotiated_alpn(&conn) else {
        refuse("no known application protocol");
        return;
    };
    let identity = match peer_identity(&conn) {
        Ok(identity) => identity,
        Err(e) => {
            refuse(&format!("certificate has no valid identity: {e}"));
            return;
        }
    };
    debug!(%remote, %alpn, %identity, "connection authenticated");
    match alpn {
        Alpn::Peer => match router.peers.get().and_then(Weak::upgrade) {
            Some(peers) => match identity {
                Identity::Node(_) => peers.accept(&identity, conn),
                other => peers.refuse(&conn, &Refusal::NotANode(other)),
            },
            None => refuse("this endpoint does not serve peers"),
        },
        Alpn::Client => match router.clients.get() {
            Some(handler) => handler.handle(identity, conn),
            None => refuse("this endpoint does not serve clients"),
        },
    }
}
