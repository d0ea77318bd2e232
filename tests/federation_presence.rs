//! Presence across servers, against a real Synapse 1.163 (`../shared/synapse-peer/`, which
//! has presence on, Synapse's default): a Hearth user's presence and status message reach a
//! Synapse user's `/sync` in `m.presence` EDUs, and a Synapse user's reach the Hearth user's.

mod common;

use common::{
    fed::{create_public_room, curl, register, Hearth},
    synapse::{eventually, PerFile, Synapse},
};
use serde_json::{json, Value};

/// This file's Synapse: the one `scripts/test.sh` started, or one of its own.
static SYNAPSE: PerFile = PerFile::new(TESTS, || {
    std::env::var("HEARTH_TEST_SYNAPSE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .map_or_else(Synapse::start, Synapse::shared)
});

/// Tests in this file that take a turn with the Synapse: bump it when adding one.
const TESTS: usize = 1;

/// The content of the last `m.presence` event about `user` in a sync response.
fn presence_of(sync: &Value, user: &str) -> Option<Value> {
    sync["presence"]["events"]
        .as_array()?
        .iter()
        .filter(|e| e["type"] == "m.presence" && e["sender"] == user)
        .map(|e| e["content"].clone())
        .next_back()
}

/// Syncs `token` on `base` from `since` until `want` holds for `user`'s presence.
fn wait_for_presence(
    base: &str,
    token: &str,
    since: &mut Option<String>,
    user: &str,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    eventually(40, what, || {
        let q = match since.as_deref() {
            Some(s) => format!("since={s}&timeout=2000"),
            None => "timeout=0".to_owned(),
        };
        let (status, v) = curl(
            "GET",
            &format!("{base}/_matrix/client/v3/sync?{q}"),
            Some(token),
            None,
        );
        assert_eq!(status, 200, "{v}");
        if let Some(n) = v["next_batch"].as_str() {
            *since = Some(n.to_owned());
        }
        presence_of(&v, user).filter(|p| want(p))
    })
}

fn put_status(base: &str, user: &str, token: &str, body: Value) {
    let (s, v) = curl(
        "PUT",
        &format!(
            "{base}/_matrix/client/v3/presence/{}/status",
            common::enc(user)
        ),
        Some(token),
        Some(&body),
    );
    assert_eq!(s, 200, "{v}");
}

#[test]
fn presence_flows_both_ways_with_synapse() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (alice, alice_tok) = register(&hearth.url(), "pres_alice");
    let (carol, carol_tok) = register(&syn.url(), "pres_carol");
    let room: ruma::OwnedRoomId = syn
        .create_public_room(&carol_tok)
        .as_str()
        .try_into()
        .unwrap();
    let user: ruma::OwnedUserId = alice.as_str().try_into().unwrap();
    let via: ruma::OwnedServerName = syn.server_name().as_str().try_into().unwrap();
    smol::block_on(hearth::ops::federation::join_remote(
        hearth.hs.app(),
        &user,
        &room,
        &[via],
    ))
    .expect("joined through Synapse");

    // Hearth → Synapse: alice's first sync makes her online; her status message follows (in
    // a later EDU: at most one per user per 10 s).
    let mut carol_since = None;
    let mut alice_since = None;
    let (s, _) = curl(
        "GET",
        &format!("{}/_matrix/client/v3/sync?timeout=0", hearth.url()),
        Some(&alice_tok),
        None,
    );
    assert_eq!(s, 200);
    wait_for_presence(
        &syn.url(),
        &carol_tok,
        &mut carol_since,
        &alice,
        "alice online reaches carol on Synapse",
        |p| p["presence"] == "online",
    );
    put_status(
        &hearth.url(),
        &alice,
        &alice_tok,
        json!({ "presence": "online", "status_msg": "from Hearth" }),
    );
    wait_for_presence(
        &syn.url(),
        &carol_tok,
        &mut carol_since,
        &alice,
        "alice's status message reaches Synapse",
        |p| p["status_msg"] == "from Hearth",
    );

    // Synapse → Hearth: carol (syncing above, so online) sets a status message.
    put_status(
        &syn.url(),
        &carol,
        &carol_tok,
        json!({ "presence": "online", "status_msg": "from Synapse" }),
    );
    let p = wait_for_presence(
        &hearth.url(),
        &alice_tok,
        &mut alice_since,
        &carol,
        "carol's presence reaches alice on Hearth",
        |p| p["status_msg"] == "from Synapse",
    );
    assert_eq!(p["presence"], "online", "{p}");
    let (s, got) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/presence/{}/status",
            hearth.url(),
            common::enc(&carol)
        ),
        Some(&alice_tok),
        None,
    );
    assert_eq!((s, got["status_msg"].as_str()), (200, Some("from Synapse")));
    hearth.hs.stop().unwrap();
}

