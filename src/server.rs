//! The accept loop: our own, on our executor (tide's `listen` would spawn onto async-std's
//! global executor). Each connection runs async-h1 over a smol socket (optionally TLS) and
//! hands requests to tide's `Server::respond`.
//!
//! Disconnect detection (async-h1 awaits a handler to completion even when the client has
//! gone, http-rs/async-h1#123): every request carries a [`ConnWatch`] in its extensions.
//! Routes marked cancellable race their handler against `ConnWatch::closed`, which peeks at
//! the raw TCP socket: EOF or reset while the handler runs means the client left, and the
//! handler future is dropped at its current `.await` (logged as status 499).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures_lite::FutureExt;
use futures_rustls::TlsAcceptor;
use http_types::{Method, Response, StatusCode};
use smol::net::{TcpListener, TcpStream};

use crate::{config::Config, ephemeral::GaugeGuard, App};

/// How long shutdown waits for in-flight requests before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Watches a connection's read side while a handler runs.
#[derive(Clone)]
pub struct ConnWatch {
    stream: TcpStream,
    pub peer: SocketAddr,
}

impl ConnWatch {
    /// Resolves when the client has closed or reset the connection. If the client sent more
    /// bytes (a pipelined request, a TLS alert) we cannot tell, and this never resolves.
    pub async fn closed(&self) {
        let mut buf = [0u8; 1];
        match self.stream.peek(&mut buf).await {
            Ok(0) | Err(_) => {}
            Ok(_) => futures_lite::future::pending::<()>().await,
        }
    }
}

/// Pending connections the kernel queues before `accept`. std's default (128) drops SYNs when
/// hundreds of clients connect at once (each drop costs the client a 1 s retransmit).
const LISTEN_BACKLOG: i32 = 1024;

/// Binds a listening socket with our backlog (socket2: std cannot set it).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Loads the TLS certificate and key named in the config, if any.
pub fn load_tls(config: &Config) -> Result<Option<TlsAcceptor>, String> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let certs = rustls_pemfile::certs(&mut &read(cert)?[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut &read(key)?[..])
        .map_err(|e| format!("{}: {e}", key.display()))?
        .ok_or_else(|| format!("{}: no private key found", key.display()))?;
    let provider = Arc::new(futures_rustls::rustls::crypto::ring::default_provider());
    let cfg = futures_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate: {e}"))?;
    Ok(Some(TlsAcceptor::from(Arc::new(cfg))))
}

/// Serves until the shutdown latch is set, then waits (bounded) for in-flight requests.
pub async fn run(app: App, listeners: Vec<std::net::TcpListener>, tls: Option<TlsAcceptor>) {
    let routes = crate::http::routes(app.clone());
    let typing = app
        .spawner
        .spawn("typing-expiry", crate::workers::typing_expiry(app.clone()));
    let sender = app.spawner.spawn(
        "federation-sender",
        crate::workers::federation::sender(app.clone()),
    );
    let sticky = app
        .spawner
        .spawn("sticky-expiry", crate::workers::sticky::expiry(app.clone()));
    let presence = app
        .spawner
        .spawn("presence", crate::workers::presence::worker(app.clone()));
    let resync = app.spawner.spawn(
        "partial-resync",
        crate::workers::resync::resync(app.clone()),
    );
    let push = [
        app.spawner.spawn(
            "push-evaluator",
            crate::workers::push::evaluator(app.clone()),
        ),
        app.spawner
            .spawn("push-sender", crate::workers::push::sender(app.clone())),
        app.spawner.spawn(
            "push-prune",
            crate::workers::push_prune::pruner(app.clone()),
        ),
    ];
    let mut loops = Vec::new();
    for l in listeners {
        let listener = match TcpListener::try_from(l) {
            Ok(l) => l,
            Err(e) => {
                log::error!("listener: {e}");
                continue;
            }
        };
        let fut = accept_loop(app.clone(), listener, routes.clone(), tls.clone());
        loops.push(app.spawner.spawn("accept-loop", fut));
    }
    for l in loops {
        l.await;
    }
    typing.await;
    sender.await;
    sticky.await;
    presence.await;
    resync.await;
    for t in push {
        t.await;
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while app.metrics.connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        smol::Timer::after(Duration::from_millis(10)).await;
    }
    log::info!("server stopped");
}

