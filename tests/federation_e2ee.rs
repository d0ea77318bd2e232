//! End-to-end keys across servers, between two Hearths (TLS, IP-literal names): a user's
//! device keys and one-time keys reach a user of another server through `/keys/query` and
//! `/keys/claim` (federation's `/user/keys/query` and `/user/keys/claim`), and
//! `/user/devices` lists a user's devices for other servers.

mod common;

use common::fed::{curl, register, Hearth};
use ruma::{
    api::federation::device::get_devices::v1 as devices,
    serde::{base64::Standard, Base64},
    signatures::{sign_json, Ed25519KeyPair},
    CanonicalJsonObject, OwnedServerName, OwnedUserId,
};
use serde_json::{json, Value};

fn sign(v: Value, signer: &str, key: &Ed25519KeyPair) -> Value {
    let mut o: CanonicalJsonObject = serde_json::from_value(v).unwrap();
    sign_json(signer, key, &mut o).unwrap();
    serde_json::to_value(o).unwrap()
}

/// The device ID of a token's device.
fn device_of(base: &str, tok: &str) -> String {
    let (_, who) = curl(
        "GET",
        &format!("{base}/_matrix/client/v3/account/whoami"),
        Some(tok),
        None,
    );
    who["device_id"].as_str().unwrap().to_owned()
}

/// A signing key for `device` (key ID `ed25519:<device>`) and its public half.
fn device_key(device: &str) -> (Ed25519KeyPair, String) {
    let doc = Ed25519KeyPair::generate();
    let key = Ed25519KeyPair::from_der(&doc, device.to_owned()).unwrap();
    let ed = Base64::<Standard, _>::new(key.public_key().to_vec()).encode();
    (key, ed)
}

#[test]
fn device_and_one_time_keys_cross_servers() {
    let a = Hearth::start();
    let b = Hearth::start();
    let (alice, alice_tok) = register(&a.url(), "alice");
    let (_bob, bob_tok) = register(&b.url(), "bob");
    let device = device_of(&a.url(), &alice_tok);
    let (key, ed) = device_key(&device);
    let device_keys = sign(
        json!({
            "user_id": alice, "device_id": device,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": { format!("curve25519:{device}"): "Y3VydmUyNTUxOWtleQ", format!("ed25519:{device}"): ed },
        }),
        &alice,
        &key,
    );
    let otk = sign(json!({ "key": "b3RrLWtleS0wMDAx" }), &alice, &key);
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/keys/upload", a.url()),
        Some(&alice_tok),
        Some(
            &json!({ "device_keys": device_keys, "one_time_keys": { "signed_curve25519:K1": otk } }),
        ),
    );
    assert_eq!(s, 200, "{v}");

    // Bob, on the other server, queries alice's keys: his server asks hers.
    let gone = "@carol:127.0.0.1:1";
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/keys/query", b.url()),
        Some(&bob_tok),
        Some(&json!({ "device_keys": { alice.clone(): [], gone: [] } })),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["device_keys"][&alice][&device], device_keys,
        "the keys as alice signed them: {v}"
    );
    assert!(
        v["failures"].get("127.0.0.1:1").is_some(),
        "an unreachable server is a failure, not an error: {v}"
    );

    // Claiming: the one-time key once, then nothing (no fallback key was uploaded).
    let claim = || {
        curl(
            "POST",
            &format!("{}/_matrix/client/v3/keys/claim", b.url()),
            Some(&bob_tok),
            Some(
                &json!({ "one_time_keys": { alice.clone(): { device.clone(): "signed_curve25519" } } }),
            ),
        )
    };
    let (s, v) = claim();
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["one_time_keys"][&alice][&device]["signed_curve25519:K1"], otk,
        "{v}"
    );
    let (s, v) = claim();
    assert_eq!(s, 200, "{v}");
    assert!(
        v["one_time_keys"].get(&alice).is_none(),
        "a one-time key is handed out once: {v}"
    );

    // `/user/devices`, as another server asks it (signed by b).
    let user: OwnedUserId = alice.parse().unwrap();
    let dest: OwnedServerName = a.server_name().parse().unwrap();
    let app = b.hs.app().clone();
    let res = smol::block_on(
        app.fed
            .client
            .send(&dest, devices::Request::new(user.clone())),
    )
    .expect("/user/devices answers");
    assert_eq!(res.user_id, user);
    assert_eq!(res.devices.len(), 1);
    assert_eq!(res.devices[0].device_id.as_str(), device);
    let keys: Value = serde_json::from_str(res.devices[0].keys.json().get()).unwrap();
    assert_eq!(keys, device_keys);
    assert!(
        u64::from(res.stream_id) > 0,
        "the device list has changed at least once"
    );
    // Not a user of that server: refused.
    let other: OwnedUserId = format!("@x:{}", b.server_name()).parse().unwrap();
    let err = smol::block_on(app.fed.client.send(&dest, devices::Request::new(other)));
    assert!(err.is_err());
}

