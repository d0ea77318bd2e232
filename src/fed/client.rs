//! The outbound federation client: HTTPS requests signed with X-Matrix by ruma, on our
//! executor (smol sockets, rustls, async-h1's client codec), bounded by one timeout each.
//!
//! Connections are kept per destination (host and port) for reuse: a few idle ones each,
//! dropped after [`IDLE_TIMEOUT`]. A connection goes back to the pool only after a complete
//! exchange (the whole body read, framed by `Content-Length` or chunked, no
//! `Connection: close`); while in use it belongs to the request's future alone, so dropping
//! that future (cancellation, timeout) closes it instead of returning a half-used connection.
//! A request that fails on a reused connection before any answer (the peer closed it while
//! idle) is retried once on a fresh one.
//!
//! Certificates are checked against the Web PKI roots unless `federation.verify_certificates`
//! is off (tests with self-signed peers only; Hearth warns at start).

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite};
use futures_rustls::{
    rustls::{
        self,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        pki_types::{CertificateDer, ServerName as TlsName, UnixTime},
        DigitallySignedStruct, SignatureScheme,
    },
    TlsConnector,
};
use ruma::api::federation::authentication::{ServerSignatures, XMatrixSigningInput};
use ruma::{
    api::{
        auth_scheme::NoAuthentication, path_builder::SinglePath, IncomingResponseExt,
        OutgoingRequest, OutgoingRequestExt,
    },
    ServerName,
};

use super::discovery::{self, Endpoint};
use crate::{
    error::{Error, Result},
    room::build::Local,
};

/// Largest response body accepted from a remote server, except where a caller sets its own
/// limit (a media download: the configured upload limit, see [`Client::send_limited`]).
const MAX_RESPONSE_BYTES: u64 = 32 * 1024 * 1024;

/// Idle connections kept per destination, and across all destinations.
const MAX_IDLE_PER_DEST: usize = 4;
const MAX_IDLE: usize = 512;

/// How long an idle connection is kept: below the 60 s after which Hearth (and common
/// servers) close idle keep-alive connections, so a pooled one is rarely already closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

type Tls = futures_rustls::client::TlsStream<smol::net::TcpStream>;

/// Idle connections to one destination with the time each was last used, oldest first.
type Idle = Vec<(Instant, Tls)>;

/// Idle connections by destination (`host`, `port`).
#[derive(Default)]
struct Pool(Mutex<HashMap<(String, u16), Idle>>);

impl Pool {
    /// The most recently used idle connection to `ep` that is not past its idle timeout.
    fn take(&self, ep: &Endpoint) -> Option<Tls> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (ep.host.clone(), ep.port);
        let idle = m.get_mut(&key)?;
        idle.retain(|(since, _)| since.elapsed() < IDLE_TIMEOUT);
        let conn = idle.pop().map(|(_, c)| c);
        if idle.is_empty() {
            m.remove(&key);
        }
        conn
    }

    fn put(&self, ep: &Endpoint, conn: Tls) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.values().map(Vec::len).sum::<usize>() >= MAX_IDLE {
            m.retain(|_, idle| {
                idle.retain(|(since, _)| since.elapsed() < IDLE_TIMEOUT);
                !idle.is_empty()
            });
            if m.values().map(Vec::len).sum::<usize>() >= MAX_IDLE {
                return;
            }
        }
        let idle = m.entry((ep.host.clone(), ep.port)).or_default();
        if idle.len() >= MAX_IDLE_PER_DEST {
            idle.remove(0);
        }
        idle.push((Instant::now(), conn));
    }
}

/// A connection lent to async-h1, which wants to own its stream (and hands a copy to the
/// response body): each poll locks it briefly (nothing is held across an await). When the
/// exchange is over and every copy is dropped, the connection can be taken back.
#[derive(Clone)]
struct Lent(Arc<Mutex<Tls>>);

impl Lent {
    fn poll<T>(&self, f: impl FnOnce(Pin<&mut Tls>) -> Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        let mut conn = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(Pin::new(&mut *conn))
    }

    /// The connection, if no copy is left.
    fn take_back(self) -> Option<Tls> {
        Arc::try_unwrap(self.0)
            .ok()
            .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
    }
}

impl AsyncRead for Lent {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.poll(|c| c.poll_read(cx, buf))
    }
}

impl AsyncWrite for Lent {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll(|c| c.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll(|c| c.poll_flush(cx))
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll(|c| c.poll_close(cx))
    }
}

