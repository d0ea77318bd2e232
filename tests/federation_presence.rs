//! Presence across servers, against a real Synapse 1.163 (`../shared/synapse-peer/`, which
//! has presence on, Synapse's default): a Hearth user's presence and status message reach a
//! Synapse user's `/sync` in `m.presence` EDUs, and a Synapse user's reach the Hearth user's.

mod common;

use common::{
    fed::{curl, register, Hearth},
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
