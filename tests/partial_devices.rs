//! Device-list tracking for remote members while a room is partial-state: a device-list
//! update from a server in the room is kept although the member is not known yet, and once
//! the resync completes the room the members it adds are in the local members'
//! `device_lists.changed` and their keys can be queried.
//!
//! Keeping a room partial long enough is not deterministic with a real partial join (the
//! resync starts as soon as the join commits: see tests/partial.rs), so `b` joins with full
//! state and the test puts it back in the state a partial join leaves: the room listed as
//! partial (the resync not woken yet) and a remote member's membership unknown. The resync
//! that completes it is the real one, woken by the test.

mod common;

use common::{
    enc,
    fed::{curl, register, Hearth},
    synapse::eventually,
};
use ruma::{
    serde::{base64::Standard, Base64},
    signatures::{sign_json, Ed25519KeyPair},
    CanonicalJsonObject,
};
use serde_json::{json, Value};

fn device_of(base: &str, tok: &str) -> String {
    let (_, who) = curl(
        "GET",
        &format!("{base}/_matrix/client/v3/account/whoami"),
        Some(tok),
        None,
    );
    who["device_id"].as_str().unwrap().to_owned()
}

/// Uploads signed device keys for `tok`'s device (user `user` at `base`); returns them.
fn upload_device_keys(base: &str, user: &str, tok: &str) -> Value {
    let device = device_of(base, tok);
    let doc = Ed25519KeyPair::generate();
    let key = Ed25519KeyPair::from_der(&doc, device.clone()).unwrap();
    let ed = Base64::<Standard, _>::new(key.public_key().to_vec()).encode();
    let mut keys: CanonicalJsonObject = serde_json::from_value(json!({
        "user_id": user, "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": { format!("curve25519:{device}"): "Y3VydmUyNTUxOWtleQ", format!("ed25519:{device}"): ed },
    }))
    .unwrap();
    sign_json(user, &key, &mut keys).unwrap();
    let keys = serde_json::to_value(keys).unwrap();
    let (s, v) = curl(
        "POST",
        &format!("{base}/_matrix/client/v3/keys/upload"),
        Some(tok),
        Some(&json!({ "device_keys": keys })),
    );
    assert_eq!(s, 200, "{v}");
    keys
}

/// Runs a read on `h`'s store.
fn read<T: Send + 'static>(
    h: &Hearth,
    f: impl FnOnce(&hearth::store::Connection) -> hearth::error::Result<T> + Send + 'static,
) -> T {
    smol::block_on(h.hs.app().store.read(f)).unwrap()
}

#[test]
fn device_updates_are_kept_while_partial_and_resynced_members_are_announced() {
    let a = Hearth::start();
    let b = Hearth::start_with("127.0.0.1", |c| c.federation.partial_joins = false);
    let (_, alice_tok) = register(&a.url(), "alice");
    let (mallory, mallory_tok) = register(&a.url(), "mallory");
    let (bob, bob_tok) = register(&b.url(), "bob");
    let room = common::fed::create_public_room(&a.url(), &alice_tok, Some("10"));
    let join = |base: &str, tok: &str| {
        let (s, v) = curl(
            "POST",
            &format!(
                "{base}/_matrix/client/v3/join/{}?server_name={}",
                enc(&room),
                enc(&a.server_name())
            ),
            Some(tok),
            Some(&json!({})),
        );
        assert_eq!(s, 200, "{v}");
    };
    join(&a.url(), &mallory_tok);
    join(&b.url(), &bob_tok);

    // b as a partial join leaves it: the room partial, mallory's membership unknown.
    let (r, bob_id, a_name, m) = (room.clone(), bob.clone(), a.server_name(), mallory.clone());
    smol::block_on(b.hs.app().store.write(move |tx| {
        use hearth::store::{partial as p, queries as q};
        let join_id = q::get_current_state(tx, &r, "m.room.member", &bob_id)?.expect("bob joined");
        let partial = p::PartialRoom {
            room_id: r.clone(),
            join_event_id: join_id,
            joined_via: a_name.clone(),
        };
        p::insert_partial_state_room(tx, &partial, tx.now_ms as i64, &[a_name])?;
        tx.execute(
            "DELETE FROM current_state WHERE room_id = ?1 AND type = 'm.room.member' AND state_key = ?2",
            [&r, &m],
        )
        .map_err(hearth::error::Error::internal)?;
        Ok(())
    }))
    .unwrap();
    let lazy = enc(r#"{"room":{"state":{"lazy_load_members":true}}}"#);
    let sync = |query: &str| {
        let (s, v) = curl(
            "GET",
            &format!("{}/_matrix/client/v3/sync?{query}", b.url()),
            Some(&bob_tok),
            None,
        );
        assert_eq!(s, 200, "{v}");
        v
    };
    let since = sync(&format!("timeout=0&filter={lazy}"))["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();

    // Mallory's new device reaches b as an `m.device_list_update` from a: kept, although b
    // does not know mallory is in the room.
    let keys = upload_device_keys(&a.url(), &mallory, &mallory_tok);
    let m = mallory.clone();
    eventually(30, "b keeps mallory's device-list update", || {
        let m = m.clone();
        read(&b, move |c| {
            c.query_row(
                "SELECT count(*) FROM e2e_device_list_changes WHERE user_id = ?1",
                [&m],
                |r| r.get::<_, i64>(0),
            )
            .map_err(hearth::error::Error::internal)
        })
        .gt(&0)
        .then_some(())
    });
    let changed = |v: &Value| -> bool {
        v["device_lists"]["changed"]
            .as_array()
            .is_some_and(|c| c.iter().any(|u| u == mallory.as_str()))
    };
    // Still partial: mallory is not known to share a room with bob.
    assert!(!changed(&sync(&format!(
        "since={since}&timeout=0&filter={lazy}"
    ))));

    // The resync completes the room: mallory is back among the members, in bob's
    // `device_lists.changed`, and her keys can be queried.
    smol::block_on(b.hs.app().store.write(|tx| {
        tx.wake(hearth::notify::Topic::PartialStateResync);
        Ok(())
    }))
    .unwrap();
    let r = room.clone();
    eventually(30, "the resync completes the room", || {
        let r = r.clone();
        (!read(&b, move |c| {
            hearth::store::partial::is_partial_state_room(c, &r)
        }))
        .then_some(())
    });
    let v = sync(&format!("since={since}&timeout=0&filter={lazy}"));
    assert!(changed(&v), "{v}");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/keys/query", b.url()),
        Some(&bob_tok),
        Some(&json!({ "device_keys": { mallory.clone(): [] } })),
    );
    assert_eq!(s, 200, "{v}");
    let device = keys["device_id"].as_str().unwrap();
    assert_eq!(v["device_keys"][&mallory][device], keys, "{v}");
}