fn to_device_events(base: &str, tok: &str, since: Option<&str>) -> (Vec<Value>, String) {
    let q = match since {
        Some(s) => format!("?since={s}&timeout=0"),
        None => "?timeout=0".to_owned(),
    };
    let (s, v) = curl(
        "GET",
        &format!("{base}/_matrix/client/v3/sync{q}"),
        Some(tok),
        None,
    );
    assert_eq!(s, 200, "{v}");
    (
        v["to_device"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        v["next_batch"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn to_device_messages_cross_servers_once() {
    let a = Hearth::start();
    let b = Hearth::start();
    let (alice, alice_tok) = register(&a.url(), "alice");
    let (bob, bob_tok) = register(&b.url(), "bob");
    let (_, since) = to_device_events(&b.url(), &bob_tok, None);
    let bob_device = device_of(&b.url(), &bob_tok);
    let send = |txn: &str, device: &str, n: u32| {
        let (s, v) = curl(
            "PUT",
            &format!(
                "{}/_matrix/client/v3/sendToDevice/m.room_key_request/{txn}",
                a.url()
            ),
            Some(&alice_tok),
            Some(&json!({ "messages": { bob.clone(): { device: { "n": n } } } })),
        );
        assert_eq!(s, 200, "{v}");
    };
    send("t1", &bob_device, 1);
    send("t1", &bob_device, 1); // a retry: delivered once
    send("t2", "*", 2);
    let mut got = Vec::new();
    let mut since = since;
    for _ in 0..100 {
        let (events, next) = to_device_events(&b.url(), &bob_tok, Some(&since));
        since = next;
        got.extend(events);
        if got.len() >= 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (late, _) = to_device_events(&b.url(), &bob_tok, Some(&since));
    got.extend(late);
    let ns: Vec<u64> = got
        .iter()
        .map(|e| e["content"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, vec![1, 2], "each message once, in order: {got:?}");
    for e in &got {
        assert_eq!(e["sender"], alice);
        assert_eq!(e["type"], "m.room_key_request");
    }
}

#[test]
fn a_device_list_change_reaches_users_of_other_servers_sharing_a_room() {
    let a = Hearth::start();
    let b = Hearth::start();
    let (alice, alice_tok) = register(&a.url(), "alice");
    let (_bob, bob_tok) = register(&b.url(), "bob");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", a.url()),
        Some(&alice_tok),
        Some(&json!({ "preset": "public_chat" })),
    );
    assert_eq!(s, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/join/{}", b.url(), common::enc(&room)),
        Some(&bob_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{v}");
    let sync = |since: &str| {
        let (s, v) = curl(
            "GET",
            &format!("{}/_matrix/client/v3/sync?since={since}&timeout=0", b.url()),
            Some(&bob_tok),
            None,
        );
        assert_eq!(s, 200, "{v}");
        v
    };
    let (_, first) = to_device_events(&b.url(), &bob_tok, None);
    // Let the join settle, then start from a fresh token.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let since = sync(&first)["next_batch"].as_str().unwrap().to_owned();

    // Alice uploads device keys on her server.
    let device = device_of(&a.url(), &alice_tok);
    let (key, ed) = device_key(&device);
    let keys = sign(
        json!({ "user_id": alice, "device_id": device, "algorithms": ["m.megolm.v1.aes-sha2"],
                "keys": { format!("ed25519:{device}"): ed } }),
        &alice,
        &key,
    );
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/keys/upload", a.url()),
        Some(&alice_tok),
        Some(&json!({ "device_keys": keys })),
    );
    assert_eq!(s, 200, "{v}");
    let mut seen = false;
    for _ in 0..100 {
        let v = sync(&since);
        let changed = v["device_lists"]["changed"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if changed.iter().any(|u| u == &json!(alice)) {
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(seen, "bob's sync names alice in device_lists.changed");
}
