//! The HTTP/JSON API: the client API for curl and any language, behind the
//! same mutual TLS as QUIC. Routes and their answers are documented with curl
//! examples in `docs/http.md`.
//!
//! Choices, each for a reason:
//! - **hyper over tokio-rustls, not a ready-made TLS server**: the caller's
//!   identity comes from the client certificate of its *connection*, so the
//!   accept loop reads it once after the handshake and hands it to every
//!   request of that connection as an extension.
//! - **One TLS policy for every port**: the rustls configuration is the one
//!   QUIC uses ([`Tls::rustls_server_config`]: ring, TLS 1.3 only, a client
//!   certificate signed by the cluster CA required), with HTTP's ALPN ids.
//!   curl with any current TLS library speaks 1.3.
//! - **JSON passes through as text**: commands, queries and answers are the
//!   plugin's JSON, which the node translates; the edge checks only that a
//!   body is well-formed JSON, so a typo is a 400 naming the line and column
//!   before anything reaches the node.
//! - **`NotLeader` is 421 Misdirected Request, not a redirect**: the node knows
//!   its peers' client (QUIC) addresses but not their HTTP ones, so a
//!   `Location` could not be right; the body names the leader's id and QUIC
//!   address for the caller to map to its HTTP endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, FromRequest, Path, Query, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use kythira_api::{
    ApiError, Consistency, DeployLimits, Payload, Request, Response as ApiResponse, SessionSeq,
};
use kythira_node::{Caller, NodeHandle};
use kythira_transport::pki::{Identity, Role};
use kythira_transport::tls::Tls;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// Largest JSON body (command or query) accepted.
pub const MAX_JSON_BODY: usize = 1 << 20;
/// Connections served at once; more wait in the kernel's accept queue, so a
/// flood of idle connections cannot exhaust file descriptors or memory.
const MAX_CONNECTIONS: usize = 1024;
/// A TLS handshake that takes longer is dropped: it holds a connection slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Likewise a client that is slow to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// A running HTTP API; stops serving when dropped.
pub struct HttpServer {
    /// The address it listens on (the configured one, with the port the OS
    /// chose if that was 0).
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves the API of `node` there, with `tls`'s certificate.
pub async fn start(addr: SocketAddr, tls: &Tls, node: NodeHandle) -> anyhow::Result<HttpServer> {
    let mut config = tls
        .rustls_server_config()
        .context("cannot configure TLS for the HTTP API")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
    let addr = listener.local_addr()?;
    let app = router(node);
    let task = tokio::spawn(accept_loop(listener, acceptor, app));
    Ok(HttpServer { addr, task })
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, app: Router) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: transient, and a
                // tight retry loop would only burn the CPU the node needs.
                tracing::warn!("http: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(why) = serve_connection(tcp, acceptor, app).await {
                tracing::debug!(%remote, "http: connection closed: {why:#}");
            }
        });
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    app: Router,
) -> anyhow::Result<()> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake failed")?;
    // The verifier has checked the chain against the CA; what is left is
    // reading who it names.
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .context("no client certificate")?;
    let peer = Peer(Identity::from_cert_der(leaf).context("client certificate")?);
    let service = tower::ServiceExt::map_request(
        app,
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            req
        },
    );
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The identity in the client certificate of the request's connection.
#[derive(Clone, Debug)]
struct Peer(Identity);

impl Peer {
    /// What the certificate allows. The roles map as on the QUIC client
    /// port; node certificates are refused here because nodes never use the
    /// HTTP API, and one presented to it is misused or stolen.
    fn caller(&self) -> Result<Caller, HttpError> {
        match &self.0 {
            Identity::Client {
                role: Role::Admin, ..
            } => Ok(Caller::Admin),
            Identity::Client {
                role: Role::Client, ..
            } => Ok(Caller::Client),
            Identity::Node(id) => Err(HttpError::new(
                StatusCode::FORBIDDEN,
                "unauthorized",
                format!(
                    "node {id}'s certificate cannot be used as a client; use a client certificate"
                ),
            )),
        }
    }
}