async fn accept_loop(
    app: App,
    listener: TcpListener,
    routes: tide::Server<App>,
    tls: Option<TlsAcceptor>,
) {
    loop {
        let accepted = async { Some(listener.accept().await) }.or(async {
            app.shutdown.wait().await;
            None
        });
        let (stream, peer) = match accepted.await {
            None => return,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                log::warn!("accept: {e}");
                smol::Timer::after(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = serve_connection(app.clone(), stream, peer, routes.clone(), tls.clone());
        app.spawner.spawn_detached("connection", conn);
    }
}

async fn serve_connection(
    app: App,
    stream: TcpStream,
    peer: SocketAddr,
    routes: tide::Server<App>,
    tls: Option<TlsAcceptor>,
) {
    let _open = GaugeGuard::new(&app.metrics.connections);
    let busy = Arc::new(AtomicBool::new(false));
    let watch = ConnWatch {
        stream: stream.clone(),
        peer,
    };
    let serve = {
        let (app, busy) = (app.clone(), busy.clone());
        let endpoint_app = app.clone();
        async move {
            let endpoint = move |req| {
                handle(
                    endpoint_app.clone(),
                    routes.clone(),
                    watch.clone(),
                    busy.clone(),
                    req,
                )
            };
            let limits = HeadLimits::from(&app.config);
            let result = match tls {
                None => serve_http(stream, endpoint, limits, &app, peer).await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls_stream) => {
                        let io = async_dup::Arc::new(async_dup::Mutex::new(tls_stream));
                        serve_http(io, endpoint, limits, &app, peer).await
                    }
                    Err(e) => {
                        log::debug!("{peer}: TLS handshake failed: {e}");
                        return;
                    }
                },
            };
            if let Err(e) = result {
                log::debug!("{peer}: connection ended: {e}");
            }
        }
    };
    // At shutdown an idle keep-alive connection is dropped at once; one with a request in
    // flight gets the grace period to finish it.
    let stop = async {
        app.shutdown.wait().await;
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while busy.load(Ordering::SeqCst) && Instant::now() < deadline {
            smol::Timer::after(Duration::from_millis(5)).await;
        }
    };
    serve.or(stop).await;
}

// ---------------------------------------------------------------- request heads

/// async-h1 (2.3.4) drops the connection, without an answer, once a request head reaches
/// 8 KiB (`MAX_HEAD_LENGTH`, checked as "read so far < 8192") or has more than 128 headers.
/// Our limits must trigger first so the client gets a Matrix error instead.
pub const ASYNC_H1_MAX_HEAD: usize = 8191;
const ASYNC_H1_MAX_HEADERS: usize = 128;
/// How long to wait for a request head (async-h1's own default too).
const HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Limits on a request head, from the config.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    /// The request line (`GET /path?query HTTP/1.1`), without its line end.
    pub uri: usize,
    /// The whole head: request line, headers and the blank line.
    pub head: usize,
}

impl From<&Config> for HeadLimits {
    fn from(c: &Config) -> Self {
        Self {
            uri: c.max_uri_bytes,
            head: c.max_head_bytes.min(ASYNC_H1_MAX_HEAD),
        }
    }
}

