//! End-to-end encryption over real HTTP: device and one-time keys, claims, the device-list
//! stream in `/sync`, cross-signing with user-interactive auth, to-device messages delivered
//! exactly once, server-side key backup, and the schema upgrade that adds their tables.
//! Keys are real ed25519 keys signed with ruma, so every signature check is exercised.
mod common;

use common::{enc, TestServer};
use ruma::{
    serde::{base64::Standard, Base64},
    signatures::{sign_json, Ed25519KeyPair},
    CanonicalJsonObject,
};
use serde_json::{json, Value};

const V3: &str = "/_matrix/client/v3";

/// An ed25519 key pair whose key ID is `ed25519:<name>`; `name: None` names it by its public
/// key (cross-signing keys).
fn keypair(name: Option<&str>) -> (Ed25519KeyPair, String) {
    let doc = Ed25519KeyPair::generate();
    let probe = Ed25519KeyPair::from_der(&doc, "x".into()).unwrap();
    let public = Base64::<Standard, _>::new(probe.public_key().to_vec()).encode();
    let version = name.map(str::to_owned).unwrap_or_else(|| public.clone());
    (Ed25519KeyPair::from_der(&doc, version).unwrap(), public)
}

fn sign(v: Value, signer: &str, key: &Ed25519KeyPair) -> Value {
    let mut o: CanonicalJsonObject = serde_json::from_value(v).unwrap();
    sign_json(signer, key, &mut o).unwrap();
    serde_json::to_value(o).unwrap()
}

/// A logged-in device with its own signing key.
struct Dev {
    user: String,
    device: String,
    token: String,
    key: Ed25519KeyPair,
    ed: String,
}

fn login(s: &TestServer, name: &str, device: &str) -> Dev {
    let v = s.ok(
        "POST",
        &format!("{V3}/login"),
        None,
        Some(&json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": name },
                      "password": format!("pw-{name}"), "device_id": device,
                      "initial_device_display_name": format!("{name}'s {device}") })),
    );
    let (key, ed) = keypair(Some(device));
    Dev {
        user: v["user_id"].as_str().unwrap().into(),
        device: device.into(),
        token: v["access_token"].as_str().unwrap().into(),
        key,
        ed,
    }
}

fn new_user(s: &TestServer, name: &str, device: &str) -> Dev {
    s.register(name);
    login(s, name, device)
}

fn device_keys(d: &Dev) -> Value {
    sign(
        json!({
            "user_id": d.user, "device_id": d.device,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": { format!("curve25519:{}", d.device): "Y3VydmUyNTUxOWtleQ", format!("ed25519:{}", d.device): d.ed },
        }),
        &d.user,
        &d.key,
    )
}

fn otk(d: &Dev, n: usize, fallback: bool) -> (String, Value) {
    let mut v = json!({ "key": format!("b3RrLWtleS0{n:04}") });
    if fallback {
        v["fallback"] = true.into();
    }
    (
        format!("signed_curve25519:K{n:04}"),
        sign(v, &d.user, &d.key),
    )
}

fn upload(s: &TestServer, d: &Dev, body: Value) -> Value {
    s.ok(
        "POST",
        &format!("{V3}/keys/upload"),
        Some(&d.token),
        Some(&body),
    )
}

fn query(s: &TestServer, d: &Dev, users: &[&str]) -> Value {
    let map: serde_json::Map<String, Value> =
        users.iter().map(|u| (u.to_string(), json!([]))).collect();
    s.ok(
        "POST",
        &format!("{V3}/keys/query"),
        Some(&d.token),
        Some(&json!({ "device_keys": map })),
    )
}

fn claim(s: &TestServer, d: &Dev, user: &str, device: &str) -> Value {
    s.ok(
        "POST",
        &format!("{V3}/keys/claim"),
        Some(&d.token),
        Some(&json!({ "one_time_keys": { user: { device: "signed_curve25519" } } })),
    )["one_time_keys"]
        .clone()
}

/// An initial sync that is not an identical retry of an earlier one (those are answered from
/// the server's response cache for 2 s, like Synapse's): key counts take no stream position.
fn fresh_sync(s: &TestServer, token: &str) -> Value {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    s.sync(
        token,
        &format!(
            "filter={}",
            enc(&json!({ "room": { "timeline": { "limit": n } } }).to_string())
        ),
    )
}

fn since(sync: &Value) -> String {
    sync["next_batch"].as_str().unwrap().to_owned()
}

/// `action` is `join` or `leave`.
fn membership(s: &TestServer, d: &Dev, room: &str, action: &str) {
    let path = match action {
        "join" => format!("{V3}/join/{}", enc(room)),
        _ => format!("{V3}/rooms/{}/{action}", enc(room)),
    };
    s.ok("POST", &path, Some(&d.token), Some(&json!({})));
}

fn shared_room(s: &TestServer, a: &Dev, b: &Dev) -> String {
    let room = s.create_room(&a.token, json!({ "preset": "public_chat" }));
    membership(s, b, &room, "join");
    room
}

