//! What Hearth serves other servers beyond events, proven between Hearths on loopback (TLS,
//! IP-literal or `localhost` names): notary key queries and the notary fallback, old keys and
//! key validity, server ACLs, `/query/directory`, `/publicRooms`.

mod common;

use common::fed::{curl, register, Hearth};
use hearth::{config::TrustedKeyServer, store::queries as q, App};
use ruma::{OwnedRoomId, OwnedServerName, OwnedUserId};
use serde_json::{json, Value};

fn name(s: &str) -> OwnedServerName {
    s.try_into().unwrap()
}

/// `server`'s current key (ID, base64) from its own `/_matrix/key/v2/server`.
fn own_key(h: &Hearth) -> (String, String) {
    let (s, v) = curl(
        "GET",
        &format!("{}/_matrix/key/v2/server", h.url()),
        None,
        None,
    );
    assert_eq!(s, 200, "{v}");
    let (id, k) = v["verify_keys"].as_object().unwrap().iter().next().unwrap();
    (id.clone(), k["key"].as_str().unwrap().to_owned())
}

/// Checks a notary answer for `server`: self-signed by `server` and signed by the notary.
fn check_notarised(doc: &Value, server: &Hearth, notary: &Hearth) {
    let sn = name(&server.server_name());
    hearth::fed::keys::check_server_keys(&sn, &doc.to_string())
        .unwrap_or_else(|e| panic!("not self-signed by {sn}: {e:?}: {doc}"));
    let (nid, nkey) = own_key(notary);
    let keys =
        ruma::signatures::PublicKeySet::from([(nid, ruma::serde::Base64::parse(&nkey).unwrap())]);
    let obj: ruma::CanonicalJsonObject = serde_json::from_value(doc.clone()).unwrap();
    hearth::fed::keys::signed_by(&obj, &name(&notary.server_name()), &keys)
        .unwrap_or_else(|e| panic!("not signed by the notary: {e}: {doc}"));
}

fn fetch_keys(app: &App, server: &str, key_id: &str, at: i64) -> hearth::error::Result<()> {
    let ctx = hearth::ops::federation::key_context(app);
    smol::block_on(app.fed.keys.for_request(&ctx, &name(server), &[key_id], at)).map(|_| ())
}

fn stored_keys(app: &App, server: &str) -> Vec<(String, i64, Option<i64>)> {
    let s = server.to_owned();
    smol::block_on(app.store.read(move |c| q::list_server_keys(c, &s)))
        .unwrap()
        .into_iter()
        .map(|r| (r.key_id, r.valid_until_ts, r.expired_ts))
        .collect()
}

#[test]
fn a_notary_serves_its_own_and_remote_keys_signed_by_itself() {
    let a = Hearth::start();
    let b = Hearth::start();
    // POST: ours and b's (fetched from b on the spot), each re-signed by a.
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/key/v2/query", a.url()),
        None,
        Some(&json!({ "server_keys": { b.server_name(): {}, a.server_name(): {} } })),
    );
    assert_eq!(s, 200, "{v}");
    let docs = v["server_keys"].as_array().unwrap();
    assert_eq!(docs.len(), 2, "{v}");
    for doc in docs {
        if doc["server_name"] == b.server_name().as_str() {
            check_notarised(doc, &b, &a);
            assert_eq!(doc["verify_keys"][own_key(&b).0]["key"], own_key(&b).1);
        } else {
            assert_eq!(doc["server_name"], a.server_name().as_str());
            check_notarised(doc, &a, &a);
        }
    }
    // GET for one server, with a minimum validity the cached document meets.
    let (s, v) = curl(
        "GET",
        &format!(
            "{}/_matrix/key/v2/query/{}?minimum_valid_until_ts=1",
            a.url(),
            b.server_name()
        ),
        None,
        None,
    );
    assert_eq!(s, 200, "{v}");
    check_notarised(&v["server_keys"][0], &b, &a);
    // A server nobody can reach: no documents, not an error.
    let (s, v) = curl(
        "GET",
        &format!("{}/_matrix/key/v2/query/127.0.0.1:1", a.url()),
        None,
        None,
    );
    assert_eq!((s, v["server_keys"].clone()), (200, json!([])), "{v}");
    // Malformed queries are refused with Matrix errors.
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/key/v2/query", a.url()),
        None,
        Some(&json!({ "server_keys": { "not a server name!": {} } })),
    );
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{v}");
}