/// The connection as async-h1 sees it: bytes we read ahead while checking a request head are
/// handed out first, then the socket. Clones share the buffer (async-h1 clones its IO).
#[derive(Clone)]
struct Prefixed<IO> {
    io: IO,
    ahead: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl<IO> Prefixed<IO> {
    fn take_ahead(&self) -> Vec<u8> {
        std::mem::take(&mut *self.ahead.lock().unwrap_or_else(|p| p.into_inner()))
    }
    fn put_ahead(&self, bytes: Vec<u8>) {
        *self.ahead.lock().unwrap_or_else(|p| p.into_inner()) = bytes;
    }
}

impl<IO: futures_lite::AsyncRead + Unpin> futures_lite::AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        {
            let mut ahead = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
            if !ahead.is_empty() {
                let n = buf.len().min(ahead.len());
                buf[..n].copy_from_slice(&ahead[..n]);
                ahead.drain(..n);
                return std::task::Poll::Ready(Ok(n));
            }
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: futures_lite::AsyncWrite + Unpin> futures_lite::AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_close(cx)
    }
}

/// What the bytes at the start of the next request say.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// A complete head within the limits (left in the read-ahead buffer for async-h1).
    Complete,
    /// The connection ended (or idled out) before a request.
    Closed,
    /// Over a limit (or not ASCII where it must be): answer with this status and close.
    TooLarge(u16, &'static str),
}

/// An incremental check of a request head against the limits: each byte is looked at once,
/// however the client splits its request (a client trickling one byte per packet must not
/// make the executor thread rescan the head on every byte).
#[derive(Default)]
struct HeadScan {
    /// Bytes already looked at.
    scanned: usize,
    /// Where the request line ends (its `\n`).
    line_end: Option<usize>,
    newlines: usize,
}

impl HeadScan {
    /// `bytes` is the start of a request, only growing between calls. `None`: need more.
    fn check(&mut self, bytes: &[u8], limits: HeadLimits) -> Option<Head> {
        let mut end = None;
        for i in self.scanned..bytes.len() {
            // Header values the HTTP library would panic on (it takes only ASCII): refused
            // with an answer, not a dropped connection and a panic.
            if bytes[i] >= 0x80 && self.line_end.is_some() {
                return Some(Head::TooLarge(400, "Header fields must be ASCII"));
            }
            if bytes[i] != b'\n' {
                continue;
            }
            self.newlines += 1;
            self.line_end.get_or_insert(i);
            if i >= 3 && &bytes[i - 3..=i] == b"\r\n\r\n" {
                end = Some(i + 1);
                break;
            }
        }
        self.scanned = end.unwrap_or(bytes.len());
        let line_len = match self.line_end {
            Some(e) => e - usize::from(e > 0 && bytes[e - 1] == b'\r'),
            None => bytes.len(),
        };
        if line_len > limits.uri {
            return Some(Head::TooLarge(414, "Request line (URI) too long"));
        }
        if self.scanned > limits.head {
            return Some(Head::TooLarge(431, "Request header fields too large"));
        }
        // Header lines: not the request line, not the blank line.
        if self.newlines.saturating_sub(2) > ASYNC_H1_MAX_HEADERS {
            return Some(Head::TooLarge(431, "Too many request header fields"));
        }
        end.map(|_| Head::Complete)
    }
}