#[test]
fn device_keys_are_checked_stored_and_queried() {
    let s = TestServer::start();
    let alice = new_user(&s, "alice", "ADEV");
    let bob = new_user(&s, "bob", "BDEV");
    // Bad input first: nothing of it may be stored.
    let mut forged = device_keys(&alice);
    forged["keys"]["curve25519:ADEV"] = "c29tZXRoaW5nIGVsc2U".into();
    let path = format!("{V3}/keys/upload");
    s.err(
        "POST",
        &path,
        Some(&alice.token),
        Some(&json!({ "device_keys": forged })),
        400,
        "M_INVALID_PARAM",
    );
    // Keys for another device than the caller's, well signed.
    let (other_key, other_ed) = keypair(Some("OTHER"));
    let other_device = sign(
        json!({ "user_id": alice.user, "device_id": "OTHER", "algorithms": [], "keys": { "ed25519:OTHER": other_ed } }),
        &alice.user,
        &other_key,
    );
    s.err(
        "POST",
        &path,
        Some(&alice.token),
        Some(&json!({ "device_keys": other_device })),
        400,
        "M_INVALID_PARAM",
    );
    s.err(
        "POST",
        &path,
        Some(&alice.token),
        Some(&json!({ "device_keys": { "user_id": alice.user, "keys": 5 } })),
        400,
        "M_BAD_JSON",
    );
    let (id, mut bad_otk) = otk(&alice, 1, false);
    bad_otk["key"] = "dGFtcGVyZWQ".into();
    s.err(
        "POST",
        &path,
        Some(&alice.token),
        Some(&json!({ "device_keys": device_keys(&alice), "one_time_keys": { id: bad_otk } })),
        400,
        "M_INVALID_PARAM",
    );
    let q = query(&s, &bob, &[&alice.user]);
    assert_eq!(
        q["device_keys"][&alice.user],
        json!({}),
        "nothing stored: {q}"
    );

    // Good keys.
    let (id1, k1) = otk(&alice, 1, false);
    let (id2, k2) = otk(&alice, 2, false);
    let counts = upload(
        &s,
        &alice,
        json!({ "device_keys": device_keys(&alice), "one_time_keys": { &id1: k1, id2: k2 } }),
    );
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 2);
    // The same key ID with other content is refused; the same content is fine.
    let (_, k1b) = otk(&alice, 9, false);
    s.err(
        "POST",
        &path,
        Some(&alice.token),
        Some(&json!({ "one_time_keys": { &id1: k1b } })),
        400,
        "M_INVALID_PARAM",
    );
    let (id1, k1) = otk(&alice, 1, false);
    assert_eq!(
        upload(&s, &alice, json!({ "one_time_keys": { id1: k1 } }))["one_time_key_counts"]
            ["signed_curve25519"],
        2
    );

    let q = query(
        &s,
        &bob,
        &[&alice.user, "@nobody:hearth.test", "@x:remote.example"],
    );
    let got = &q["device_keys"][&alice.user]["ADEV"];
    assert_eq!(got["keys"]["ed25519:ADEV"], alice.ed.as_str());
    assert_eq!(got["unsigned"]["device_display_name"], "alice's ADEV");
    assert!(got["signatures"][&alice.user]["ed25519:ADEV"].is_string());
    assert_eq!(q["device_keys"]["@nobody:hearth.test"], json!({}));
    assert!(q["failures"]["remote.example"].is_object(), "{q}");
    // Asking for a device by ID.
    let q = s.ok(
        "POST",
        &format!("{V3}/keys/query"),
        Some(&bob.token),
        Some(&json!({ "device_keys": { &alice.user: ["NOPE"] } })),
    );
    assert_eq!(q["device_keys"][&alice.user], json!({}));
}

#[test]
fn a_one_time_key_is_claimed_once_then_the_fallback_key() {
    let s = TestServer::start();
    let alice = new_user(&s, "alice", "ADEV");
    let bob = new_user(&s, "bob", "BDEV");
    let mut otks = serde_json::Map::new();
    for n in 0..8 {
        let (id, k) = otk(&alice, n, false);
        otks.insert(id, k);
    }
    let (fid, fk) = otk(&alice, 100, true);
    upload(
        &s,
        &alice,
        json!({ "device_keys": device_keys(&alice), "one_time_keys": otks, "fallback_keys": { &fid: fk } }),
    );
    let sync = fresh_sync(&s, &alice.token);
    assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 8);
    assert_eq!(
        sync["device_unused_fallback_key_types"],
        json!(["signed_curve25519"])
    );

    // Eight concurrent claims get eight different keys.
    let claimed: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..8)
            .map(|_| sc.spawn(|| claim(&s, &bob, &alice.user, "ADEV")))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let v = h.join().unwrap();
                let keys = v[&alice.user]["ADEV"].as_object().unwrap().clone();
                assert_eq!(keys.len(), 1);
                keys.keys().next().unwrap().clone()
            })
            .collect()
    });
    let distinct: std::collections::BTreeSet<_> = claimed.iter().collect();
    assert_eq!(distinct.len(), 8, "{claimed:?}");
    assert!(!claimed.contains(&fid));
    // Then the fallback key, as often as asked, and it is reported used.
    for _ in 0..2 {
        let v = claim(&s, &bob, &alice.user, "ADEV");
        let key = &v[&alice.user]["ADEV"][&fid];
        assert_eq!(key["fallback"], true, "{v}");
    }
    let sync = fresh_sync(&s, &alice.token);
    assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 0);
    assert_eq!(sync["device_unused_fallback_key_types"], json!([]));
    // A new fallback key is unused again.
    let (fid2, fk2) = otk(&alice, 101, true);
    upload(&s, &alice, json!({ "fallback_keys": { fid2: fk2 } }));
    assert_eq!(
        fresh_sync(&s, &alice.token)["device_unused_fallback_key_types"],
        json!(["signed_curve25519"])
    );
    // Unknown users and devices are left out; malformed IDs are refused.
    assert_eq!(claim(&s, &bob, "@nobody:hearth.test", "X"), json!({}));
    assert_eq!(claim(&s, &bob, &alice.user, "NOPE"), json!({}));
    s.err(
        "POST",
        &format!("{V3}/keys/claim"),
        Some(&bob.token),
        Some(&json!({ "one_time_keys": { "not-a-user": { "X": "signed_curve25519" } } })),
        400,
        "M_BAD_JSON",
    );
}

