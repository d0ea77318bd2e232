//! A controllable front for a resident server in federation tests: it terminates TLS under
//! the resident's server name and forwards every request to the resident Hearth (listening on
//! its own port), except that a test can, per path prefix, HOLD requests until released or
//! FAIL them with a 502. A joiner's resync can so be kept waiting exactly as long as a test
//! needs, instead of racing a kill against it.
//!
//! Bounded: a held request is answered 504 after [`HOLD_LIMIT`] whatever the test does, and
//! every forwarded exchange has its own timeout, so no test hangs on the front.
#![allow(dead_code)]

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_lite::{AsyncReadExt, FutureExt};
use http_types::{Request, Response, StatusCode};

/// The longest a request is held: then it is answered 504.
pub const HOLD_LIMIT: Duration = Duration::from_secs(120);
/// The longest one forwarded exchange may take.
const FORWARD_LIMIT: Duration = Duration::from_secs(60);

/// What the front does with requests under a path prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Kept waiting until the rule goes (then forwarded), or [`HOLD_LIMIT`].
    Hold,
    /// Answered 502 at once, without reaching the resident.
    Fail,
}

#[derive(Default)]
struct State {
    upstream: Option<u16>,
    rules: Vec<(String, Rule)>,
    /// Every request's path, in arrival order.
    seen: Vec<String>,
    /// Paths of the requests held right now.
    held: Vec<String>,
}

struct Inner {
    state: Mutex<State>,
    /// Notified when a rule changes (held requests look again).
    changed: event_listener::Event,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rule_for(&self, path: &str) -> Option<Rule> {
        self.lock()
            .rules
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))
            .map(|(_, r)| *r)
    }
}

pub struct Front {
    pub port: u16,
    inner: Arc<Inner>,
    stop: Option<async_channel::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Front {
    /// Listens at once (so its address can be a server's name before that server starts);
    /// forwards once [`Front::forward_to`] names the resident's port (503 until then).
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = super::fed::self_signed_cert(dir.path());
        let config = hearth::Config {
            tls_cert: Some(cert),
            tls_key: Some(key),
            ..Default::default()
        };
        let acceptor = hearth::server::load_tls(&config).unwrap().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let inner = Arc::new(Inner {
            state: Mutex::default(),
            changed: event_listener::Event::new(),
        });
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let inner2 = inner.clone();
        std::thread::spawn(move || {
            smol::block_on(async move {
                let listener = smol::net::TcpListener::try_from(listener).unwrap();
                loop {
                    let accepted = async { Some(listener.accept().await) }.or(async {
                        let _ = stopped.recv().await;
                        None
                    });
                    let Some(Ok((stream, _))) = accepted.await else {
                        return;
                    };
                    let (acceptor, inner) = (acceptor.clone(), inner2.clone());
                    smol::spawn(async move {
                        let Ok(tls) = acceptor.accept(stream).await else {
                            return;
                        };
                        let io = async_dup::Arc::new(async_dup::Mutex::new(tls));
                        let _ = async_h1::accept(io, |req| serve(inner.clone(), req)).await;
                    })
                    .detach();
                }
            })
        });
        Self {
            port,
            inner,
            stop: Some(stop),
            _dir: dir,
        }
    }