#[derive(Clone)]
struct AppState {
    node: NodeHandle,
}

fn router(node: NodeHandle) -> Router {
    let max_component = node.config().max_component_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/sessions", post(register_session))
        .route(
            "/v1/machines/{name}/apply",
            post(apply).layer(DefaultBodyLimit::max(MAX_JSON_BODY)),
        )
        .route(
            "/v1/machines/{name}/query",
            post(query).layer(DefaultBodyLimit::max(MAX_JSON_BODY)),
        )
        .route(
            "/v1/machines/{name}",
            axum::routing::put(deploy).layer(DefaultBodyLimit::max(max_component)),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AppState { node })
}

/// An error answer: `{"error": {"kind", "message", "leader"?, "leader_addr"?}}`.
#[derive(Debug)]
struct HttpError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    leader: Option<u64>,
    leader_addr: Option<String>,
}

impl HttpError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            leader: None,
            leader_addr: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        let message = e.to_string();
        let (status, kind) = match &e {
            ApiError::NotLeader { leader, addr } => {
                return Self {
                    status: StatusCode::MISDIRECTED_REQUEST,
                    kind: "not_leader",
                    message,
                    leader: *leader,
                    leader_addr: addr.clone(),
                };
            }
            // Maybe applied: the caller must not assume either outcome.
            ApiError::Outcome => (StatusCode::SERVICE_UNAVAILABLE, "outcome_unknown"),
            ApiError::UnknownMachine(_) => (StatusCode::NOT_FOUND, "unknown_machine"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            // The state machine understood the command and refused it: the
            // request was well-formed, its content was not acceptable.
            ApiError::Rejected(_) => (StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
            ApiError::Deploy(_) => (StatusCode::UNPROCESSABLE_ENTITY, "deploy_refused"),
            ApiError::UpgradeFailed { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "upgrade_failed"),
            // Traps, fuel and memory: a fault of deployed code, not of the request's form.
            ApiError::Plugin(_) => (StatusCode::INTERNAL_SERVER_ERROR, "plugin_failed"),
            ApiError::SessionExpired(_) => (StatusCode::GONE, "session_expired"),
            ApiError::Unauthorized(_) => (StatusCode::FORBIDDEN, "unauthorized"),
            ApiError::Membership(_) => (StatusCode::CONFLICT, "membership_refused"),
            ApiError::Transfer(_) => (StatusCode::CONFLICT, "transfer_failed"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, kind, message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut error = json!({"kind": self.kind, "message": self.message});
        if let Some(leader) = self.leader {
            error["leader"] = json!(leader);
        }
        if let Some(addr) = self.leader_addr {
            error["leader_addr"] = json!(addr);
        }
        json_response(self.status, json!({ "error": error }).to_string())
    }
}

/// axum's own refusals (body too large, bad query string, bad path) in the
/// API's error shape, keeping their status.
fn rejection(status: StatusCode, text: String) -> HttpError {
    let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "too_large"
    } else {
        "bad_request"
    };
    HttpError::new(status, kind, text)
}

impl From<BytesRejection> for HttpError {
    fn from(r: BytesRejection) -> Self {
        rejection(r.status(), r.body_text())
    }
}

impl From<QueryRejection> for HttpError {
    fn from(r: QueryRejection) -> Self {
        rejection(r.status(), r.body_text())
    }
}

impl From<PathRejection> for HttpError {
    fn from(r: PathRejection) -> Self {
        rejection(r.status(), r.body_text())
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The plugin's JSON answer, placed as it is into `{..., "output": ...}`.
fn output_json(output: Payload) -> Result<String, HttpError> {
    match output {
        Payload::Json(text) => Ok(text),
        // The request was JSON, so the node answers JSON; anything else is a fault.
        Payload::Bytes(_) => Err(HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the node answered a JSON request with binary output",
        )),
    }
}

/// Checks that `body` is one well-formed JSON value and returns it as text.
fn json_body(body: &Bytes, what: &str) -> Result<String, HttpError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| HttpError::bad_request(format!("the {what} is not UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(HttpError::bad_request(format!(
            "the request body must be the {what} as JSON; it is empty"
        )));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| HttpError::bad_request(format!("the {what} is not valid JSON: {e}")))?;
    Ok(text.to_owned())
}

