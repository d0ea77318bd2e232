//! Request cancellation, proven: every cancellable endpoint is dropped after its 1st, 2nd, ...
//! `Pending` (`cancel::drop_at_every_await`) with invariants checked after each drop; writes
//! dropped mid-way either happen once or not at all; and real sockets that disconnect
//! mid-long-poll are noticed and cleaned up.
mod common;
use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use common::*;
use hearth::{cancel::drop_at_every_await, App};
use serde_json::{json, Value};

/// An app on an executor that only the test drives, plus its route table.
struct Harness {
    ex: Arc<async_executor::Executor<'static>>,
    app: App,
    routes: tide::Server<App>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempfile::tempdir().unwrap();
        let ex = Arc::new(async_executor::Executor::new());
        let app = App::open(
            config_in(dir.path()),
            Arc::new(hearth::SystemClock),
            hearth::cancel::Spawner::new(ex.clone()),
        )
        .unwrap();
        let routes = hearth::http::routes(app.clone());
        Self {
            ex,
            app,
            routes,
            _dir: dir,
        }
    }

    fn request(
        &self,
        method: http_types::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> http_types::Request {
        let mut r = http_types::Request::new(
            method,
            http_types::Url::parse(&format!("http://hearth.test{path}")).unwrap(),
        );
        if let Some(t) = token {
            // A federation request carries its whole X-Matrix header instead of a token.
            match t.starts_with("X-Matrix ") {
                true => r.insert_header("Authorization", t),
                false => r.insert_header("Authorization", format!("Bearer {t}")),
            };
        }
        if let Some(b) = body {
            r.set_body(b.to_string());
            r.insert_header("Content-Type", "application/json");
        }
        r
    }

    /// Runs a request to completion, driving the executor.
    fn call(
        &self,
        method: http_types::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let req = self.request(method, path, token, body);
        let routes = self.routes.clone();
        let mut res: http_types::Response =
            smol::block_on(self.ex.run(async move { routes.respond(req).await })).unwrap();
        let text = smol::block_on(res.body_string()).unwrap();
        (
            res.status().into(),
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }

    fn register(&self, name: &str) -> String {
        let (s, v) = self.call(
            http_types::Method::Post,
            "/_matrix/client/v3/register",
            None,
            Some(
                &json!({ "username": name, "password": "p", "auth": { "type": "m.login.dummy" } }),
            ),
        );
        assert_eq!(s, 200, "{v}");
        v["access_token"].as_str().unwrap().to_owned()
    }

    fn settle(&self) {
        smol::block_on(self.ex.run(self.app.spawner.wait_idle()));
    }

    fn count(&self, sql: &'static str) -> i64 {
        smol::block_on(
            self.app
                .store
                .read(move |c| Ok(c.query_row(sql, [], |r| r.get::<_, i64>(0))?)),
        )
        .unwrap()
    }
}

/// Drops a GET at every await point; after each drop no task is left behind, nothing was
/// written, and the same request still answers 200 (a fresh one, with the same result shape).
fn check_cancellable_get(h: &Harness, path: &str, token: &str) -> usize {
    check_cancellable(h, http_types::Method::Get, path, token, None)
}

/// [`check_cancellable_get`] for any read, with a body.
fn check_cancellable(
    h: &Harness,
    method: http_types::Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> usize {
    check_cancellable_answer(h, method, path, token, body, 200)
}

/// [`check_cancellable`] for a read whose answer is `status`.
fn check_cancellable_answer(
    h: &Harness,
    method: http_types::Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
    status: u16,
) -> usize {
    let events_before = h.count("SELECT count(*) FROM events");
    let expected = h.call(method, path, Some(token), body);
    assert_eq!(expected.0, status, "{path}: {}", expected.1);
    let routes = h.routes.clone();
    let (pendings, res) = drop_at_every_await(
        &h.ex,
        || {
            let routes = routes.clone();
            let req = h.request(method, path, Some(token), body);
            async move { routes.respond::<_, http_types::Response>(req).await }
        },
        |n| {
            h.settle();
            assert_eq!(
                h.app.spawner.live_tasks(),
                0,
                "{path}: tasks left after drop {n}"
            );
            assert_eq!(
                h.count("SELECT count(*) FROM events"),
                events_before,
                "{path}: a read wrote something"
            );
            let again = h.call(method, path, Some(token), body);
            assert_eq!(
                again.0, status,
                "{path}: server still answers after drop {n}"
            );
        },
    );
    assert_eq!(res.unwrap().status(), status);
    eprintln!("{path}: dropped at each of {pendings} await points");
    pendings
}

/// A room created with `create` and one message in it: (room ID, event ID), both
/// percent-encoded for paths.
fn room_with_message(h: &Harness, token: &str, create: Value) -> (String, String) {
    let (_, v) = h.call(
        http_types::Method::Post,
        "/_matrix/client/v3/createRoom",
        Some(token),
        Some(&create),
    );
    let room = enc(v["room_id"].as_str().unwrap());
    let (_, v) = h.call(
        http_types::Method::Put,
        &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/1"),
        Some(token),
        Some(&json!({ "body": "x" })),
    );
    (room, enc(v["event_id"].as_str().unwrap()))
}

#[test]
fn every_cancellable_endpoint_survives_a_drop_at_every_await() {
    let h = Harness::new();
    let a = h.register("alice");
    let (room, ev) = room_with_message(
        &h,
        &a,
        json!({ "name": "c", "preset": "public_chat", "visibility": "public" }),
    );
    // bob in the room: reading his presence asks the database whether they share one.
    let b = h.register("bob");
    h.call(
        http_types::Method::Post,
        &format!("/_matrix/client/v3/join/{room}"),
        Some(&b),
        Some(&json!({})),
    );
    let (_, v) = h.call(
        http_types::Method::Get,
        "/_matrix/client/v3/sync",
        Some(&a),
        None,
    );
    let since = v["next_batch"].as_str().unwrap().to_owned();
    let paths = [
        "/_matrix/client/v3/sync".to_owned(),
        format!("/_matrix/client/v3/sync?since={since}&timeout=30"),
        format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"),
        format!("/_matrix/client/v3/rooms/{room}/members"),
        format!("/_matrix/client/v3/rooms/{room}/joined_members"),
        format!("/_matrix/client/v3/rooms/{room}/state"),
        format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"),
        format!("/_matrix/client/v3/rooms/{room}/context/{ev}"),
        format!("/_matrix/client/v3/rooms/{room}/event/{ev}"),
        "/_matrix/client/v3/publicRooms".to_owned(),
        "/_matrix/client/v3/account/whoami".to_owned(),
        "/_matrix/client/v3/capabilities".to_owned(),
        "/_matrix/client/v3/devices".to_owned(),
        "/_matrix/client/v3/joined_rooms".to_owned(),
        format!("/_matrix/client/v3/rooms/{room}/aliases"),
        format!("/_matrix/client/v3/directory/list/room/{room}"),
        format!("/_matrix/client/v3/profile/{}", enc("@alice:hearth.test")),
        format!(
            "/_matrix/client/v3/user/{}/account_data/m.push_rules",
            enc("@alice:hearth.test")
        ),
        "/_matrix/client/v3/pushrules/".to_owned(),
        format!("/_matrix/client/v1/room_summary/{room}"),
        format!(
            "/_matrix/client/v3/presence/{}/status",
            enc("@bob:hearth.test")
        ),
        "/_matrix/client/v3/login".to_owned(),
        "/_matrix/client/versions".to_owned(),
        "/_hearth/metrics".to_owned(),
    ];
    // How many awaits a read has depends on timing (a blocking-pool read may already be done
    // when first polled); a long-poll always parks at least once.
    let mut counts = Vec::new();
    for p in &paths {
        counts.push(check_cancellable_get(&h, p, &a));
    }
    assert!(counts[1] >= 1, "the long-poll parks: {counts:?}");
    // A room held elsewhere is asked of its `via` server over federation (here one refusing
    // connections, so the answer is 404 after the attempt).
    let remote = format!(
        "/_matrix/client/v1/room_summary/{}?via=127.0.0.1:1",
        enc("!elsewhere:127.0.0.1:1")
    );
    let n = check_cancellable_answer(&h, http_types::Method::Get, &remote, &a, None, 404);
    assert!(n >= 1, "the federation request is awaited");
}

/// The X-Matrix header of `origin.test` (whose key the harness is told) for one request.
fn x_matrix(
    pair: &ruma::signatures::Ed25519KeyPair,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> String {
    let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .body(body)
        .unwrap();
    ruma::api::federation::authentication::XMatrix::sign_http_request(
        &req,
        ruma::api::federation::authentication::XMatrixSigningInput::new(
            "origin.test".try_into().unwrap(),
            "hearth.test".try_into().unwrap(),
            pair,
        ),
    )
    .unwrap()
    .to_string()
}

#[test]
fn every_federation_read_survives_a_drop_at_every_await() {
    use ruma::signatures::Ed25519KeyPair;
    let h = Harness::new();
    let a = h.register("alice");
    let (room, ev) = room_with_message(
        &h,
        &a,
        json!({ "preset": "public_chat", "visibility": "public", "room_alias_name": "c",
                "initial_state": [{ "type": "m.room.history_visibility", "state_key": "",
                                    "content": { "history_visibility": "world_readable" } }] }),
    );
    // A room one knocks on (room version 10, join rule `knock`) for `/make_knock`.
    let (knock_room, _) = room_with_message(
        &h,
        &a,
        json!({ "room_version": "10",
                "initial_state": [{ "type": "m.room.join_rules", "state_key": "",
                                    "content": { "join_rule": "knock" } }] }),
    );
    // origin.test's key, known to the harness (no network here).
    let pair = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "k".into()).unwrap();
    let public =
        ruma::serde::Base64::<ruma::serde::base64::Standard, _>::new(pair.public_key().to_vec())
            .encode();
    smol::block_on(h.app.store.write(move |tx| {
        hearth::store::queries::upsert_server_key(
            tx,
            "origin.test",
            "ed25519:k",
            &public,
            i64::MAX,
            None,
        )
    }))
    .unwrap();
    let get = |path: String| (http_types::Method::Get, path, None);
    let post = |path: &str, body: Value| (http_types::Method::Post, path.to_owned(), Some(body));
    let reads = [
        get(format!("/_matrix/federation/v1/event/{ev}")),
        get(format!(
            "/_matrix/federation/v1/state_ids/{room}?event_id={ev}"
        )),
        get(format!("/_matrix/federation/v1/state/{room}?event_id={ev}")),
        get(format!("/_matrix/federation/v1/event_auth/{room}/{ev}")),
        get(format!(
            "/_matrix/federation/v1/backfill/{room}?v={ev}&limit=10"
        )),
        post(
            &format!("/_matrix/federation/v1/get_missing_events/{room}"),
            json!({ "earliest_events": [],
                    "latest_events": [percent_encoding::percent_decode_str(&ev).decode_utf8().unwrap()] }),
        ),
        get(format!(
            "/_matrix/federation/v1/make_join/{room}/{}?ver=10",
            enc("@bob:origin.test")
        )),
        get(format!(
            "/_matrix/federation/v1/make_knock/{knock_room}/{}?ver=10",
            enc("@bob:origin.test")
        )),
        get(format!(
            "/_matrix/federation/v1/query/profile?user_id={}",
            enc("@alice:hearth.test")
        )),
        get(format!(
            "/_matrix/federation/v1/query/directory?room_alias={}",
            enc("#c:hearth.test")
        )),
        get("/_matrix/federation/v1/publicRooms".to_owned()),
        get(format!("/_matrix/federation/v1/hierarchy/{room}")),
        post(
            "/_matrix/federation/v1/publicRooms",
            json!({ "filter": {} }),
        ),
        get("/_matrix/key/v2/server".to_owned()),
        get("/_matrix/key/v2/query/hearth.test".to_owned()),
        post(
            "/_matrix/key/v2/query",
            json!({ "server_keys": { "hearth.test": {} } }),
        ),
        get("/_matrix/federation/v1/version".to_owned()),
        get(format!(
            "/_matrix/federation/v1/user/devices/{}",
            enc("@alice:hearth.test")
        )),
        post(
            "/_matrix/federation/v1/user/keys/query",
            json!({ "device_keys": { "@alice:hearth.test": [] } }),
        ),
    ];
    for (method, path, body) in &reads {
        let auth = x_matrix(&pair, method.as_ref(), path, body.as_ref());
        check_cancellable(&h, *method, path, &auth, body.as_ref());
    }
}

#[test]
fn a_dropped_send_happens_once_or_not_at_all() {
    let h = Harness::new();
    let a = h.register("alice");
    let (_, v) = h.call(
        http_types::Method::Post,
        "/_matrix/client/v3/createRoom",
        Some(&a),
        Some(&json!({})),
    );
    let room = enc(v["room_id"].as_str().unwrap());
    let routes = h.routes.clone();
    let mut txn = 0;
    let base_events = h.count("SELECT count(*) FROM events");
    let _ = drop_at_every_await(
        &h.ex,
        || {
            txn += 1;
            let routes = routes.clone();
            let req = h.request(
                http_types::Method::Put,
                &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t{txn}"),
                Some(&a),
                Some(&json!({ "body": txn })),
            );
            async move { routes.respond::<_, http_types::Response>(req).await }
        },
        |_| {},
    );
    // Retry every transaction: each yields exactly one event, never two.
    let mut ids = std::collections::HashSet::new();
    for t in 1..=txn {
        let (s, v) = h.call(
            http_types::Method::Put,
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t{t}"),
            Some(&a),
            Some(&json!({ "body": t })),
        );
        assert_eq!(s, 200);
        assert!(ids.insert(v["event_id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(
        h.count("SELECT count(*) FROM events") - base_events,
        txn as i64,
        "one event per transaction"
    );
    assert_eq!(h.count("SELECT count(*) FROM txn_ids"), txn as i64);
    assert_eq!(
        h.count("SELECT count(*) FROM forward_extremities"),
        1,
        "no half-written room graph"
    );
}

/// Opens a raw HTTP/1.1 long-poll and returns the socket without reading the answer.
fn open_long_poll(addr: std::net::SocketAddr, token: &str, since: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET /_matrix/client/v3/sync?since={since}&timeout=30000 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n").unwrap();
    s
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

#[test]
fn disconnected_long_polls_are_cancelled_and_leave_nothing() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let since = s.sync(&a, "")["next_batch"].as_str().unwrap().to_owned();
    let app = s.hs().app().clone();
    let addr = s.hs().addrs()[0];
    let baseline_tasks = app.spawner.live_tasks();
    const N: u64 = 200;
    let socks: Vec<TcpStream> = (0..N).map(|_| open_long_poll(addr, &a, &since)).collect();
    wait_until(Duration::from_secs(20), || {
        app.metrics.in_flight.load(Ordering::SeqCst) == N
    })
    .expect("all long-polls in flight");
    drop(socks);
    let took = wait_until(Duration::from_secs(5), || {
        app.metrics.in_flight.load(Ordering::SeqCst) == 0
    })
    .expect("in-flight back to zero");
    eprintln!("{N} disconnected long-polls cancelled in {took:?}");
    assert!(took < Duration::from_millis(500), "took {took:?}");
    assert_eq!(app.metrics.cancelled_total.load(Ordering::SeqCst), N);
    wait_until(Duration::from_secs(5), || {
        app.spawner.live_tasks() <= baseline_tasks
    })
    .expect("connection tasks end");
    let text = ureq::get(&format!("{}/_hearth/metrics", s.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        text.contains(&format!("hearth_http_requests_cancelled_total {N}")),
        "{text}"
    );
    // The server still answers, and a connected long-poll is still woken normally.
    let room = s.create_room(&a, json!({}));
    let mut sock = open_long_poll(addr, &a, &since);
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.send(&a, &room, "w", "wake");
    let mut buf = vec![0u8; 65536];
    let n = sock.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[test]
fn a_send_whose_client_vanishes_still_commits_once() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let room = s.create_room(&a, json!({}));
    let addr = s.hs().addrs()[0];
    let body = json!({ "msgtype": "m.text", "body": "fire and forget" }).to_string();
    {
        let mut sock = TcpStream::connect(addr).unwrap();
        write!(sock, "PUT /_matrix/client/v3/rooms/{}/send/m.room.message/gone HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {a}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", enc(&room), body.len()).unwrap();
    } // closed before any answer
    std::thread::sleep(Duration::from_millis(300));
    let id = s.send(&a, &room, "gone", "fire and forget");
    let id2 = s.send(&a, &room, "gone", "fire and forget");
    assert_eq!(id, id2);
    let page = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
            enc(&room)
        ),
        Some(&a),
        None,
    );
    let n = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["content"]["body"] == "fire and forget")
        .count();
    assert_eq!(n, 1);
}

#[test]
fn shutdown_cancels_long_polls_promptly() {
    let mut s = TestServer::start();
    let (_, a) = s.register("alice");
    let since = s.sync(&a, "")["next_batch"].as_str().unwrap().to_owned();
    let addr = s.hs().addrs()[0];
    let app = s.hs().app().clone();
    let _sock = open_long_poll(addr, &a, &since);
    wait_until(Duration::from_secs(10), || {
        app.metrics.in_flight.load(Ordering::SeqCst) == 1
    })
    .expect("in flight");
    let t = Instant::now();
    s.hs.take().unwrap().stop().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "stop took {:?}",
        t.elapsed()
    );
}