#[test]
fn keys_of_an_unreachable_server_come_from_a_trusted_notary_checked_by_its_key() {
    let notary = Hearth::start();
    let b = Hearth::start();
    let (b_key, _) = own_key(&b);
    let (n_key_id, n_key) = own_key(&notary);
    let trusting = |keys: Vec<(String, String)>| {
        let n = notary.server_name();
        Hearth::start_with("127.0.0.1", move |c| {
            c.federation.trusted_key_servers = vec![TrustedKeyServer {
                server_name: n,
                verify_keys: keys.into_iter().collect(),
            }]
        })
    };
    let with_key = trusting(vec![(n_key_id.clone(), n_key)]);
    let on_first_use = trusting(vec![]);
    // A notary key that is not the notary's: its answers must be refused.
    let other = Hearth::start();
    let wrong = trusting(vec![(n_key_id, own_key(&other).1)]);
    let alone = Hearth::start();

    // The notary learns b's keys while b is up; then b goes away for good.
    let (s, v) = curl(
        "GET",
        &format!("{}/_matrix/key/v2/query/{}", notary.url(), b.server_name()),
        None,
        None,
    );
    assert_eq!(s, 200, "{v}");
    let b_name = b.server_name();
    b.hs.stop().unwrap();
    let now = notary.hs.app().clock.now_ms() as i64;

    for (h, what) in [
        (&with_key, "configured key"),
        (&on_first_use, "fetched key"),
    ] {
        fetch_keys(h.hs.app(), &b_name, &b_key, now)
            .unwrap_or_else(|e| panic!("notary with a {what}: {e:?}"));
        let rows = stored_keys(h.hs.app(), &b_name);
        assert!(
            rows.iter()
                .any(|(id, until, _)| *id == b_key && *until >= now),
            "{what}: stored with its validity: {rows:?}"
        );
    }
    let e = fetch_keys(wrong.hs.app(), &b_name, &b_key, now).unwrap_err();
    assert_eq!(e.status, 502, "a notary answer with a bad signature: {e:?}");
    assert!(stored_keys(wrong.hs.app(), &b_name).is_empty());
    assert!(
        fetch_keys(alone.hs.app(), &b_name, &b_key, now).is_err(),
        "no notary, no keys"
    );
}

#[test]
fn old_keys_verify_what_came_before_they_expired_and_stale_keys_are_fetched_again() {
    let a = Hearth::start();
    let b = Hearth::start();
    let (app, b_name) = (a.hs.app(), b.server_name());
    let (b_key, b_pub) = own_key(&b);
    // An old key of b's, expired at t = 1000, and b's current key recorded as valid only
    // until t = 5 (long past).
    let (bn, bk, bp) = (b_name.clone(), b_key.clone(), b_pub.clone());
    smol::block_on(app.store.write(move |tx| {
        q::upsert_server_key(tx, &bn, "ed25519:old", &bp, 1000, Some(1000))?;
        q::upsert_server_key(tx, &bn, &bk, &bp, 5, None)
    }))
    .unwrap();
    fetch_keys(app, &b_name, "ed25519:old", 999).expect("before it expired: usable");
    let e = fetch_keys(app, &b_name, "ed25519:old", 1000).unwrap_err();
    assert_eq!(e.status, 401, "not after it expired: {e:?}");
    fetch_keys(app, &b_name, &b_key, 5).expect("valid at t = 5 as stored");
    let now = app.clock.now_ms() as i64;
    // Stale for now: fetched again from b, and the new validity is stored.
    fetch_keys(app, &b_name, &b_key, now).expect("refetched");
    let rows = stored_keys(app, &b_name);
    let cur = rows.iter().find(|(id, _, _)| *id == b_key).unwrap();
    assert!(cur.1 > now && cur.2.is_none(), "{rows:?}");
    let old = rows.iter().find(|(id, _, _)| id == "ed25519:old").unwrap();
    assert_eq!(old.2, Some(1000), "{rows:?}");
}