    /// `127.0.0.1:PORT`: the name of the server behind it.
    pub fn server_name(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Forwards to the Hearth listening (TLS) on `port`.
    pub fn forward_to(&self, port: u16) {
        self.inner.lock().upstream = Some(port);
    }

    /// Requests whose path starts with `prefix` are held until [`Front::pass`].
    pub fn hold(&self, prefix: &str) {
        self.set(prefix, Some(Rule::Hold));
    }

    /// Requests whose path starts with `prefix` are answered 502.
    pub fn fail(&self, prefix: &str) {
        self.set(prefix, Some(Rule::Fail));
    }

    /// Requests under `prefix` pass again; the ones held are forwarded now.
    pub fn pass(&self, prefix: &str) {
        self.set(prefix, None);
    }

    fn set(&self, prefix: &str, rule: Option<Rule>) {
        {
            let mut s = self.inner.lock();
            s.rules.retain(|(p, _)| p != prefix);
            if let Some(r) = rule {
                s.rules.push((prefix.to_owned(), r));
            }
        }
        self.inner.changed.notify(usize::MAX);
    }

    /// How many requests under `prefix` arrived so far (held, failed or forwarded).
    pub fn seen(&self, prefix: &str) -> usize {
        let s = self.inner.lock();
        s.seen.iter().filter(|p| p.starts_with(prefix)).count()
    }

    /// How many requests under `prefix` are held right now.
    pub fn held(&self, prefix: &str) -> usize {
        let s = self.inner.lock();
        s.held.iter().filter(|p| p.starts_with(prefix)).count()
    }

    /// Waits (at most `secs`) until a request under `prefix` is held.
    pub fn wait_held(&self, prefix: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.held(prefix) == 0 {
            assert!(
                Instant::now() < deadline,
                "no request under {prefix} was held within {secs} s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.try_send(());
        }
        // Held requests let go (answered by the resident, or refused if it is gone).
        self.inner.lock().rules.clear();
        self.inner.changed.notify(usize::MAX);
    }
}

fn status(code: StatusCode, why: &str) -> http_types::Result<Response> {
    let mut res = Response::new(code);
    res.set_body(serde_json::json!({ "errcode": "M_UNKNOWN", "error": why }));
    Ok(res)
}

async fn serve(inner: Arc<Inner>, mut req: Request) -> http_types::Result<Response> {
    let path = req.url().path().to_owned();
    inner.lock().seen.push(path.clone());
    let deadline = Instant::now() + HOLD_LIMIT;
    loop {
        // Listen before looking, so a release between the two is not missed.
        let listener = inner.changed.listen();
        match inner.rule_for(&path) {
            None => break,
            Some(Rule::Fail) => return status(StatusCode::BadGateway, "failed by the test front"),
            Some(Rule::Hold) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return status(
                StatusCode::GatewayTimeout,
                "held too long by the test front",
            );
        }
        inner.lock().held.push(path.clone());
        let timer = async {
            smol::Timer::after(deadline - now).await;
        };
        listener.or(timer).await;
        let mut s = inner.lock();
        if let Some(i) = s.held.iter().position(|p| *p == path) {
            s.held.remove(i);
        }
    }
    let Some(port) = inner.lock().upstream else {
        return status(
            StatusCode::ServiceUnavailable,
            "no resident behind the front",
        );
    };
    let body = req.body_bytes().await?;
    req.set_body(body);
    let forward = async {
        let tcp = smol::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let name = futures_rustls::rustls::pki_types::ServerName::IpAddress(
            std::net::Ipv4Addr::LOCALHOST.into(),
        );
        let tls = hearth::fed::client::tls_connector(false)
            .connect(name, tcp)
            .await?;
        let io = async_dup::Arc::new(async_dup::Mutex::new(tls));
        let mut res = async_h1::connect(io, req).await?;
        let mut bytes = Vec::new();
        res.take_body().read_to_end(&mut bytes).await?;
        let mut out = Response::new(res.status());
        for (name, values) in res.iter() {
            let n = name.as_str().to_ascii_lowercase();
            if !matches!(
                n.as_str(),
                "content-length" | "transfer-encoding" | "connection"
            ) {
                for v in values.iter() {
                    out.append_header(name.clone(), v.clone());
                }
            }
        }
        out.set_body(bytes);
        http_types::Result::Ok(out)
    };
    let limit = async {
        smol::Timer::after(FORWARD_LIMIT).await;
        status(StatusCode::GatewayTimeout, "the resident did not answer")
    };
    match forward.or(limit).await {
        Ok(res) => Ok(res),
        Err(e) => status(StatusCode::BadGateway, &format!("forwarding: {e}")),
    }
}