async fn call(
    state: &AppState,
    caller: Caller,
    request: Request,
) -> Result<ApiResponse, HttpError> {
    Ok(state.node.call(caller, request).await?)
}

fn unexpected(resp: &ApiResponse) -> HttpError {
    HttpError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("unexpected answer from the node: {resp:?}"),
    )
}

/// 200 when the node knows a leader and its state machines keep up with
/// the log, 503 with the reason otherwise (`kythira_node::health`). Any
/// certificate of the cluster: load balancers and orchestrators ask it.
async fn health(State(state): State<AppState>) -> Response {
    let report = match state.node.health().await {
        Ok(report) => report,
        Err(e) => {
            let body = json!({"status": "unavailable", "reason": e.to_string()});
            return json_response(StatusCode::SERVICE_UNAVAILABLE, body.to_string());
        }
    };
    let mut body = json!({
        "status": "ok",
        "id": report.id,
        "role": report.role,
        "term": report.term,
        "leader": report.leader,
        "commit": report.commit,
        "applied": report.applied,
    });
    match report.problem {
        None => json_response(StatusCode::OK, body.to_string()),
        Some(reason) => {
            body["status"] = json!("unavailable");
            body["reason"] = json!(reason);
            json_response(StatusCode::SERVICE_UNAVAILABLE, body.to_string())
        }
    }
}

/// The node's metrics in the Prometheus text format, for a scraper with a
/// client certificate of the cluster (either role).
async fn metrics(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
) -> Result<Response, HttpError> {
    peer.caller()?;
    let text = state.node.metrics().encode();
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, kythira_node::metrics::CONTENT_TYPE)],
        text,
    )
        .into_response())
}

async fn status(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
) -> Result<Response, HttpError> {
    let caller = peer.caller()?;
    match call(&state, caller, Request::Status).await? {
        ApiResponse::Status(s) => {
            let body = serde_json::to_string(&s).map_err(|e| {
                HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?;
            Ok(json_response(StatusCode::OK, body))
        }
        other => Err(unexpected(&other)),
    }
}

async fn register_session(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
) -> Result<Response, HttpError> {
    let caller = peer.caller()?;
    match call(&state, caller, Request::RegisterSession).await? {
        ApiResponse::Session { id } => {
            Ok(json_response(StatusCode::OK, json!({"id": id}).to_string()))
        }
        other => Err(unexpected(&other)),
    }
}

/// `?session=ID&serial=N[&acked=M]`: apply within a session, exactly once.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyParams {
    session: Option<u64>,
    serial: Option<u64>,
    acked: Option<u64>,
}

impl ApplyParams {
    fn session(&self) -> Result<Option<SessionSeq>, HttpError> {
        match (self.session, self.serial) {
            (None, None) if self.acked.is_none() => Ok(None),
            (Some(id), Some(serial)) if serial >= 1 => Ok(Some(SessionSeq {
                id,
                serial,
                // One command at a time, as the client library sends them:
                // every earlier serial has been answered.
                acked: self.acked.unwrap_or(serial),
            })),
            (Some(_), Some(_)) => Err(HttpError::bad_request("serial numbers start at 1")),
            _ => Err(HttpError::bad_request(
                "a session command needs both `session` and `serial` (and `acked` only with them)",
            )),
        }
    }
}

async fn apply(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    name: Result<Path<String>, PathRejection>,
    params: Result<Query<ApplyParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let caller = peer.caller()?;
    let Path(machine) = name?;
    let Query(params) = params?;
    let session = params.session()?;
    let command = json_body(&body?, "command")?;
    let request = Request::Apply {
        machine,
        command: Payload::Json(command),
        session,
    };
    match call(&state, caller, request).await? {
        // Applied: whatever happened to the answer's translation, this is a
        // success, or a caller retrying a failure would apply it twice.
        ApiResponse::Applied {
            index,
            output: Payload::Json(output),
        } => Ok(json_response(
            StatusCode::OK,
            format!("{{\"index\":{index},\"output\":{output}}}"),
        )),
        ApiResponse::Applied {
            index,
            output: Payload::Bytes(bytes),
        } => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            Ok(json_response(
                StatusCode::OK,
                format!(
                    "{{\"index\":{index},\"output_hex\":\"{hex}\",\
                     \"output_error\":\"the answer could not be translated to JSON\"}}"
                ),
            ))
        }
        other => Err(unexpected(&other)),
    }
}