/// A public room on `a` with alias `#lobby:a`, created by alice; bob registered on `b`.
fn lobby(a: &Hearth, b: &Hearth) -> (String, OwnedRoomId, OwnedUserId, String) {
    let (_, alice) = register(&a.url(), "alice");
    let (bob, bob_tok) = register(&b.url(), "bob");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", a.url()),
        Some(&alice),
        Some(&json!({ "preset": "public_chat", "visibility": "public",
                      "name": "The Lobby", "room_alias_name": "lobby" })),
    );
    assert_eq!(s, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().try_into().unwrap();
    (alice, room, bob.as_str().try_into().unwrap(), bob_tok)
}

#[test]
fn aliases_and_public_rooms_of_another_server_are_asked_of_it() {
    let a = Hearth::start();
    let b = Hearth::start();
    let (_, room, bob, bob_tok) = lobby(&a, &b);
    let alias = format!("#lobby:{}", a.server_name());
    let lookup = |alias: &str| {
        curl(
            "GET",
            &format!(
                "{}/_matrix/client/v3/directory/room/{}",
                b.url(),
                common::enc(alias)
            ),
            Some(&bob_tok),
            None,
        )
    };
    let (s, v) = lookup(&alias);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v, json!({ "room_id": room, "servers": [a.server_name()] }));
    let (s, v) = lookup(&format!("#nope:{}", a.server_name()));
    assert_eq!(
        (s, v["errcode"].as_str()),
        (404, Some("M_NOT_FOUND")),
        "{v}"
    );

    // Joining by the remote alias goes through the server that answered.
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/join/{}", b.url(), common::enc(&alias)),
        Some(&bob_tok),
        Some(&json!({})),
    );
    assert_eq!((s, &v["room_id"]), (200, &json!(room)), "{v}");
    let (r, u) = (room.to_string(), bob.to_string());
    let joined = smol::block_on(b.hs.app().store.read(move |c| q::get_membership(c, &r, &u)));
    assert_eq!(joined.unwrap().as_deref(), Some("join"));
    // Now the resident server names both servers.
    let (s, v) = lookup(&alias);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["servers"], json!([a.server_name(), b.server_name()]));

    // The public room directory of a, from b's client: all, filtered, and filtered out.
    let dir = |method: &str, body: Option<Value>| {
        let (s, v) = curl(
            method,
            &format!(
                "{}/_matrix/client/v3/publicRooms?server={}",
                b.url(),
                a.server_name()
            ),
            Some(&bob_tok),
            body.as_ref(),
        );
        assert_eq!(s, 200, "{v}");
        assert!(
            v.get("next_batch").is_none(),
            "one page, no next_batch (nor null): {v}"
        );
        v["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["room_id"].as_str().unwrap().to_owned(), e["name"].clone()))
            .collect::<Vec<_>>()
    };
    let entry = vec![(room.to_string(), json!("The Lobby"))];
    assert_eq!(dir("GET", None), entry);
    let filter = |t: &str| Some(json!({ "filter": { "generic_search_term": t } }));
    assert_eq!(dir("POST", filter("lobb")), entry);
    assert_eq!(dir("POST", filter("no such room")), vec![]);
    // b's own directory is empty: `server` naming b is b's.
    let (s, v) = curl(
        "GET",
        &format!("{}/_matrix/client/v3/publicRooms", b.url()),
        None,
        None,
    );
    assert_eq!((s, v["chunk"].clone()), (200, json!([])), "{v}");
}

