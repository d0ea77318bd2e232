//! The durable federation sender against a fake destination: a TLS listener on loopback that
//! records every `PUT /_matrix/federation/v1/send/{txnId}` and answers 200, 500 or nothing.

mod common;

use std::{
    net::TcpListener,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::TestServer;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use serde_json::{json, Value};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Answer 200 with an entry for every PDU (processed).
    Ok,
    /// Answer 200 with no entry for any PDU: taken, not processed (Synapse's answer for PDUs
    /// of a room it does not know yet, e.g. one it is still joining).
    Ignore,
    Fail,
    /// Read the request, never answer (until the test ends).
    Hang,
    /// Answer 400 `M_BAD_JSON`: a refusal that a retry would get again.
    Refuse,
    /// Refuse (400) a transaction carrying a message with this body; take the others.
    RefuseBody(&'static str),
}

/// One request the destination saw: the transaction ID, the status it answered (0: none) and
/// the body.
#[derive(Clone, Debug)]
struct Seen {
    txn: String,
    /// When it arrived (ms since the epoch).
    at_ms: u64,
    status: u16,
    body: Value,
}

struct FakeDest {
    name: String,
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    /// Its signing key (PKCS#8 DER), the same for every contact (Hearth caches keys).
    key: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl FakeDest {
    fn start(mode: Mode) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = common::fed::self_signed_cert(dir.path());
        let mut c = common::config_in(dir.path());
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
        let tls = hearth::server::load_tls(&c).unwrap().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(Mutex::new(mode));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s, st) = (mode.clone(), seen.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let (tls, m, s, st) = (tls.clone(), m.clone(), s.clone(), st.clone());
                std::thread::spawn(move || {
                    smol::block_on(serve(conn, tls, m, s, st));
                });
            }
        });
        Self {
            name: format!("127.0.0.1:{port}"),
            mode,
            seen,
            stop,
            key: ruma::signatures::Ed25519KeyPair::generate().to_vec(),
            _dir: dir,
        }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Message bodies of the PDUs in the transactions answered 200, in the order received.
    fn delivered(&self) -> Vec<String> {
        self.seen()
            .iter()
            .filter(|s| s.status == 200)
            .flat_map(|s| bodies(&s.body))
            .collect()
    }
}

impl Drop for FakeDest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Unblock the accept loop.
        let _ = std::net::TcpStream::connect(&self.name);
    }
}