pub struct Client {
    local: Arc<Local>,
    tls: TlsConnector,
    timeout: Duration,
    pool: Pool,
    /// Connections opened (TLS handshakes done), for metrics and tests.
    opened: std::sync::atomic::AtomicU64,
}

impl Client {
    pub fn new(local: Arc<Local>, verify_certificates: bool, timeout: Duration) -> Self {
        Self {
            local,
            tls: tls_connector(verify_certificates),
            timeout,
            pool: Pool::default(),
            opened: Default::default(),
        }
    }

    /// Sends a request that federation authenticates with X-Matrix.
    pub async fn send<R>(&self, dest: &ServerName, req: R) -> Result<R::IncomingResponse>
    where
        R: OutgoingRequest<Authentication = ServerSignatures, PathBuilder = SinglePath>,
    {
        let (dest, res) = self.send_http(dest, req, MAX_RESPONSE_BYTES).await?;
        parse::<R>(dest, res)
    }

    /// [`send`](Self::send) with its own limit on the answer's size: a media download may be
    /// as large as an upload may (Synapse's default `max_upload_size` is 50 MiB, above the
    /// 32 MiB that bounds every other answer). An answer over `max_bytes` is refused, never
    /// taken truncated.
    pub async fn send_limited<R>(
        &self,
        dest: &ServerName,
        req: R,
        max_bytes: u64,
    ) -> Result<R::IncomingResponse>
    where
        R: OutgoingRequest<Authentication = ServerSignatures, PathBuilder = SinglePath>,
    {
        let (dest, res) = self.send_http(dest, req, max_bytes).await?;
        parse::<R>(dest, res)
    }