/// Reads the next request head into the read-ahead buffer, enforcing the limits.
async fn read_head<IO: futures_lite::AsyncRead + Unpin>(
    io: &mut Prefixed<IO>,
    limits: HeadLimits,
) -> std::io::Result<Head> {
    use futures_lite::AsyncReadExt;
    let mut bytes = io.take_ahead();
    let mut chunk = [0u8; 4096];
    let mut scan = HeadScan::default();
    loop {
        if let Some(h) = scan.check(&bytes, limits) {
            io.put_ahead(bytes);
            return Ok(h);
        }
        let n = io.io.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
}

/// Serves HTTP/1.1 requests on one connection: each head is checked against our limits (a
/// Matrix error with 414/431 instead of async-h1's silent close), then async-h1 serves it.
async fn serve_http<IO, F, Fut>(
    io: IO,
    endpoint: F,
    limits: HeadLimits,
    app: &App,
    peer: SocketAddr,
) -> http_types::Result<()>
where
    IO: futures_lite::AsyncRead + futures_lite::AsyncWrite + Clone + Send + Sync + Unpin + 'static,
    F: Fn(http_types::Request) -> Fut,
    Fut: std::future::Future<Output = http_types::Result<Response>>,
{
    use async_h1::server::{ConnectionStatus, Server};
    let mut io = Prefixed {
        io,
        ahead: Arc::default(),
    };
    loop {
        let head = read_head(&mut io, limits)
            .or(async {
                smol::Timer::after(HEAD_TIMEOUT).await;
                Ok(Head::Closed)
            })
            .await?;
        match head {
            Head::Complete => {}
            Head::Closed => return Ok(()),
            Head::TooLarge(status, why) => {
                app.metrics.requests_total.fetch_add(1, Ordering::Relaxed);
                let id = REQUEST_IDS.fetch_add(1, Ordering::Relaxed);
                log::info!("req-{id} {} - - {status} ({why})", peer.ip());
                refuse(&mut io.io, status, why).await;
                return Ok(());
            }
        }
        let status = Server::new(io.clone(), &endpoint).accept_one().await?;
        if status == ConnectionStatus::Close {
            return Ok(());
        }
    }
}

/// Answers an oversized head with a Matrix error and closes. The rest of the request is read
/// and thrown away (bounded) first: closing a socket with unread input sends a reset, which
/// can destroy the answer before the client reads it.
async fn refuse<IO>(io: &mut IO, status: u16, why: &str)
where
    IO: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin,
{
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    let (reason, errcode) = match status {
        414 => ("URI Too Long", "M_TOO_LARGE"),
        431 => ("Request Header Fields Too Large", "M_TOO_LARGE"),
        _ => ("Bad Request", "M_UNKNOWN"),
    };
    let body = crate::error::Error::new(status, errcode, why)
        .to_json()
        .to_string();
    let answer = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\naccess-control-allow-origin: *\r\n\r\n{body}",
        body.len()
    );
    let written = async {
        io.write_all(answer.as_bytes()).await?;
        io.flush().await?;
        io.close().await
    };
    if written.await.is_err() {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while total < 1 << 20 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    drain
        .or(async {
            smol::Timer::after(Duration::from_secs(2)).await;
        })
        .await;
}

static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// One request: CORS, the in-flight gauge, tide, Matrix-shaped 404/405, the log line.
async fn handle(
    app: App,
    routes: tide::Server<App>,
    watch: ConnWatch,
    busy: Arc<AtomicBool>,
    mut req: http_types::Request,
) -> http_types::Result<Response> {
    let id = REQUEST_IDS.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let method = req.method();
    let path = req.url().path().to_owned();
    let peer = crate::proxy::client_ip(
        &app.config.trusted_proxies,
        watch.peer.ip(),
        req.header("X-Forwarded-For")
            .into_iter()
            .flat_map(|values| values.iter())
            .map(|v| v.as_str()),
    );
    app.metrics.requests_total.fetch_add(1, Ordering::Relaxed);
    let mut res = if method == Method::Options {
        Response::new(StatusCode::Ok)
    } else {
        busy.store(true, Ordering::SeqCst);
        let _in_flight = GaugeGuard::new(&app.metrics.in_flight);
        req.ext_mut().insert(watch);
        req.ext_mut().insert(ClientAddr(peer));
        req.ext_mut().insert(RequestId(id));
        let res: http_types::Result<Response> = routes.respond(req).await;
        busy.store(false, Ordering::SeqCst);
        let mut res = res.unwrap_or_else(|e| {
            log::error!("req-{id}: tide error: {e}");
            Response::new(StatusCode::InternalServerError)
        });
        // tide's router answers bare 404 (no route for the path) and 405 (the path exists for
        // other methods); both become M_UNRECOGNIZED with their status, as the spec asks.
        if res.content_type().is_none() {
            let e = match res.status() {
                StatusCode::NotFound => {
                    Some(crate::error::Error::unrecognized("Unrecognized request"))
                }
                StatusCode::MethodNotAllowed => Some(crate::error::Error::new(
                    405,
                    "M_UNRECOGNIZED",
                    format!("{method} is not supported on this path"),
                )),
                _ => None,
            };
            if let Some(e) = e {
                res = crate::http::error_response(&e).into();
            }
        }
        res
    };
    res.insert_header("Access-Control-Allow-Origin", "*");
    res.insert_header(
        "Access-Control-Allow-Methods",
        "GET, HEAD, POST, PUT, DELETE, OPTIONS",
    );
    res.insert_header(
        "Access-Control-Allow-Headers",
        "X-Requested-With, Content-Type, Authorization, Date",
    );
    let status: u16 = if res.ext().get::<Cancelled>().is_some() {
        499
    } else {
        res.status().into()
    };
    log::info!(
        "req-{id} {peer} {method} {path} {status} {:.1}ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
    Ok(res)
}

/// The request id used in log lines; background work started by a request gets its own.
#[derive(Clone, Copy, Debug)]
pub struct RequestId(pub u64);

/// The client's address (the TCP peer, or from `X-Forwarded-For` via a trusted proxy).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub std::net::IpAddr);

/// Marks the response of a request dropped because its client disconnected (logged as 499,
/// Synapse's convention; http-types has no 499, and nobody reads the body anyway).
#[derive(Clone, Copy, Debug)]
pub struct Cancelled;

#[cfg(test)]
mod tests {
    use std::{net::TcpStream, time::Duration};

    use super::{Head, HeadLimits, HeadScan};

    fn check_head(bytes: &[u8], limits: HeadLimits) -> Option<Head> {
        let whole = HeadScan::default().check(bytes, limits);
        // Fed one byte at a time, the scan reaches the same verdict.
        let mut scan = HeadScan::default();
        let trickled = (1..=bytes.len())
            .find_map(|n| scan.check(&bytes[..n], limits))
            .or_else(|| scan.check(bytes, limits));
        assert_eq!(whole, trickled, "{:?}", String::from_utf8_lossy(bytes));
        whole
    }

    #[test]
    fn head_limits() {
        let l = HeadLimits { uri: 30, head: 80 };
        assert_eq!(check_head(b"GET /a HTTP/1.1\r\nHost: x", l), None);
        assert_eq!(
            check_head(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nbody", l),
            Some(Head::Complete)
        );
        let long = format!("GET /{} HTTP/1.1", "a".repeat(40));
        assert!(matches!(
            check_head(long.as_bytes(), l),
            Some(Head::TooLarge(414, _))
        ));
        let many = format!("GET / HTTP/1.1\r\nA: {}\r\n", "b".repeat(80));
        assert!(matches!(
            check_head(many.as_bytes(), l),
            Some(Head::TooLarge(431, _))
        ));
        // A non-ASCII header value (which the HTTP library panics on) is refused.
        assert!(matches!(
            check_head("GET / HTTP/1.1\r\nX: café\r\n\r\n".as_bytes(), l),
            Some(Head::TooLarge(400, _))
        ));
        // Body bytes after the head do not count.
        let body = format!("GET / HTTP/1.1\r\n\r\n{}", "c".repeat(500));
        assert_eq!(check_head(body.as_bytes(), l), Some(Head::Complete));
        let lots = format!("GET / HTTP/1.1\r\n{}\r\n", "a:\r\n".repeat(129));
        let roomy = HeadLimits {
            uri: 30,
            head: 8000,
        };
        assert!(matches!(
            check_head(lots.as_bytes(), roomy),
            Some(Head::TooLarge(431, _))
        ));
    }

    #[test]
    fn backlog_queues_a_burst_of_connections_without_accepting() {
        // Nobody accepts: the kernel queue alone must hold 300 connections (std's 128 would
        // drop SYNs and the later connects would time out).
        let l = super::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let socks: Vec<TcpStream> = (0..300)
            .map(|i| {
                TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                    .unwrap_or_else(|e| panic!("connect {i}: {e}"))
            })
            .collect();
        assert_eq!(socks.len(), 300);
    }
}