#[test]
fn a_server_the_room_acl_denies_is_refused_everything_and_sent_nothing() {
    let a = Hearth::start();
    let b = Hearth::start_with("localhost", |_| {});
    let (alice, room, bob, bob_tok) = lobby(&a, &b);
    let a_name = name(&a.server_name());
    let b_app = b.hs.app();
    smol::block_on(hearth::ops::federation::join_remote(
        b_app,
        &bob,
        &room,
        std::slice::from_ref(&a_name),
    ))
    .expect("b joins before the ACL");
    let servers = |app: &App| {
        let (r, us) = (room.to_string(), app.server_name.to_string());
        smol::block_on(app.store.read(move |c| q::list_room_servers(c, &r, &us))).unwrap()
    };
    assert_eq!(servers(a.hs.app()), vec![b.server_name()]);
    let state_ids = |at: &ruma::EventId| {
        use ruma::api::federation::event::get_room_state_ids::v1 as ids;
        smol::block_on(
            b_app
                .fed
                .client
                .send(&a_name, ids::Request::new(at.to_owned(), room.clone())),
        )
    };
    let create: ruma::OwnedEventId = {
        let r = room.to_string();
        let id = smol::block_on(
            a.hs.app()
                .store
                .read(move |c| q::get_current_state(c, &r, "m.room.create", "")),
        );
        id.unwrap().unwrap().try_into().unwrap()
    };
    state_ids(&create).expect("allowed before the ACL");

    let (s, v) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/state/m.room.server_acl/",
            a.url(),
            common::enc(room.as_str())
        ),
        Some(&alice),
        Some(&json!({ "allow": ["*"], "deny": ["localhost"], "allow_ip_literals": true })),
    );
    assert_eq!(s, 200, "{v}");
    // Sending: b is no longer a destination of the room.
    assert_eq!(servers(a.hs.app()), Vec::<String>::new());

    // Every request about the room from b: 403 M_FORBIDDEN.
    let forbidden = |r: hearth::error::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!((e.status, e.errcode), (403, "M_FORBIDDEN"), "{what}: {e:?}");
    };
    forbidden(state_ids(&create).map(|_| ()), "state_ids");
    use ruma::api::federation::{
        backfill::get_backfill::v1 as backfill, event::get_event::v1 as get_event,
        membership::prepare_join_event::v1 as make_join,
    };
    let send = |f: &dyn Fn() -> hearth::error::Result<()>, what: &str| forbidden(f(), what);
    send(
        &|| {
            let r = backfill::Request::new(room.clone(), vec![create.clone()], 10u32.into());
            smol::block_on(b_app.fed.client.send(&a_name, r)).map(|_| ())
        },
        "backfill",
    );
    send(
        &|| {
            let r = get_event::Request::new(create.clone());
            smol::block_on(b_app.fed.client.send(&a_name, r)).map(|_| ())
        },
        "event",
    );
    send(
        &|| {
            let mut r = make_join::Request::new(room.clone(), bob.clone());
            r.ver = vec![ruma::RoomVersionId::V10];
            smol::block_on(b_app.fed.client.send(&a_name, r)).map(|_| ())
        },
        "make_join",
    );

    // A PDU from b (bob's message, signed by b) pushed in a transaction: refused by the ACL,
    // not stored by a.
    let (s, v) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/t1",
            b.url(),
            common::enc(room.as_str())
        ),
        Some(&bob_tok),
        Some(&json!({ "msgtype": "m.text", "body": "let me in" })),
    );
    assert_eq!(s, 200, "{v}");
    let eid: ruma::OwnedEventId = v["event_id"].as_str().unwrap().try_into().unwrap();
    let e2 = eid.to_string();
    let pdu = smol::block_on(b_app.store.read(move |c| q::get_event(c, &e2)))
        .unwrap()
        .unwrap()
        .json;
    use ruma::api::federation::transactions::send_transaction_message::v1 as txn;
    let mut req = txn::Request::new(
        "acl-1".into(),
        b_app.server_name.clone(),
        ruma::MilliSecondsSinceUnixEpoch::now(),
    );
    req.pdus = vec![serde_json::value::RawValue::from_string(pdu).unwrap()];
    let res = smol::block_on(b_app.fed.client.send(&a_name, req)).unwrap();
    let err = res.pdus[&eid].clone().unwrap_err();
    assert!(err.contains("server ACL"), "{err}");
    let e3 = eid.to_string();
    let stored = smol::block_on(a.hs.app().store.read(move |c| q::get_event(c, &e3))).unwrap();
    assert!(stored.is_none(), "a denied server's PDU was stored");
}