#[test]
fn to_device_messages_are_delivered_exactly_once() {
    let s = TestServer::start();
    let alice = new_user(&s, "alice", "ADEV");
    let bob = new_user(&s, "bob", "BDEV");
    let bob2 = login(&s, "bob", "BDEV2");
    let send = |txn: &str, device: &str, n: usize| {
        s.ok(
            "PUT",
            &format!("{V3}/sendToDevice/m.test/{txn}"),
            Some(&alice.token),
            Some(&json!({ "messages": { &bob.user: { device: { "n": n } } } })),
        );
    };
    let first = s.sync(&bob.token, "");
    let t0 = since(&first);
    send("t1", "BDEV", 1);
    send("t1", "BDEV", 1); // a retry of the same transaction
    send("t2", "*", 2);
    send("t3", "NOSUCHDEVICE", 3);
    let ns = |v: &Value| -> Vec<u64> {
        v["to_device"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["content"]["n"].as_u64().unwrap())
            .collect()
    };
    let a = s.sync(&bob.token, &format!("since={t0}"));
    assert_eq!(ns(&a), vec![1, 2]);
    assert_eq!(a["to_device"]["events"][0]["sender"], alice.user.as_str());
    assert_eq!(a["to_device"]["events"][0]["type"], "m.test");
    assert_eq!(ns(&s.sync(&bob2.token, &format!("since={t0}"))), vec![2]);
    // The response was lost: the same `since` gets them again.
    assert_eq!(ns(&s.sync(&bob.token, &format!("since={t0}"))), vec![1, 2]);
    // Acknowledged by the next `since`: delivered no more, and deleted.
    let t1 = since(&a);
    assert_eq!(
        ns(&s.sync(&bob.token, &format!("since={t1}"))),
        Vec::<u64>::new()
    );
    // (A new message makes the next request no retry of an earlier one.)
    send("t4", "BDEV", 4);
    assert_eq!(
        ns(&s.sync(&bob.token, &format!("since={t0}"))),
        vec![4],
        "deleted"
    );
    let b = s.sync(&bob.token, &format!("since={t1}"));
    assert_eq!(ns(&b), vec![4]);

    // More than fit in one response wait for the next.
    for n in 0..130 {
        send(&format!("bulk{n}"), "BDEV", 1000 + n);
    }
    let c = s.sync(&bob.token, &format!("since={}", since(&b)));
    assert_eq!(ns(&c), (1000..1100).collect::<Vec<_>>());
    let d = s.sync(&bob.token, &format!("since={}&timeout=10000", since(&c)));
    assert_eq!(ns(&d), (1100..1130).collect::<Vec<_>>());

    // A long-poll wakes for a message.
    let t = since(&d);
    let got = std::thread::scope(|sc| {
        let h = sc.spawn(|| s.sync(&bob.token, &format!("since={t}&timeout=20000")));
        std::thread::sleep(std::time::Duration::from_millis(300));
        send("late", "BDEV", 7);
        h.join().unwrap()
    });
    assert_eq!(ns(&got), vec![7]);

    // Bad input: content that is not an object, an unknown user ID shape.
    s.err(
        "PUT",
        &format!("{V3}/sendToDevice/m.test/bad1"),
        Some(&alice.token),
        Some(&json!({ "messages": { &bob.user: { "BDEV": 5 } } })),
        400,
        "M_BAD_JSON",
    );
    s.err(
        "PUT",
        &format!("{V3}/sendToDevice/m.test/bad2"),
        Some(&alice.token),
        Some(&json!({ "messages": { "bob": { "BDEV": {} } } })),
        400,
        "M_BAD_JSON",
    );
    // Deleting a device deletes its inbox.
    send("before-delete", "BDEV2", 9);
    s.ok(
        "POST",
        &format!("{V3}/delete_devices"),
        Some(&bob.token),
        Some(&json!({ "devices": ["BDEV2"], "auth": { "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "bob" }, "password": "pw-bob" } })),
    );
    let bob2 = login(&s, "bob", "BDEV2");
    assert_eq!(ns(&s.sync(&bob2.token, "")), Vec::<u64>::new());
}

#[test]
fn device_lists_name_who_changed_and_who_left() {
    let s = TestServer::start();
    let alice = new_user(&s, "alice", "ADEV");
    let bob = new_user(&s, "bob", "BDEV");
    let carol = new_user(&s, "carol", "CDEV");
    let dave = new_user(&s, "dave", "DDEV");
    let room = shared_room(&s, &alice, &bob);
    let t0 = since(&s.sync(&bob.token, ""));
    let lists = |v: &Value| {
        (
            v["device_lists"]["changed"].clone(),
            v["device_lists"]["left"].clone(),
        )
    };

    // A key upload by someone sharing a room wakes a waiting poll and lists them.
    let got = std::thread::scope(|sc| {
        let h = sc.spawn(|| s.sync(&bob.token, &format!("since={t0}&timeout=20000")));
        std::thread::sleep(std::time::Duration::from_millis(300));
        upload(&s, &alice, json!({ "device_keys": device_keys(&alice) }));
        h.join().unwrap()
    });
    assert_eq!(lists(&got), (json!([alice.user]), json!([])));
    // Uploading the same keys again is no change; dave shares no room and is not listed.
    let t1 = since(&got);
    upload(&s, &alice, json!({ "device_keys": device_keys(&alice) }));
    upload(&s, &dave, json!({ "device_keys": device_keys(&dave) }));
    let v = s.sync(&bob.token, &format!("since={t1}"));
    assert_eq!(lists(&v), (json!([]), json!([])));
    let changes = s.ok(
        "GET",
        &format!("{V3}/keys/changes?from={t0}&to={t1}"),
        Some(&bob.token),
        None,
    );
    assert_eq!(changes["changed"], json!([alice.user]));

    // Carol joining makes her new to bob; her leaving the only shared room makes her gone.
    let t2 = since(&v);
    membership(&s, &carol, &room, "join");
    let v = s.sync(&bob.token, &format!("since={t2}"));
    assert_eq!(lists(&v), (json!([carol.user]), json!([])));
    let t3 = since(&v);
    membership(&s, &carol, &room, "leave");
    let v = s.sync(&bob.token, &format!("since={t3}"));
    assert_eq!(lists(&v), (json!([]), json!([carol.user])));
    let changes = s.ok(
        "GET",
        &format!("{V3}/keys/changes?from={t3}&to={}", since(&v)),
        Some(&bob.token),
        None,
    );
    assert_eq!(changes["left"], json!([carol.user]));

    // A new device and a deleted device are changes too; the deleted one's keys are gone.
    let t4 = since(&v);
    let alice2 = login(&s, "alice", "ADEV2");
    upload(&s, &alice2, json!({ "device_keys": device_keys(&alice2) }));
    let v = s.sync(&bob.token, &format!("since={t4}"));
    assert_eq!(lists(&v).0, json!([alice.user]));
    let t5 = since(&v);
    s.ok(
        "POST",
        &format!("{V3}/logout"),
        Some(&alice2.token),
        Some(&json!({})),
    );
    let v = s.sync(&bob.token, &format!("since={t5}"));
    assert_eq!(lists(&v).0, json!([alice.user]));
    let q = query(&s, &bob, &[&alice.user]);
    let devices: Vec<&String> = q["device_keys"][&alice.user]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(devices, vec!["ADEV"]);

    // Bob leaving the room: alice is gone for him.
    let t6 = since(&v);
    membership(&s, &bob, &room, "leave");
    let v = s.sync(&bob.token, &format!("since={t6}"));
    assert_eq!(lists(&v), (json!([]), json!([alice.user])));
}

/// Cross-signing keys for `d`'s user: (master, self-signing, user-signing) key pairs and the
/// upload body.
fn cross_signing(d: &Dev) -> ([(Ed25519KeyPair, String); 3], Value) {
    let (mk, mpub) = keypair(None);
    let (sk, spub) = keypair(None);
    let (uk, upub) = keypair(None);
    let key = |usage: &str, public: &str| json!({ "user_id": d.user, "usage": [usage], "keys": { format!("ed25519:{public}"): public } });
    let body = json!({
        "master_key": key("master", &mpub),
        "self_signing_key": sign(key("self_signing", &spub), &d.user, &mk),
        "user_signing_key": sign(key("user_signing", &upub), &d.user, &mk),
    });
    ([(mk, mpub), (sk, spub), (uk, upub)], body)
}

#[test]
fn cross_signing_keys_and_signatures() {
    let s = TestServer::start();
    let alice = new_user(&s, "alice", "ADEV");
    let bob = new_user(&s, "bob", "BDEV");
    upload(&s, &alice, json!({ "device_keys": device_keys(&alice) }));
    let path = format!("{V3}/keys/device_signing/upload");
    let ([(mk, mpub), (sk, spub), (_, upub)], body) = cross_signing(&alice);

    // A self-signing key not signed by the master key is refused, and nothing is stored.
    let mut bad = body.clone();
    bad["self_signing_key"] = json!({ "user_id": alice.user, "usage": ["self_signing"], "keys": { format!("ed25519:{spub}"): spub } });
    s.err(
        "POST",
        &path,
        Some(&alice.token),
        Some(&bad),
        400,
        "M_INVALID_PARAM",
    );
    assert!(query(&s, &bob, &[&alice.user])["master_keys"][&alice.user].is_null());
    let mut bad = body.clone();
    bad["master_key"]["usage"] = json!(["self_signing"]);
    s.err(
        "POST",
        &path,
        Some(&alice.token),
        Some(&bad),
        400,
        "M_INVALID_PARAM",
    );

    // The first upload needs no auth; what others see excludes the user-signing key.
    s.ok("POST", &path, Some(&alice.token), Some(&body));
    let q = query(&s, &bob, &[&alice.user]);
    assert_eq!(
        q["master_keys"][&alice.user]["keys"][format!("ed25519:{mpub}")],
        mpub.as_str()
    );
    assert_eq!(
        q["self_signing_keys"][&alice.user]["keys"][format!("ed25519:{spub}")],
        spub.as_str()
    );
    assert!(q["user_signing_keys"][&alice.user].is_null());
    let q = query(&s, &alice, &[&alice.user]);
    assert_eq!(
        q["user_signing_keys"][&alice.user]["keys"][format!("ed25519:{upub}")],
        upub.as_str()
    );
    // The same upload again is a no-op; new keys need the password.
    s.ok("POST", &path, Some(&alice.token), Some(&body));
    let (_, body2) = cross_signing(&alice);
    let v = s.err("POST", &path, Some(&alice.token), Some(&body2), 401, "");
    assert_eq!(v["flows"][0]["stages"][0], "m.login.password");
    let mut with_auth = body2.clone();
    with_auth["auth"] = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "wrong", "session": v["session"] });
    s.err(
        "POST",
        &path,
        Some(&alice.token),
        Some(&with_auth),
        401,
        "M_FORBIDDEN",
    );
    assert_eq!(
        query(&s, &bob, &[&alice.user])["master_keys"][&alice.user]["keys"]
            [format!("ed25519:{mpub}")],
        mpub.as_str()
    );

    // Signatures: alice's device by her self-signing key, her master key by her device.
    let sig_path = format!("{V3}/keys/signatures/upload");
    let signed_device = sign(device_keys(&alice), &alice.user, &sk);
    let master = query(&s, &alice, &[&alice.user])["master_keys"][&alice.user].clone();
    let signed_master = sign(master.clone(), &alice.user, &alice.key);
    let mut forged = sign(device_keys(&alice), &alice.user, &mk); // signed by the wrong key
    forged["signatures"][&alice.user][format!("ed25519:{spub}")] =
        forged["signatures"][&alice.user][format!("ed25519:{mpub}")].clone();
    let v = s.ok(
        "POST",
        &sig_path,
        Some(&alice.token),
        Some(&json!({ &alice.user: { "ADEV": forged, "NOPE": signed_device } })),
    );
    assert_eq!(
        v["failures"][&alice.user]["ADEV"]["errcode"], "M_INVALID_SIGNATURE",
        "{v}"
    );
    assert_eq!(
        v["failures"][&alice.user]["NOPE"]["errcode"], "M_NOT_FOUND",
        "{v}"
    );
    let q = query(&s, &bob, &[&alice.user]);
    assert!(
        q["device_keys"][&alice.user]["ADEV"]["signatures"][&alice.user][format!("ed25519:{spub}")]
            .is_null()
    );
    let v = s.ok(
        "POST",
        &sig_path,
        Some(&alice.token),
        Some(&json!({ &alice.user: { "ADEV": signed_device, &mpub: signed_master } })),
    );
    assert_eq!(v["failures"], json!({}), "{v}");
    let q = query(&s, &bob, &[&alice.user]);
    assert!(
        q["device_keys"][&alice.user]["ADEV"]["signatures"][&alice.user][format!("ed25519:{spub}")]
            .is_string(),
        "{q}"
    );
    assert!(
        q["master_keys"][&alice.user]["signatures"][&alice.user]["ed25519:ADEV"].is_string(),
        "{q}"
    );

    // Bob signs alice's master key with his user-signing key: he sees it, carol does not.
    upload(&s, &bob, json!({ "device_keys": device_keys(&bob) }));
    let ([_, _, (buk, bupub)], bbody) = cross_signing(&bob);
    s.ok("POST", &path, Some(&bob.token), Some(&bbody));
    let bob_signed = sign(master, &bob.user, &buk);
    let v = s.ok(
        "POST",
        &sig_path,
        Some(&bob.token),
        Some(&json!({ &alice.user: { &mpub: bob_signed } })),
    );
    assert_eq!(v["failures"], json!({}), "{v}");
    let q = query(&s, &bob, &[&alice.user]);
    assert!(
        q["master_keys"][&alice.user]["signatures"][&bob.user][format!("ed25519:{bupub}")]
            .is_string()
    );
    let carol = new_user(&s, "carol", "CDEV");
    let q = query(&s, &carol, &[&alice.user]);
    assert!(q["master_keys"][&alice.user]["signatures"][&bob.user].is_null());

    // Replacing the keys with the password works.
    with_auth["auth"]["password"] = "pw-alice".into();
    s.ok("POST", &path, Some(&alice.token), Some(&with_auth));
    let q = query(&s, &bob, &[&alice.user]);
    assert_ne!(q["master_keys"][&alice.user]["keys"], master_keys_of(&mpub));
}

fn master_keys_of(public: &str) -> Value {
    json!({ format!("ed25519:{public}"): public })
}

fn backup_key(index: u64, forwarded: u64, verified: bool, tag: &str) -> Value {
    json!({
        "first_message_index": index, "forwarded_count": forwarded, "is_verified": verified,
        "session_data": { "ephemeral": "ZXBo", "ciphertext": tag, "mac": "bWFj" },
    })
}

#[test]
fn key_backup_versions_keys_etag_and_replace_rules() {
    let s = TestServer::start();
    let alice = new_user(&s, "alice", "ADEV");
    let t = Some(alice.token.as_str());
    s.err(
        "GET",
        &format!("{V3}/room_keys/version"),
        t,
        None,
        404,
        "M_NOT_FOUND",
    );
    let algo = json!({ "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": { "public_key": "cHVi" } });
    let v1 = s.ok("POST", &format!("{V3}/room_keys/version"), t, Some(&algo))["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let info = s.ok("GET", &format!("{V3}/room_keys/version"), t, None);
    assert_eq!(
        (info["version"].as_str(), info["count"].as_u64()),
        (Some(v1.as_str()), Some(0))
    );
    let etag0 = info["etag"].as_str().unwrap().to_owned();

    let room = "!r:hearth.test";
    let session_path = |v: &str| format!("{V3}/room_keys/keys/{}/sess1?version={v}", enc(room));
    let put = |body: Value| s.ok("PUT", &session_path(&v1), t, Some(&body));
    let r = put(backup_key(5, 1, false, "Zmlyc3Q"));
    assert_eq!(r["count"], 1);
    assert_ne!(r["etag"], etag0.as_str());
    let etag1 = r["etag"].clone();
    // Worse keys do not replace: unverified with a later index, more forwards.
    assert_eq!(put(backup_key(6, 0, false, "d29yc2U"))["etag"], etag1);
    assert_eq!(put(backup_key(5, 2, false, "d29yc2U"))["etag"], etag1);
    // Better ones do: a lower index, then a verified one even with a later index.
    let r = put(backup_key(3, 1, false, "bG93ZXI"));
    assert_ne!(r["etag"], etag1);
    put(backup_key(9, 9, true, "dmVyaWZpZWQ"));
    assert_eq!(put(backup_key(0, 0, false, "dW52ZXJpZmllZA"))["count"], 1);
    let got = s.ok("GET", &session_path(&v1), t, None);
    assert_eq!(got["session_data"]["ciphertext"], "dmVyaWZpZWQ");
    assert_eq!(got["is_verified"], true);
    let info = s.ok("GET", &format!("{V3}/room_keys/version/{v1}"), t, None);
    assert_eq!(info["count"], 1);

    // All keys at once; the per-room and full reads.
    let r = s.ok(
        "PUT",
        &format!("{V3}/room_keys/keys?version={v1}"),
        t,
        Some(&json!({ "rooms": { "!other:hearth.test": { "sessions": { "s2": backup_key(0, 0, false, "YQ"), "s3": backup_key(0, 0, false, "Yg") } } } })),
    );
    assert_eq!(r["count"], 3);
    let all = s.ok("GET", &format!("{V3}/room_keys/keys?version={v1}"), t, None);
    assert_eq!(all["rooms"].as_object().unwrap().len(), 2);
    let one = s.ok(
        "GET",
        &format!(
            "{V3}/room_keys/keys/{}?version={v1}",
            enc("!other:hearth.test")
        ),
        t,
        None,
    );
    assert_eq!(one["sessions"].as_object().unwrap().len(), 2);
    let none = s.ok(
        "GET",
        &format!(
            "{V3}/room_keys/keys/{}?version={v1}",
            enc("!none:hearth.test")
        ),
        t,
        None,
    );
    assert_eq!(none, json!({ "sessions": {} }));
    s.err(
        "GET",
        &format!("{V3}/room_keys/keys/{}/nope?version={v1}", enc(room)),
        t,
        None,
        404,
        "M_NOT_FOUND",
    );

    // Bad input stores nothing.
    s.err("PUT", &session_path(&v1), t, Some(&json!({ "first_message_index": 0, "forwarded_count": 0, "is_verified": "yes", "session_data": {} })), 400, "M_INVALID_PARAM");
    s.err(
        "PUT",
        &session_path("42"),
        t,
        Some(&backup_key(0, 0, true, "eA")),
        404,
        "M_NOT_FOUND",
    );
    s.err(
        "PUT",
        &session_path("abc"),
        t,
        Some(&backup_key(0, 0, true, "eA")),
        404,
        "M_NOT_FOUND",
    );
    assert_eq!(
        s.ok("GET", &format!("{V3}/room_keys/version/{v1}"), t, None)["count"],
        3
    );

    // A new version makes the old one wrong for uploads.
    let v2 = s.ok("POST", &format!("{V3}/room_keys/version"), t, Some(&algo))["version"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(v1, v2);
    let e = s.err(
        "PUT",
        &session_path(&v1),
        t,
        Some(&backup_key(0, 0, true, "eA")),
        403,
        "M_WRONG_ROOM_KEYS_VERSION",
    );
    assert_eq!(e["current_version"], v2.as_str());
    // Update: same algorithm only, body version must match.
    let mut upd = algo.clone();
    upd["auth_data"]["public_key"] = "bmV3".into();
    s.ok(
        "PUT",
        &format!("{V3}/room_keys/version/{v2}"),
        t,
        Some(&upd),
    );
    assert_eq!(
        s.ok("GET", &format!("{V3}/room_keys/version"), t, None)["auth_data"]["public_key"],
        "bmV3"
    );
    upd["version"] = "999".into();
    s.err(
        "PUT",
        &format!("{V3}/room_keys/version/{v2}"),
        t,
        Some(&upd),
        400,
        "M_INVALID_PARAM",
    );
    let mut other = algo.clone();
    other["algorithm"] = "org.example.other".into();
    s.err(
        "PUT",
        &format!("{V3}/room_keys/version/{v2}"),
        t,
        Some(&other),
        400,
        "M_INVALID_PARAM",
    );
    // Deleting keys moves the etag; deleting a version drops it and its keys.
    let before = s.ok("GET", &format!("{V3}/room_keys/version/{v1}"), t, None);
    let d = s.ok(
        "DELETE",
        &format!(
            "{V3}/room_keys/keys/{}?version={v1}",
            enc("!other:hearth.test")
        ),
        t,
        None,
    );
    assert_eq!(d["count"], 1);
    assert_ne!(d["etag"], before["etag"]);
    s.ok("DELETE", &format!("{V3}/room_keys/version/{v2}"), t, None);
    s.err(
        "GET",
        &format!("{V3}/room_keys/version/{v2}"),
        t,
        None,
        404,
        "M_NOT_FOUND",
    );
    assert_eq!(
        s.ok("GET", &format!("{V3}/room_keys/version"), t, None)["version"],
        v1.as_str()
    );
    s.err(
        "DELETE",
        &format!("{V3}/room_keys/version/{v2}"),
        t,
        None,
        404,
        "M_NOT_FOUND",
    );
    // Another user sees none of it.
    let bob = new_user(&s, "bob", "BDEV");
    s.err(
        "GET",
        &format!("{V3}/room_keys/version/{v1}"),
        Some(&bob.token),
        None,
        404,
        "M_NOT_FOUND",
    );
}

#[test]
fn a_version_2_database_gets_the_e2ee_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hearth.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(include_str!("fixtures/schema-v2.sql"))
            .unwrap();
        conn.execute_batch(
            "INSERT INTO meta (key, value) VALUES ('schema_version', '2');
             INSERT INTO account_data (user_id, room_id, type, content, pos) VALUES ('@a:x', '', 't', '{}', 41);",
        )
        .unwrap();
        hearth::store::migrate::migrate(&mut rusqlite::Connection::open(&path).unwrap()).unwrap();
    }
    let tables = |c: &rusqlite::Connection| -> Vec<(String, String)> {
        c.prepare("SELECT type, name FROM sqlite_master WHERE name LIKE 'e2e%' ORDER BY name")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    let upgraded = rusqlite::Connection::open(&path).unwrap();
    let mut fresh = rusqlite::Connection::open_in_memory().unwrap();
    hearth::store::migrate::migrate(&mut fresh).unwrap();
    assert!(!tables(&upgraded).is_empty());
    assert_eq!(tables(&upgraded), tables(&fresh));
    let (v, ad): (String, i64) = upgraded
        .query_row(
            "SELECT (SELECT value FROM meta WHERE key = 'schema_version'), (SELECT pos FROM account_data)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (v.as_str(), ad),
        (
            hearth::store::migrate::SCHEMA_VERSION.to_string().as_str(),
            41
        )
    );
}

/// Bad input on every E2EE route: malformed IDs, wrong JSON types and shapes (keys that are not
/// objects, signatures that are not strings, floats, unknown versions). Each answer is a Matrix
/// error or a success, never a 500, and the server keeps serving.
#[test]
fn malformed_e2ee_requests_get_matrix_errors_never_500() {
    let s = TestServer::start();
    let alice = new_user(&s, "alice", "ADEV");
    upload(&s, &alice, json!({ "device_keys": device_keys(&alice) }));
    let bodies = [
        "",
        "not json",
        "[]",
        "{\"device_keys\": 5, \"one_time_keys\": [], \"fallback_keys\": {\"x\": 1}}",
        "{\"one_time_keys\": {\"signed_curve25519:A\": {\"key\": 1, \"signatures\": \"x\"}}}",
        "{\"one_time_keys\": {\"@u:x\": {\"D\": \"signed_curve25519\"}}, \"device_keys\": {\"@u:x\": \"all\"}}",
        "{\"master_key\": {\"user_id\": 1}, \"self_signing_key\": [], \"auth\": 5}",
        "{\"@alice:hearth.test\": {\"ADEV\": {\"signatures\": 1.5}, \"x\": 3}}",
        "{\"messages\": {\"@u:hearth.test\": {\"*\": []}}}",
        "{\"algorithm\": 5, \"auth_data\": [], \"version\": 3}",
        "{\"rooms\": {\"!r:x\": {\"sessions\": {\"s\": {\"first_message_index\": -1}}}}}",
        "{\"first_message_index\": 1.5, \"forwarded_count\": \"0\", \"is_verified\": 1, \"session_data\": 2}",
    ];
    let ids = [
        "",
        "%00",
        "not-an-id",
        "%21x%3Ay",
        "1",
        "99999999999999999999",
        "..",
        "%ZZ",
    ];
    let templates = [
        ("POST", "/keys/upload"),
        ("POST", "/keys/query"),
        ("POST", "/keys/claim"),
        ("GET", "/keys/changes?from={id}&to={id}"),
        ("POST", "/keys/device_signing/upload"),
        ("POST", "/keys/signatures/upload"),
        ("PUT", "/sendToDevice/{id}/{id}"),
        ("POST", "/room_keys/version"),
        ("GET", "/room_keys/version"),
        ("GET", "/room_keys/version/{id}"),
        ("PUT", "/room_keys/version/{id}"),
        ("DELETE", "/room_keys/version/{id}"),
        ("GET", "/room_keys/keys?version={id}"),
        ("PUT", "/room_keys/keys?version={id}"),
        ("DELETE", "/room_keys/keys?version={id}"),
        ("GET", "/room_keys/keys/{id}?version={id}"),
        ("PUT", "/room_keys/keys/{id}/{id}?version={id}"),
        ("DELETE", "/room_keys/keys/{id}/{id}?version={id}"),
        ("GET", "/sync?since={id}"),
    ];
    for (method, t) in templates {
        for id in ids {
            let path = format!("{V3}{}", t.replace("{id}", id));
            for body in bodies {
                let body = (!(body.is_empty() && method == "GET")).then_some(body);
                let (status, v) = s.raw(method, &path, Some(&alice.token), body);
                assert!(status < 500, "{method} {path} {body:?} -> {status} {v}");
                if status >= 400 && !(status == 401 && v["flows"].is_array()) {
                    assert!(
                        v["errcode"].as_str().is_some_and(|c| c.starts_with("M_")),
                        "{method} {path} {body:?} -> {status} {v}"
                    );
                }
            }
        }
    }
    // Still serving, and alice's keys are as uploaded.
    let q = query(&s, &alice, &[&alice.user]);
    assert_eq!(
        q["device_keys"][&alice.user]["ADEV"]["keys"]["ed25519:ADEV"],
        alice.ed.as_str()
    );
}

/// Acknowledged to-device messages are deleted, but their positions are never handed out again:
/// after a restart, a message sent to a device whose token is at the deleted position's value
/// still reaches it (a reused position would be skipped as already seen).
#[test]
fn positions_of_deleted_to_device_messages_are_not_reused_after_a_restart() {
    let mut s = TestServer::start();
    let alice = new_user(&s, "alice", "ADEV");
    let bob = new_user(&s, "bob", "BDEV");
    let send = |s: &TestServer, txn: &str, n: u64| {
        s.ok(
            "PUT",
            &format!("{V3}/sendToDevice/m.test/{txn}"),
            Some(&alice.token),
            Some(&json!({ "messages": { &bob.user: { "BDEV": { "n": n } } } })),
        );
    };
    let t0 = since(&s.sync(&bob.token, ""));
    send(&s, "a", 1);
    let first = s.sync(&bob.token, &format!("since={t0}"));
    assert_eq!(first["to_device"]["events"][0]["content"]["n"], 1);
    let t1 = since(&first);
    // Acknowledges (and deletes) the message: the newest position of all.
    s.sync(&bob.token, &format!("since={t1}"));
    if let Some(hs) = s.hs.take() {
        hs.stop().unwrap();
    }
    let hs = hearth::Homeserver::start(common::config_in(s.dir.path())).unwrap();
    s.base = format!("http://{}", hs.addrs()[0]);
    s.hs = Some(hs);
    send(&s, "b", 2);
    let after = s.sync(&bob.token, &format!("since={t1}"));
    assert_eq!(
        after["to_device"]["events"][0]["content"]["n"], 2,
        "{after}"
    );
}