fn bodies(txn: &Value) -> Vec<String> {
    txn["pdus"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["type"] == "m.room.message")
                .map(|p| p["content"]["body"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The event IDs of a transaction's PDUs (room version 10 rooms: the reference hash).
fn event_ids(txn: &Value) -> Vec<String> {
    let rules = ruma::RoomVersionId::V10.rules().unwrap();
    txn["pdus"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    let obj: ruma::CanonicalJsonObject = serde_json::from_value(p.clone()).ok()?;
                    let hash = ruma::signatures::reference_hash(&obj, &rules).ok()?;
                    Some(format!("${hash}"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A minimal HTTP/1.1 server side: one request per connection.
async fn serve(
    conn: std::net::TcpStream,
    tls: futures_rustls::TlsAcceptor,
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
) {
    let Ok(conn) = smol::Async::new(conn) else {
        return;
    };
    let Ok(mut s) = tls.accept(conn).await else {
        return;
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or("").to_owned();
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
    let path = request_line.split(' ').nth(1).unwrap_or("").to_owned();
    let Some(txn) = path.strip_prefix("/_matrix/federation/v1/send/") else {
        let _ = s
            .write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            )
            .await;
        return;
    };
    let mut m = *mode.lock().unwrap();
    if let Mode::RefuseBody(bad) = m {
        m = if bodies(&body).iter().any(|b| b == bad) {
            Mode::Refuse
        } else {
            Mode::Ok
        };
    }
    let processed = json!({ "pdus": event_ids(&body).into_iter().map(|id| (id, json!({}))).collect::<serde_json::Map<_, _>>() }).to_string();
    let (status, answer): (u16, &[u8]) = match m {
        Mode::Ok => (200, processed.as_bytes()),
        Mode::Ignore => (200, b"{\"pdus\":{}}"),
        Mode::Fail => (500, b"{\"errcode\":\"M_UNKNOWN\",\"error\":\"down\"}"),
        Mode::Hang => (0, b""),
        Mode::Refuse | Mode::RefuseBody(_) => {
            (400, b"{\"errcode\":\"M_BAD_JSON\",\"error\":\"no\"}")
        }
    };
    seen.lock().unwrap().push(Seen {
        txn: txn.to_owned(),
        at_ms: hearth::util::now_ms(),
        status,
        body,
    });
    if m == Mode::Hang {
        // Hold the connection open without answering.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            smol::Timer::after(Duration::from_millis(50)).await;
        }
        return;
    }
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(answer).await;
    let _ = s.flush().await;
    let _ = s.close().await;
}

fn start() -> TestServer {
    TestServer::start_with(|c| c.federation.verify_certificates = false)
}

/// Restarts Hearth on the same database (a new port).
fn restart(s: &mut TestServer) {
    if let Some(hs) = s.hs.take() {
        hs.stop().unwrap();
    }
    let mut c = common::config_in(s.dir.path());
    c.federation.verify_certificates = false;
    let hs = hearth::Homeserver::start(c).unwrap();
    s.base = format!("http://{}", hs.addrs()[0]);
    s.hs = Some(hs);
}

/// Alice's room, with a remote member on `dest` in its current state (as tests/federation.rs).
fn room_with(s: &TestServer, token: &str, dest: &str) -> String {
    let room = s.create_room(token, json!({ "preset": "public_chat" }));
    let app = s.hs().app().clone();
    let (r, u) = (room.clone(), format!("@bob:{dest}"));
    smol::block_on(app.store.write(move |tx| {
        tx.execute(
            "INSERT INTO current_state (room_id, type, state_key, event_id, membership, pos)
             VALUES (?1, 'm.room.member', ?2, '$fake' || ?2, 'join', 0)",
            [r.as_str(), u.as_str()],
        )?;
        Ok(())
    }))
    .unwrap();
    room
}

/// A message with `body`, sticky for ten minutes (MSC4354).
fn send_sticky(s: &TestServer, token: &str, room: &str, body: &str) {
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/st?org.matrix.msc4354.sticky_duration_ms=600000",
            common::enc(room)
        ),
        Some(token),
        Some(&json!({ "msgtype": "m.text", "body": body })),
    );
}

fn outbox_len(s: &TestServer) -> i64 {
    let app = s.hs().app().clone();
    smol::block_on(
        app.store
            .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?)),
    )
    .unwrap()
}

/// `(retry_at, backoff_ms, failures)` of `dest`.
fn dest_state(s: &TestServer, dest: &str) -> Option<(u64, u64, u64)> {
    let app = s.hs().app().clone();
    let d = dest.to_owned();
    smol::block_on(
        app.store
            .read(move |c| hearth::store::outbox::destination_state(c, &d)),
    )
    .unwrap()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes `fake` contact Hearth: a correctly signed federation request (its key is put where
/// Hearth keeps remote keys, so no key fetch is needed).
fn contact(s: &TestServer, fake: &FakeDest) {
    assert_ne!(
        contact_signed(s, fake, true),
        401,
        "the signed contact must be accepted"
    );
}

/// A federation request from `fake`, signed with the key Hearth has on file for it
/// (`genuine`) or with another one; returns the status.
fn contact_signed(s: &TestServer, fake: &FakeDest, genuine: bool) -> u16 {
    let pair = ruma::signatures::Ed25519KeyPair::from_der(&fake.key, "fake".into()).unwrap();
    let other = ruma::signatures::Ed25519KeyPair::generate();
    let other = ruma::signatures::Ed25519KeyPair::from_der(&other, "fake".into()).unwrap();
    let public =
        ruma::serde::Base64::<ruma::serde::base64::Standard, _>::new(pair.public_key().to_vec())
            .encode();
    let app = s.hs().app().clone();
    let name = fake.name.clone();
    smol::block_on(app.store.write(move |tx| {
        tx.execute(
            "INSERT OR REPLACE INTO server_keys (server_name, key_id, key, valid_until_ts)
             VALUES (?1, 'ed25519:fake', ?2, 9999999999999)",
            [name.as_str(), public.as_str()],
        )?;
        Ok(())
    }))
    .unwrap();
    let path = "/_matrix/federation/v1/query/profile?user_id=%40alice%3Ahearth.test";
    let http_req = http::Request::get(path).body(Vec::<u8>::new()).unwrap();
    let xm = ruma::api::federation::authentication::XMatrix::sign_http_request(
        &http_req,
        ruma::api::federation::authentication::XMatrixSigningInput::new(
            fake.name.as_str().try_into().unwrap(),
            s.hs().server_name().try_into().unwrap(),
            if genuine { &pair } else { &other },
        ),
    )
    .unwrap();
    let res = ureq::get(&format!("{}{path}", s.base))
        .set("Authorization", &xm.to_string())
        .call();
    match res {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(c, _)) => c,
        Err(e) => panic!("{e}"),
    }
}

fn metrics(s: &TestServer) -> String {
    ureq::get(&format!("{}/_hearth/metrics", s.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn messages_reach_the_destination_in_order_exactly_once_and_the_outbox_empties() {
    let fake = FakeDest::start(Mode::Ok);
    let s = start();
    let (_, alice) = s.register("alice");
    let room = room_with(&s, &alice, &fake.name);
    let sent: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
    for (i, b) in sent.iter().enumerate() {
        s.send(&alice, &room, &format!("t{i}"), b);
    }
    wait_for("delivery", Duration::from_secs(20), || {
        fake.delivered().len() >= sent.len() && outbox_len(&s) == 0
    });
    // A little longer: nothing is sent twice.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.delivered(), sent);
    assert_eq!(outbox_len(&s), 0);
    let txns: Vec<String> = fake.seen().into_iter().map(|t| t.txn).collect();
    let mut unique = txns.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), txns.len(), "transaction IDs are unique");
    for t in fake.seen() {
        assert_eq!(t.body["origin"], "hearth.test");
    }
    // An EDU alone (a write that announces the outbox without taking a stream position)
    // wakes the idle sender too, and goes out in `edus`.
    let app = s.hs().app().clone();
    let dest = fake.name.clone();
    let edu = json!({ "edu_type": "m.typing", "content": { "room_id": room, "user_id": "@alice:hearth.test", "typing": true } });
    let e = edu.to_string();
    smol::block_on(
        app.store
            .write(move |tx| hearth::store::queries::insert_outbox_edu(tx, &[dest], &e)),
    )
    .unwrap();
    wait_for("the EDU", Duration::from_secs(5), || outbox_len(&s) == 0);
    let edus: Vec<Value> = fake
        .seen()
        .iter()
        .filter(|t| t.status == 200)
        .flat_map(|t| t.body["edus"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(edus, vec![edu]);
    let m = metrics(&s);
    assert!(metric(&m, "hearth_federation_transactions_total").unwrap() >= 1);
    assert_eq!(metric(&m, "hearth_federation_failures_total"), Some(0));
    assert_eq!(metric(&m, "hearth_federation_queue_depth_total"), Some(0));
}

#[test]
fn a_long_queue_goes_as_transactions_of_at_most_50_pdus() {
    let fake = FakeDest::start(Mode::Fail);
    let s = start();
    let (_, alice) = s.register("alice");
    let room = room_with(&s, &alice, &fake.name);
    let sent: Vec<String> = (0..120).map(|i| format!("m{i}")).collect();
    for (i, b) in sent.iter().enumerate() {
        s.send(&alice, &room, &format!("t{i}"), b);
    }
    assert_eq!(outbox_len(&s), 120, "a failing destination keeps its rows");
    let m = metrics(&s);
    let label = format!(
        "hearth_federation_queue_depth{{destination=\"{}\"}}",
        fake.name
    );
    assert_eq!(metric(&m, &label), Some(120), "{m}");
    assert_eq!(metric(&m, "hearth_federation_queue_depth_total"), Some(120));
    fake.set(Mode::Ok);
    contact(&s, &fake);
    wait_for("delivery", Duration::from_secs(20), || outbox_len(&s) == 0);
    std::thread::sleep(Duration::from_millis(300));
    let ok: Vec<usize> = fake
        .seen()
        .iter()
        .filter(|t| t.status == 200)
        .map(|t| t.body["pdus"].as_array().unwrap().len())
        .collect();
    assert_eq!(ok, vec![50, 50, 20], "transaction sizes");
    assert_eq!(fake.delivered(), sent);
}

#[test]
fn a_destination_that_is_down_backs_off_keeps_its_rows_and_gets_everything_once_back() {
    let fake = FakeDest::start(Mode::Fail);
    let s = start();
    let (_, alice) = s.register("alice");
    let room = room_with(&s, &alice, &fake.name);
    let sent: Vec<String> = (0..3).map(|i| format!("m{i}")).collect();
    for (i, b) in sent.iter().enumerate() {
        s.send(&alice, &room, &format!("t{i}"), b);
    }
    wait_for("a recorded failure", Duration::from_secs(20), || {
        dest_state(&s, &fake.name).is_some_and(|(_, _, f)| f >= 1)
    });
    let (retry_at, backoff, failures) = dest_state(&s, &fake.name).unwrap();
    assert_eq!((backoff, failures), (5_000, 1));
    assert!(retry_at > hearth::util::now_ms());
    assert_eq!(
        outbox_len(&s),
        3,
        "rows are kept while the destination is down"
    );
    assert!(fake.seen().iter().all(|t| t.status == 500));
    let m = metrics(&s);
    assert!(
        metric(&m, "hearth_federation_failures_total").unwrap() >= 1,
        "{m}"
    );
    assert_eq!(metric(&m, "hearth_federation_transactions_total"), Some(0));

    // Back up, and it contacts us: the backoff is cleared and the queue goes out now, well
    // before the 5 s retry deadline.
    fake.set(Mode::Ok);
    // A request with a bad signature is not a contact.
    assert_eq!(contact_signed(&s, &fake, false), 401);
    let state = dest_state(&s, &fake.name).unwrap();
    assert!(state.2 >= 1, "a forged request does not clear the backoff");
    let contacted = Instant::now();
    contact(&s, &fake);
    assert_eq!(
        dest_state(&s, &fake.name),
        Some((0, 0, 0)),
        "backoff cleared"
    );
    wait_for("delivery", Duration::from_secs(20), || outbox_len(&s) == 0);
    assert!(
        contacted.elapsed() < Duration::from_secs(3),
        "delivered at once, not at the retry deadline"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.delivered(), sent, "nothing lost or doubled");
    let m = metrics(&s);
    assert_eq!(metric(&m, "hearth_federation_transactions_total"), Some(1));
}

#[test]
fn rows_queued_before_a_restart_are_sent_after_it_and_the_backoff_survives() {
    let fake = FakeDest::start(Mode::Fail);
    let mut s = start();
    let (_, alice) = s.register("alice");
    let room = room_with(&s, &alice, &fake.name);
    let sent: Vec<String> = (0..3).map(|i| format!("m{i}")).collect();
    for (i, b) in sent.iter().enumerate() {
        s.send(&alice, &room, &format!("t{i}"), b);
    }
    wait_for("a recorded failure", Duration::from_secs(20), || {
        dest_state(&s, &fake.name).is_some_and(|(_, _, f)| f >= 1)
    });
    let before = dest_state(&s, &fake.name).unwrap();
    fake.set(Mode::Ok);
    restart(&mut s);
    assert_eq!(
        dest_state(&s, &fake.name),
        Some(before),
        "a restart neither forgets nor resets the backoff"
    );
    assert_eq!(outbox_len(&s), 3);
    // Delivered at the retry deadline (5 s after the failure), without any new event.
    wait_for("delivery after restart", Duration::from_secs(20), || {
        outbox_len(&s) == 0
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.delivered(), sent);
    assert_eq!(dest_state(&s, &fake.name), Some((0, 0, 0)));
    let retry_at = before.0;
    for t in fake.seen() {
        assert!(
            t.status != 200 || t.at_ms >= retry_at,
            "sent {} ms before the retry deadline: the restart reset the backoff",
            retry_at - t.at_ms
        );
    }
}

#[test]
fn shutdown_during_a_send_that_never_answers_leaves_the_rows_in_place() {
    let fake = FakeDest::start(Mode::Hang);
    let mut s = start();
    let (_, alice) = s.register("alice");
    let room = room_with(&s, &alice, &fake.name);
    s.send(&alice, &room, "t0", "m0");
    wait_for("the send to start", Duration::from_secs(20), || {
        !fake.seen().is_empty()
    });
    let hs = s.hs.take().unwrap();
    let t = Instant::now();
    hs.stop().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "shutdown does not wait for the hanging send"
    );
    // Straight from the file: the row is still queued and no failure was recorded.
    let conn = rusqlite::Connection::open(s.dir.path().join("hearth.db")).unwrap();
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1, "the row survives a cancelled send");
    let failures: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM destinations WHERE failures > 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(failures, 0, "a cancelled send is not a failure");
    drop(conn);
    // The next run sends it.
    fake.set(Mode::Ok);
    restart(&mut s);
    wait_for("delivery after restart", Duration::from_secs(20), || {
        outbox_len(&s) == 0
    });
    assert_eq!(fake.delivered(), vec!["m0".to_owned()]);
}

/// A transaction the destination refuses for good (a 400: a retry gets the same answer) is
/// dropped, as Synapse drops it, instead of blocking every later event to that destination
/// behind it; a 500 keeps the rows and backs off (the test above).
#[test]
fn a_transaction_refused_with_a_400_is_dropped_and_the_queue_goes_on() {
    let fake = FakeDest::start(Mode::Refuse);
    let s = start();
    let (_, alice) = s.register("alice");
    let room = room_with(&s, &alice, &fake.name);
    s.send(&alice, &room, "t0", "refused");
    wait_for("the refusal", Duration::from_secs(20), || {
        fake.seen().iter().any(|t| t.status == 400) && outbox_len(&s) == 0
    });
    assert_eq!(
        dest_state(&s, &fake.name).map_or(0, |d| d.1),
        0,
        "no backoff"
    );
    *fake.mode.lock().unwrap() = Mode::Ok;
    s.send(&alice, &room, "t1", "after");
    wait_for("the next event", Duration::from_secs(20), || {
        fake.delivered().contains(&"after".to_owned())
    });
    let m = metrics(&s);
    assert!(metric(&m, "hearth_federation_dropped_total").unwrap() >= 1);
}

#[test]
fn a_refusal_is_narrowed_to_its_one_row_and_a_queued_sticky_event_is_never_dropped_with_it() {
    let fake = FakeDest::start(Mode::Fail);
    let s = start();
    let (_, alice) = s.register("alice");
    let room = room_with(&s, &alice, &fake.name);
    // Queued while the destination is down: a sticky event, a message it will refuse, and
    // more after them: one transaction once it is back.
    send_sticky(&s, &alice, &room, "sticky");
    wait_for("a failed attempt", Duration::from_secs(20), || {
        fake.seen().iter().any(|t| t.status == 500)
    });
    s.send(&alice, &room, "t0", "bad");
    for i in 1..=3 {
        s.send(&alice, &room, &format!("t{i}"), &format!("m{i}"));
    }
    fake.set(Mode::RefuseBody("bad"));
    contact(&s, &fake);
    wait_for("the queue to empty", Duration::from_secs(30), || {
        outbox_len(&s) == 0
    });
    assert_eq!(
        fake.delivered(),
        ["sticky", "m1", "m2", "m3"],
        "everything but the refused row, once, in order"
    );
    let m = metrics(&s);
    assert_eq!(metric(&m, "hearth_federation_dropped_total"), Some(1));
}

#[test]
fn a_sticky_event_taken_but_not_processed_goes_again_and_a_plain_message_does_not() {
    // Synapse answers 200 without an entry for the PDUs of a room it does not know yet: our
    // sticky events, pushed when its join arrives, reach it while it is still joining.
    let fake = FakeDest::start(Mode::Ignore);
    let s = start();
    let (_, alice) = s.register("alice");
    let room = room_with(&s, &alice, &fake.name);
    // The plain message first: both are taken (unprocessed) before the sticky event's resend.
    s.send(&alice, &room, "p0", "plain");
    send_sticky(&s, &alice, &room, "sticky");
    let count = |body: &str| {
        fake.delivered()
            .iter()
            .filter(|b| b.as_str() == body)
            .count()
    };
    wait_for(
        "both, taken without processing",
        Duration::from_secs(20),
        || count("sticky") >= 1 && count("plain") >= 1,
    );
    fake.set(Mode::Ok);
    wait_for("the sticky event again", Duration::from_secs(20), || {
        count("sticky") >= 2 && outbox_len(&s) == 0
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        count("sticky"),
        2,
        "processed the second time: not sent a third"
    );
    assert_eq!(count("plain"), 1, "a plain message is not sent again");
    let with_sticky: Vec<u64> = fake
        .seen()
        .iter()
        .filter(|t| bodies(&t.body).contains(&"sticky".to_owned()))
        .map(|t| t.at_ms)
        .collect();
    let (first, again) = (with_sticky[0], with_sticky[1]);
    assert!(
        again - first >= 1_500,
        "the destination is given time to finish joining ({} ms)",
        again - first
    );
    let (_, _, failures) = dest_state(&s, &fake.name).unwrap_or_default();
    assert_eq!(failures, 0, "not counted as a failure");
}