/// Drops `make()`'s future after each of its `Pending`s (driven on this thread; the
/// Homeserver's own executor goes on meanwhile), running `check` after each drop.
fn drop_everywhere<T, Fut: std::future::Future<Output = T>>(
    make: impl FnMut() -> Fut,
    check: impl FnMut(usize),
) -> (usize, T) {
    let ex = async_executor::Executor::new();
    hearth::cancel::drop_at_every_await(&ex, make, check)
}

/// Polls `f` for up to 10 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < end, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_dropped_key_fetch_or_alias_lookup_leaves_nothing_half_done() {
    let a = Hearth::start();
    let b = Hearth::start();
    let (app, b_name) = (a.hs.app(), b.server_name());
    let (b_key, _) = own_key(&b);
    let tasks = app.spawner.live_tasks();
    let now = app.clock.now_ms() as i64;
    // The key fetch: a dropped caller never cancels the shared fetch, which stores b's key
    // (whole) for the next caller; before the fetch starts, a drop leaves nothing.
    let ctx = hearth::ops::federation::key_context(app);
    let (server, ids) = (name(&b_name), [b_key.as_str()]);
    let mut drops = 0;
    let (_, res) = drop_everywhere(
        || app.fed.keys.for_request(&ctx, &server, &ids, now),
        |n| {
            drops += 1;
            eventually(
                &format!("key fetch: no task left after drop {n} (of {tasks})"),
                || app.spawner.live_tasks() <= tasks,
            );
            let rows = stored_keys(app, &b_name);
            assert!(
                rows.is_empty()
                    || rows
                        .iter()
                        .any(|(id, until, _)| *id == b_key && *until > now),
                "drop {n}: {rows:?}"
            );
        },
    );
    res.expect("the key, in the end");
    assert!(drops >= 1, "the caller waits at least once");
    assert!(!stored_keys(app, &b_name).is_empty());

    // The alias lookup on another server, from a server with no connection to it yet (so
    // every drop point is explored: connecting, TLS, request, answer; a dropped run's
    // connection is closed, never pooled): a read, it leaves no task and writes nothing.
    let c = Hearth::start();
    let app = c.hs.app();
    let (_, room, _, _) = lobby(&b, &c);
    // b checks c's requests with c's key: fetched now, so b's connection to c (a task on c
    // while it stays open) is there before the count starts.
    let (c_key, _) = own_key(&c);
    fetch_keys(b.hs.app(), &c.server_name(), &c_key, now).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let tasks = app.spawner.live_tasks();
    let alias: ruma::OwnedRoomAliasId = format!("#lobby:{b_name}").try_into().unwrap();
    let events =
        |app: &App| {
            smol::block_on(app.store.read(|c| {
                Ok(c.query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0))?)
            }))
            .unwrap()
        };
    let before = events(app);
    let mut drops = 0;
    let (_, res) = drop_everywhere(
        || hearth::fed::directory::resolve_alias(app, &alias),
        |n| {
            drops += 1;
            eventually(&format!("no task left after drop {n} (of {tasks})"), || {
                app.spawner.live_tasks() <= tasks
            });
            assert_eq!(events(app), before, "drop {n}: a lookup wrote");
        },
    );
    assert_eq!(res.unwrap().0, room);
    eprintln!("alias lookup dropped at each of {drops} await points");
    assert!(drops >= 3, "{drops}");
    let again = smol::block_on(hearth::fed::directory::resolve_alias(app, &alias));
    assert_eq!(again.unwrap().0, room, "the next lookup answers");
}