    /// An unauthenticated `GET` of an `https` URL, for the `Location` a remote server may
    /// answer a media download with (the spec lets it redirect to where the file is). Only
    /// `https`: the same TLS (and certificate checks) as federation. Answers of any status
    /// are returned; the body is refused over `max_bytes`.
    pub async fn get_url(&self, url: &str, max_bytes: u64) -> Result<http::Response<Vec<u8>>> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| remote(format_args!("bad redirect location {url:?}: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(remote(format_args!(
                "redirect location {url:?} is not https"
            )));
        }
        let host = uri
            .host()
            .ok_or_else(|| remote(format_args!("redirect location {url:?} has no host")))?;
        let ep = Endpoint {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: uri.port_u16().unwrap_or(443),
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let req = http::Request::get(path)
            .body(Vec::new())
            .map_err(Error::internal)?;
        self.execute(&ep, req, max_bytes).await
    }

    /// [`send`](Self::send), telling a final refusal apart: `Ok(Err(e))` when the server
    /// answered with a status a retry would get again (400, 403, 413, 414, 422: the request
    /// itself is refused), `Err` for everything worth retrying (unreachable, a timeout, 401
    /// before it has our key, 404, 429, 5xx). The sender drops a refused transaction instead
    /// of blocking the destination's queue behind it, as Synapse does.
    pub async fn send_or_refused<R>(
        &self,
        dest: &ServerName,
        req: R,
    ) -> Result<std::result::Result<R::IncomingResponse, Error>>
    where
        R: OutgoingRequest<Authentication = ServerSignatures, PathBuilder = SinglePath>,
    {
        let (dest, res) = self.send_http(dest, req, MAX_RESPONSE_BYTES).await?;
        let refused = matches!(res.status().as_u16(), 400 | 403 | 413 | 414 | 422);
        match parse::<R>(dest, res) {
            Ok(r) => Ok(Ok(r)),
            Err(e) if refused => Ok(Err(e)),
            Err(e) => Err(e),
        }
    }

    async fn send_http<'d, R>(
        &self,
        dest: &'d ServerName,
        req: R,
        max_bytes: u64,
    ) -> Result<(&'d ServerName, http::Response<Vec<u8>>)>
    where
        R: OutgoingRequest<Authentication = ServerSignatures, PathBuilder = SinglePath>,
    {
        let ep = self.resolve(dest).await?;
        let input = XMatrixSigningInput::new(
            self.local.server_name.clone(),
            dest.to_owned(),
            &self.local.key.pair,
        );
        let http_req = req
            .try_into_http_request::<Vec<u8>>(&ep.base_url(), input, ())
            .map_err(|e| Error::internal(format_args!("building a federation request: {e}")))?;
        let res = self.execute(&ep, http_req, max_bytes).await?;
        Ok((dest, res))
    }

    /// Sends a request without authentication (key queries, `/version`).
    pub async fn send_unauthenticated<R>(
        &self,
        dest: &ServerName,
        req: R,
    ) -> Result<R::IncomingResponse>
    where
        R: OutgoingRequest<Authentication = NoAuthentication, PathBuilder = SinglePath>,
    {
        let ep = self.resolve(dest).await?;
        let http_req = req
            .try_into_http_request::<Vec<u8>>(&ep.base_url(), (), ())
            .map_err(|e| Error::internal(format_args!("building a federation request: {e}")))?;
        let res = self.execute(&ep, http_req, MAX_RESPONSE_BYTES).await?;
        parse::<R>(dest, res)
    }

    /// Where `dest` listens (see `discovery`): static rules, then `.well-known`, then 8448.
    async fn resolve(&self, dest: &ServerName) -> Result<Endpoint> {
        if let Some(ep) = discovery::resolve_static(dest) {
            return Ok(ep);
        }
        let fallback = discovery::default_endpoint(dest)
            .ok_or_else(|| Error::invalid_param(format!("bad server name {dest}")))?;
        let well_known = Endpoint {
            host: fallback.host.clone(),
            port: 443,
        };
        let req = http::Request::get(format!(
            "{}/.well-known/matrix/server",
            well_known.base_url()
        ))
        .body(Vec::new())
        .map_err(Error::internal)?;
        let delegated = match self.execute(&well_known, req, MAX_RESPONSE_BYTES).await {
            Ok(res) if res.status().is_success() => {
                serde_json::from_slice::<serde_json::Value>(res.body())
                    .ok()
                    .and_then(|v| v.get("m.server")?.as_str().map(str::to_owned))
                    .and_then(|s| discovery::resolve_delegated(&s))
            }
            _ => None,
        };
        Ok(delegated.unwrap_or(fallback))
    }

    /// How many connections this client has opened (each a TCP connect and TLS handshake).
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A new TLS connection to `ep`.
    async fn connect(&self, ep: &Endpoint) -> Result<Tls> {
        let tcp = smol::net::TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| remote(format_args!("connecting to {}:{}: {e}", ep.host, ep.port)))?;
        // A request goes out as several small writes (TLS records for the head and the
        // body): with Nagle's algorithm on, the body waits for the peer's delayed ACK of the
        // head (40 ms on Linux), which was most of a `/send_join`'s time on loopback.
        tcp.set_nodelay(true)
            .map_err(|e| remote(format_args!("TCP_NODELAY to {}:{}: {e}", ep.host, ep.port)))?;
        let name = TlsName::try_from(ep.host.clone())
            .map_err(|e| remote(format_args!("TLS name {}: {e}", ep.host)))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| remote(format_args!("TLS with {}:{}: {e}", ep.host, ep.port)))?;
        self.opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(tls)
    }

    /// One request, on an idle connection to `ep` if there is one, bounded by the client's
    /// timeout; an answer over `max_bytes` is an error.
    async fn execute(
        &self,
        ep: &Endpoint,
        req: http::Request<Vec<u8>>,
        max_bytes: u64,
    ) -> Result<http::Response<Vec<u8>>> {
        let exchange = async {
            let out = Outgoing::new(ep, req)?;
            if let Some(conn) = self.pool.take(ep) {
                match self.exchange(ep, conn, out.build(), max_bytes).await {
                    Err(Failure::BeforeAnswer(e)) => {
                        log::debug!(
                            "reused connection to {}:{} failed ({}); reconnecting",
                            ep.host,
                            ep.port,
                            e.message
                        );
                    }
                    other => return other.map_err(Failure::into_error),
                }
            }
            let conn = self.connect(ep).await?;
            self.exchange(ep, conn, out.build(), max_bytes)
                .await
                .map_err(Failure::into_error)
        };
        let timeout = async {
            smol::Timer::after(self.timeout).await;
            Err(remote(format_args!("{}:{} timed out", ep.host, ep.port)))
        };
        future::or(exchange, timeout).await
    }

    /// Sends `out` on `conn` and reads the whole answer (at most `max_bytes`: a longer one is
    /// an error, never a truncated body); the connection goes back to the pool when the
    /// exchange left it clean.
    async fn exchange(
        &self,
        ep: &Endpoint,
        conn: Tls,
        out: http_types::Request,
        max_bytes: u64,
    ) -> std::result::Result<http::Response<Vec<u8>>, Failure> {
        let lent = Lent(Arc::new(Mutex::new(conn)));
        let mut res = async_h1::connect(lent.clone(), out).await.map_err(|e| {
            Failure::BeforeAnswer(remote(format_args!("{}:{}: {e}", ep.host, ep.port)))
        })?;
        let mut bytes = Vec::new();
        // One byte past the limit tells "exactly at the limit" from "over it".
        res.take_body()
            .take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| Failure::After(remote(format_args!("reading from {}: {e}", ep.host))))?;
        if bytes.len() as u64 > max_bytes {
            return Err(Failure::After(Error::new(
                502,
                "M_TOO_LARGE",
                format!(
                    "Remote server: {} answered more than {max_bytes} bytes",
                    ep.host
                ),
            )));
        }
        let framed = res.header("Content-Length").is_some()
            || res
                .header("Transfer-Encoding")
                .is_some_and(|t| t.last().as_str().eq_ignore_ascii_case("chunked"));
        let close = res
            .header("Connection")
            .is_some_and(|c| c.iter().any(|v| v.as_str().eq_ignore_ascii_case("close")));
        let mut builder = http::Response::builder().status(u16::from(res.status()));
        for (name, values) in res.iter() {
            for v in values.iter() {
                // async-h1 fills in a missing `Date` as "date: ...\r\n" (not a valid
                // value); a header we cannot represent is dropped, not the response.
                if http::HeaderValue::from_str(v.as_str()).is_ok() {
                    builder = builder.header(name.as_str(), v.as_str());
                }
            }
        }
        drop(res); // its body held a copy of the connection
        if framed && !close {
            if let Some(conn) = lent.take_back() {
                self.pool.put(ep, conn);
            }
        }
        builder
            .body(bytes)
            .map_err(|e| Failure::After(Error::internal(e)))
    }
}