/// Rows still queued in `hearth`'s outbox for `dest`.
fn queued_for(hearth: &Hearth, dest: &str) -> i64 {
    let dest = dest.to_owned();
    smol::block_on(hearth.hs.app().store.read(move |c| {
        Ok(c.query_row(
            "SELECT count(*) FROM outbox WHERE destination = ?1",
            [dest],
            |r| r.get::<_, i64>(0),
        )?)
    }))
    .unwrap()
}

/// Three Hearths in one room, the second with `[presence] enabled = false`: alice's presence
/// reaches carol on the third, while the second, which received the same EDU, shows bob
/// nothing, says alice is offline, and sends nothing about bob.
#[test]
fn a_server_with_presence_disabled_ignores_presence_edus_and_sends_none() {
    let a = Hearth::start();
    let b = Hearth::start_with("127.0.0.1", |c| c.presence.enabled = false);
    let c = Hearth::start();
    let (alice, alice_tok) = register(&a.url(), "alice");
    let (bob, bob_tok) = register(&b.url(), "bob");
    let (carol, carol_tok) = register(&c.url(), "carol");
    let room = create_public_room(&a.url(), &alice_tok, None);
    let room: ruma::OwnedRoomId = room.as_str().try_into().unwrap();
    let via: ruma::OwnedServerName = a.server_name().as_str().try_into().unwrap();
    for (h, user) in [(&b, &bob), (&c, &carol)] {
        let user: ruma::OwnedUserId = user.as_str().try_into().unwrap();
        smol::block_on(hearth::ops::federation::join_remote(
            h.hs.app(),
            &user,
            &room,
            std::slice::from_ref(&via),
        ))
        .expect("joined through alice's server");
    }
    let mut carol_since = None;
    put_status(
        &a.url(),
        &alice,
        &alice_tok,
        json!({ "presence": "online", "status_msg": "from a" }),
    );
    wait_for_presence(
        &c.url(),
        &carol_tok,
        &mut carol_since,
        &alice,
        "alice's presence reaches carol",
        |p| p["status_msg"] == "from a",
    );
    // The same EDU reached b (its outbox rows are gone only after b's 200)...
    eventually(30, "a's outbox to b drains", || {
        (queued_for(&a, &b.server_name()) == 0).then_some(())
    });
    // ...which kept nothing.
    let (_, v) = curl(
        "GET",
        &format!("{}/_matrix/client/v3/sync?timeout=0", b.url()),
        Some(&bob_tok),
        None,
    );
    assert_eq!(v["presence"]["events"], json!([]), "{v}");
    let (s, got) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/presence/{}/status",
            b.url(),
            common::enc(&alice)
        ),
        Some(&bob_tok),
        None,
    );
    assert_eq!((s, got), (200, json!({ "presence": "offline" })));
    // bob sets a status on b: nothing is queued for a or c (an enabled server queues it
    // within milliseconds), and alice never hears of it.
    put_status(
        &b.url(),
        &bob,
        &bob_tok,
        json!({ "presence": "online", "status_msg": "from b" }),
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(queued_for(&b, &a.server_name()), 0);
    assert_eq!(queued_for(&b, &c.server_name()), 0);
    let (_, v) = curl(
        "GET",
        &format!("{}/_matrix/client/v3/sync?timeout=0", a.url()),
        Some(&alice_tok),
        None,
    );
    assert!(presence_of(&v, &bob).is_none(), "{v}");
}