/// `?consistency=linearizable|stale`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryParams {
    consistency: Option<ConsistencyParam>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ConsistencyParam {
    Linearizable,
    Stale,
}

async fn query(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    name: Result<Path<String>, PathRejection>,
    params: Result<Query<QueryParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let caller = peer.caller()?;
    let Path(machine) = name?;
    let Query(params) = params?;
    let consistency = match params.consistency {
        Some(ConsistencyParam::Stale) => Consistency::Stale,
        Some(ConsistencyParam::Linearizable) | None => Consistency::Linearizable,
    };
    let query = json_body(&body?, "query")?;
    let request = Request::Query {
        machine,
        query: Payload::Json(query),
        consistency,
    };
    match call(&state, caller, request).await? {
        ApiResponse::Queried { output } => {
            let output = output_json(output)?;
            Ok(json_response(
                StatusCode::OK,
                format!("{{\"output\":{output}}}"),
            ))
        }
        other => Err(unexpected(&other)),
    }
}

/// `?apply_fuel=N&query_fuel=N&memory_mib=N&snapshot_fuel=N`, each optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployParams {
    apply_fuel: Option<u64>,
    query_fuel: Option<u64>,
    memory_mib: Option<u64>,
    snapshot_fuel: Option<u64>,
}

async fn deploy(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    name: Result<Path<String>, PathRejection>,
    params: Result<Query<DeployParams>, QueryRejection>,
    req: axum::extract::Request,
) -> Result<Response, HttpError> {
    let caller = peer.caller()?;
    // Refused before the body is read (it is extracted below, not as an
    // argument): a client certificate cannot make the node buffer a
    // component it will never deploy.
    if caller != Caller::Admin {
        return Err(
            ApiError::Unauthorized("deploying code needs an admin certificate".into()).into(),
        );
    }
    let Path(machine) = name?;
    let Query(params) = params?;
    let memory_bytes = match params.memory_mib {
        Some(mib) => Some(
            mib.checked_mul(1 << 20)
                .ok_or_else(|| HttpError::bad_request("memory_mib is too large"))?,
        ),
        None => None,
    };
    // Within the route's DefaultBodyLimit, like the `Bytes` extractor.
    let component = Bytes::from_request(req, &state).await?;
    if component.is_empty() {
        return Err(HttpError::bad_request(
            "the request body must be the component's bytes (curl --data-binary @kv.wasm)",
        ));
    }
    let request = Request::Deploy {
        machine,
        component,
        limits: DeployLimits {
            apply_fuel: params.apply_fuel,
            query_fuel: params.query_fuel,
            memory_bytes,
            snapshot_fuel: params.snapshot_fuel,
        },
    };
    match call(&state, caller, request).await? {
        ApiResponse::Deployed { index, sha256 } => Ok(json_response(
            StatusCode::OK,
            json!({"index": index, "sha256": sha256}).to_string(),
        )),
        other => Err(unexpected(&other)),
    }
}

async fn not_found(method: Method, uri: Uri) -> HttpError {
    HttpError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> HttpError {
    HttpError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not take {method}", uri.path()),
    )
}
