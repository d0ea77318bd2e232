//! The outbound federation client against a fake TLS peer that counts the connections it
//! accepts: sequential requests reuse one connection; a request dropped mid-way, a
//! `Connection: close` answer and a connection the peer closed while idle never lead to a
//! half-used connection being reused.

mod common;

use std::{
    sync::{
        atomic::{AtomicU8, AtomicUsize, Ordering::SeqCst},
        Arc,
    },
    time::Duration,
};

use common::TestServer;
use ruma::{api::federation::discovery::get_server_version, OwnedServerName};

const KEEP_ALIVE: u8 = 0;
/// Answers after 10 s.
const SLOW: u8 = 1;
/// Answers with `Connection: close`.
const CLOSE_HEADER: u8 = 2;
/// Answers one request per connection, then closes it without saying so.
const ONE_SHOT: u8 = 3;

struct Fake {
    name: OwnedServerName,
    accepted: Arc<AtomicUsize>,
    mode: Arc<AtomicU8>,
    _dir: tempfile::TempDir,
}

/// A TLS server on loopback answering `/_matrix/federation/v1/version`, on its own thread
/// (it lives as long as the test process).
fn fake() -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = common::fed::self_signed_cert(dir.path());
    let mut c = common::config_in(dir.path());
    (c.tls_cert, c.tls_key) = (Some(cert), Some(key));
    let acceptor = hearth::server::load_tls(&c).unwrap().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (accepted, mode) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicU8::new(0)));
    let (acc, m) = (accepted.clone(), mode.clone());
    std::thread::spawn(move || {
        let ex = Arc::new(async_executor::Executor::new());
        let ex2 = ex.clone();
        smol::block_on(ex.run(async move {
            let listener = smol::net::TcpListener::try_from(listener).unwrap();
            while let Ok((tcp, _)) = listener.accept().await {
                acc.fetch_add(1, SeqCst);
                let (acceptor, m) = (acceptor.clone(), m.clone());
                ex2.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let io = async_dup::Arc::new(async_dup::Mutex::new(tls));
                    let m2 = m.clone();
                    let endpoint = move |_req: http_types::Request| {
                        let mode = m2.load(SeqCst);
                        async move {
                            if mode == SLOW {
                                smol::Timer::after(Duration::from_secs(10)).await;
                            }
                            let mut res = http_types::Response::new(200);
                            res.set_body(r#"{"server":{"name":"fake","version":"1"}}"#);
                            res.insert_header("Content-Type", "application/json");
                            if mode == CLOSE_HEADER {
                                res.insert_header("Connection", "close");
                            }
                            Ok(res)
                        }
                    };
                    let mut server = async_h1::server::Server::new(io, endpoint);
                    loop {
                        let one_shot = m.load(SeqCst) == ONE_SHOT;
                        match server.accept_one().await {
                            Ok(async_h1::server::ConnectionStatus::KeepAlive) if !one_shot => {}
                            _ => break,
                        }
                    }
                })
                .detach();
            }
        }))
    });
    Fake {
        name: format!("127.0.0.1:{port}").try_into().unwrap(),
        accepted,
        mode,
        _dir: dir,
    }
}

fn version(s: &TestServer, f: &Fake) -> hearth::error::Result<String> {
    let client = &s.hs().app().fed.client;
    smol::block_on(client.send_unauthenticated(&f.name, get_server_version::v1::Request::new()))
        .map(|r| r.server.unwrap().name.unwrap())
}

#[test]
fn sequential_requests_reuse_one_connection_and_half_used_ones_are_never_reused() {
    let s = TestServer::start_with(|c| c.federation.verify_certificates = false);
    let f = fake();
    let client = &s.hs().app().fed.client;
    for _ in 0..5 {
        assert_eq!(version(&s, &f).unwrap(), "fake");
    }
    assert_eq!(f.accepted.load(SeqCst), 1, "five requests, one connection");
    assert_eq!(client.connections_opened(), 1);

    // Dropped while waiting for the answer: that connection is closed, not pooled; the next
    // request opens a new one and gets its own answer.
    f.mode.store(SLOW, SeqCst);
    let dropped = smol::block_on(futures_lite::future::or(
        async {
            let r = client
                .send_unauthenticated(&f.name, get_server_version::v1::Request::new())
                .await;
            Some(r.is_ok())
        },
        async {
            smol::Timer::after(Duration::from_millis(300)).await;
            None
        },
    ));
    assert_eq!(dropped, None, "the slow request was dropped");
    f.mode.store(KEEP_ALIVE, SeqCst);
    assert_eq!(version(&s, &f).unwrap(), "fake");
    assert_eq!(
        f.accepted.load(SeqCst),
        2,
        "the half-used connection was not reused"
    );
    assert_eq!(version(&s, &f).unwrap(), "fake");
    assert_eq!(f.accepted.load(SeqCst), 2, "the new one is reused");

    // `Connection: close`: not kept.
    f.mode.store(CLOSE_HEADER, SeqCst);
    version(&s, &f).unwrap(); // on the pooled connection, which the answer closes
    version(&s, &f).unwrap();
    assert_eq!(f.accepted.load(SeqCst), 3);

    // The peer closes connections after each answer without saying so: the request on the
    // pooled (dead) connection is retried on a fresh one, and succeeds.
    f.mode.store(ONE_SHOT, SeqCst);
    version(&s, &f).unwrap(); // fresh connection (the last one was closed), then closed
    std::thread::sleep(Duration::from_millis(100));
    version(&s, &f).unwrap(); // pooled one is dead: retried on a new one
    assert_eq!(f.accepted.load(SeqCst), 5);
    assert_eq!(client.connections_opened(), 5);
}