/// The TLS client side: Web PKI roots, or (tests with self-signed peers only) any certificate.
/// Also used for HTTPS push gateways.
pub fn tls_connector(verify_certificates: bool) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let config = if verify_certificates {
        let roots =
            rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth()
    };
    TlsConnector::from(Arc::new(config))
}

/// How an exchange failed: before any answer (a reused connection the peer had closed: safe
/// to retry on a fresh one), or after.
enum Failure {
    BeforeAnswer(Error),
    After(Error),
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::BeforeAnswer(e) | Failure::After(e) => e,
        }
    }
}

/// A request ready to be sent (again, on a fresh connection, if a reused one was closed).
struct Outgoing {
    method: http_types::Method,
    url: http_types::Url,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Outgoing {
    fn new(ep: &Endpoint, req: http::Request<Vec<u8>>) -> Result<Self> {
        let (parts, body) = req.into_parts();
        let url = http_types::Url::parse(&format!(
            "{}{}",
            ep.base_url(),
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        ))
        .map_err(Error::internal)?;
        let method = parts
            .method
            .as_str()
            .parse()
            .map_err(|_| Error::internal("HTTP method"))?;
        let headers = parts
            .headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        Ok(Self {
            method,
            url,
            headers,
            body,
        })
    }

    /// The request in async-h1's types.
    fn build(&self) -> http_types::Request {
        let mut out = http_types::Request::new(self.method, self.url.clone());
        for (name, value) in &self.headers {
            out.append_header(name.as_str(), value.as_str());
        }
        out.set_body(self.body.clone());
        out
    }
}

/// A failure to reach a remote server, as a client of ours sees it.
fn remote(msg: impl std::fmt::Display) -> Error {
    Error::new(502, "M_UNKNOWN", format!("Remote server: {msg}"))
}

/// A remote answer: the typed response, or the remote Matrix error kept (404 stays 404).
fn parse<R: OutgoingRequest>(
    dest: &ServerName,
    res: http::Response<Vec<u8>>,
) -> Result<R::IncomingResponse> {
    let status = res.status().as_u16();
    if status >= 400 {
        let v: serde_json::Value = serde_json::from_slice(res.body()).unwrap_or_default();
        let msg = format!(
            "{dest} answered {status}: {}",
            v.get("error").and_then(|e| e.as_str()).unwrap_or("")
        );
        return Err(match (status, v.get("errcode").and_then(|e| e.as_str())) {
            (404, _) | (_, Some("M_NOT_FOUND")) => Error::not_found(msg),
            (403, _) | (_, Some("M_FORBIDDEN")) => Error::forbidden(msg),
            _ => remote(msg),
        });
    }
    let (parts, body) = res.into_parts();
    R::IncomingResponse::try_from_http_response(http::Response::from_parts(parts, &body[..]))
        .map_err(|e| remote(format_args!("{dest}: unexpected response: {e}")))
}

/// `verify_certificates = false`: any certificate is accepted (signatures are still checked,
/// so the TLS session itself is sound; only the peer's identity is not). Tests only.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &TlsName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
