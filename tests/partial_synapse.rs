//! Partial-state joins against a real Synapse 1.163, which joins with `omit_members=true` by
//! default: Synapse joins a Hearth room, takes Hearth's partial answer, resyncs the full state
//! from Hearth (`/state_ids`, `/state`, `/event`) and ends with Hearth's member list.

mod common;

use std::collections::BTreeMap;

use common::{
    fed::{curl, curl_command, register, Hearth},
    synapse::{eventually, PerFile, Synapse},
};
use serde_json::{json, Value};

/// The Synapse this file's tests share (see `tests/federation_synapse.rs`).
static SYNAPSE: PerFile = PerFile::new(TESTS, || {
    std::env::var("HEARTH_TEST_SYNAPSE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .map_or_else(Synapse::start, Synapse::shared)
});

/// Tests in this file that take a turn with the Synapse: bump it when adding one.
const TESTS: usize = 1;

fn metric(hearth: &Hearth, name: &str) -> String {
    let out = curl_command("GET", None)
        .arg(format!("{}/_hearth/metrics", hearth.url()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_default()
        .to_owned()
}

/// `/joined_members` of a room as `token`'s user sees it on `base`: user ID → display name.
fn joined_members(base: &str, token: &str, room: &str) -> Option<BTreeMap<String, Value>> {
    let (s, v) = curl(
        "GET",
        &format!(
            "{base}/_matrix/client/v3/rooms/{}/joined_members",
            common::enc(room)
        ),
        Some(token),
        None,
    );
    (s == 200).then(|| {
        v["joined"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v["display_name"].clone()))
            .collect()
    })
}

/// `/members` of a room on `base`: user ID → membership.
fn memberships(base: &str, token: &str, room: &str) -> Option<BTreeMap<String, String>> {
    let (s, v) = curl(
        "GET",
        &format!(
            "{base}/_matrix/client/v3/rooms/{}/members",
            common::enc(room)
        ),
        Some(token),
        None,
    );
    (s == 200).then(|| {
        v["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["state_key"].as_str().unwrap().to_owned(),
                    e["content"]["membership"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    })
}

fn post(base: &str, path: &str, token: &str, body: Value) -> Value {
    let (s, v) = curl("POST", &format!("{base}{path}"), Some(token), Some(&body));
    assert_eq!(s, 200, "POST {path}: {v}");
    v
}

#[test]
fn synapse_joins_a_hearth_room_with_partial_state_and_resyncs_the_members() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let h = hearth.url();
    let (_, alice_tok) = register(&h, "alice");
    let room = post(
        &h,
        "/_matrix/client/v3/createRoom",
        &alice_tok,
        json!({ "preset": "public_chat", "name": "Partial room" }),
    )["room_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let join_path = format!("/_matrix/client/v3/join/{}", common::enc(&room));
    // A dozen members with display names, one who left, one invited: none of them is in the
    // partial answer (the room has a name), so Synapse can only learn them by its resync.
    let mut tokens = Vec::new();
    for i in 0..12 {
        let (u, tok) = register(&h, &format!("member{i:02}"));
        let (s, v) = curl(
            "PUT",
            &format!("{h}/_matrix/client/v3/profile/{u}/displayname"),
            Some(&tok),
            Some(&json!({ "displayname": format!("Member {i}") })),
        );
        assert_eq!(s, 200, "{v}");
        post(&h, &join_path, &tok, json!({}));
        tokens.push(tok);
    }
    post(
        &h,
        &format!("/_matrix/client/v3/rooms/{}/leave", common::enc(&room)),
        &tokens[11],
        json!({}),
    );
    let (invited, _) = register(&h, "invited");
    post(
        &h,
        &format!("/_matrix/client/v3/rooms/{}/invite", common::enc(&room)),
        &alice_tok,
        json!({ "user_id": invited }),
    );

    let (bob, bob_tok) = register(&syn.url(), "bob_partial");
    let (s, v) = curl(
        "POST",
        &format!(
            "{}{join_path}?server_name={}",
            syn.url(),
            common::enc(&hearth.server_name())
        ),
        Some(&bob_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "Synapse could not join the Hearth room: {v}");
    // Synapse asked for, and was given, partial state.
    assert_eq!(
        metric(&hearth, "hearth_federation_partial_send_joins_total"),
        "hearth_federation_partial_send_joins_total 1"
    );
    // The room goes on while Synapse resyncs: one more member joins on Hearth.
    let (_, late_tok) = register(&h, "late");
    post(&h, &join_path, &late_tok, json!({}));

    // Synapse answers /joined_members and /members once its resync is done; they end equal
    // to Hearth's (bob included on both sides).
    let ours = eventually(60, "Hearth sees bob join", || {
        joined_members(&h, &alice_tok, &room).filter(|m| m.contains_key(&bob) && m.len() == 14)
    });
    eventually(90, "Synapse's member list equals Hearth's", || {
        joined_members(&syn.url(), &bob_tok, &room).filter(|m| *m == ours)
    });
    let ours = memberships(&h, &alice_tok, &room).unwrap();
    assert_eq!(ours.values().filter(|m| *m == "leave").count(), 1);
    assert_eq!(ours.values().filter(|m| *m == "invite").count(), 1);
    eventually(30, "Synapse's memberships equal Hearth's", || {
        memberships(&syn.url(), &bob_tok, &room).filter(|m| *m == ours)
    });
}
