//! Partial-state joins against a real Synapse 1.163, both ways. Synapse joins with
//! `omit_members=true` by default: it joins a Hearth room, takes Hearth's partial answer,
//! resyncs the full state from Hearth (`/state_ids`, `/state`, `/event`) and ends with
//! Hearth's member list. Hearth joins a Synapse room with partial state, sends and receives
//! at once, and its resync ends with Synapse's member list. Leaving and being kicked during
//! the resync, and rejoining after, work and end with Synapse's member list.

mod common;

use std::collections::BTreeMap;

use common::{
    fed::{curl, curl_command, register, Hearth, HearthProcess},
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
const TESTS: usize = 4;

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

/// A room on `base` created by `owner_tok` with `create`, and `n` members (`{prefix}{i}`, each
/// with a display name) joined, the last of whom left again: (room, the members' tokens).
fn populated_room(
    base: &str,
    owner_tok: &str,
    create: Value,
    prefix: &str,
    n: usize,
) -> (String, Vec<String>) {
    let room = post(base, "/_matrix/client/v3/createRoom", owner_tok, create)["room_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let join_path = format!("/_matrix/client/v3/join/{}", common::enc(&room));
    let mut tokens = Vec::new();
    for i in 0..n {
        let (u, tok) = register(base, &format!("{prefix}{i:02}"));
        let (s, v) = curl(
            "PUT",
            &format!("{base}/_matrix/client/v3/profile/{u}/displayname"),
            Some(&tok),
            Some(&json!({ "displayname": format!("{prefix} {i}") })),
        );
        assert_eq!(s, 200, "{v}");
        post(base, &join_path, &tok, json!({}));
        tokens.push(tok);
    }
    post(
        base,
        &format!("/_matrix/client/v3/rooms/{}/leave", common::enc(&room)),
        &tokens[n - 1],
        json!({}),
    );
    (room, tokens)
}

#[test]
fn synapse_joins_a_hearth_room_with_partial_state_and_resyncs_the_members() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let h = hearth.url();
    let (_, alice_tok) = register(&h, "alice");
    // A dozen members with display names, one who left, one invited: none of them is in the
    // partial answer (the room has a name), so Synapse can only learn them by its resync.
    let (room, _) = populated_room(
        &h,
        &alice_tok,
        json!({ "preset": "public_chat", "name": "Partial room" }),
        "member",
        12,
    );
    let join_path = format!("/_matrix/client/v3/join/{}", common::enc(&room));
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

#[test]
fn hearth_joins_a_synapse_room_with_partial_state_talks_at_once_and_resyncs() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let s = syn.url();
    let hearth = Hearth::start();
    let h = hearth.url();
    let (_, owner_tok) = register(&s, "owner_p");
    let (room, tokens) = populated_room(
        &s,
        &owner_tok,
        json!({ "preset": "public_chat", "name": "Synapse room", "room_version": "10" }),
        "pmember",
        6,
    );
    let join_path = format!("/_matrix/client/v3/join/{}", common::enc(&room));

    let (_, carol_tok) = register(&h, "carol");
    let (st, v) = curl(
        "POST",
        &format!(
            "{h}{join_path}?server_name={}",
            common::enc(&syn.server_name())
        ),
        Some(&carol_tok),
        Some(&json!({})),
    );
    assert_eq!(st, 200, "Hearth could not join the Synapse room: {v}");
    assert_eq!(
        metric(&hearth, "hearth_federation_partial_joins_total"),
        "hearth_federation_partial_joins_total 1",
        "Synapse answered with partial state"
    );

    // At once: carol speaks and Synapse's members see it; a Synapse member speaks and
    // carol sees it (its sender's membership is not in our partial state).
    let (st, v) = curl(
        "PUT",
        &format!(
            "{h}/_matrix/client/v3/rooms/{}/send/m.room.message/p1",
            common::enc(&room)
        ),
        Some(&carol_tok),
        Some(&json!({ "msgtype": "m.text", "body": "hello from a partial join" })),
    );
    assert_eq!(st, 200, "{v}");
    let (st, v) = curl(
        "PUT",
        &format!(
            "{s}/_matrix/client/v3/rooms/{}/send/m.room.message/p2",
            common::enc(&room)
        ),
        Some(&tokens[0]),
        Some(&json!({ "msgtype": "m.text", "body": "hello from Synapse" })),
    );
    assert_eq!(st, 200, "{v}");
    eventually(30, "Synapse sees carol's message", || {
        syn.bodies(&owner_tok, &room, 50)
            .contains(&"hello from a partial join".to_owned())
            .then_some(())
    });
    eventually(30, "carol sees the Synapse member's message", || {
        common::synapse::room_bodies(&h, &carol_tok, &room, 50)
            .contains(&"hello from Synapse".to_owned())
            .then_some(())
    });

    // After the resync, Hearth's member list is Synapse's (display names included).
    let theirs = eventually(30, "Synapse lists carol", || {
        joined_members(&s, &owner_tok, &room).filter(|m| m.len() == 7)
    });
    eventually(90, "Hearth's member list equals Synapse's", || {
        joined_members(&h, &carol_tok, &room).filter(|m| *m == theirs)
    });
    let theirs = memberships(&s, &owner_tok, &room).unwrap();
    eventually(30, "Hearth's memberships equal Synapse's", || {
        memberships(&h, &carol_tok, &room).filter(|m| *m == theirs)
    });
}

#[test]
fn a_resync_cut_off_by_kill_9_resumes_after_the_restart() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let s = syn.url();
    let (_, owner_tok) = register(&s, "owner_k");
    let (room, _) = populated_room(
        &s,
        &owner_tok,
        json!({ "preset": "public_chat", "name": "Killed resync", "room_version": "10" }),
        "kmember",
        8,
    );
    let mut hearth = HearthProcess::start();
    let h = hearth.url();
    let (_, dave_tok) = register(&h, "dave");
    let (st, v) = curl(
        "POST",
        &format!(
            "{h}/_matrix/client/v3/join/{}?server_name={}",
            common::enc(&room),
            common::enc(&syn.server_name())
        ),
        Some(&dave_tok),
        Some(&json!({})),
    );
    assert_eq!(st, 200, "{v}");
    // Killed as soon as the join answered: the resync has started, at most.
    hearth.kill9();
    let partial_at_kill: i64 = rusqlite::Connection::open(hearth.db_path())
        .unwrap()
        .query_row("SELECT COUNT(*) FROM partial_state_rooms", [], |r| r.get(0))
        .unwrap();
    eprintln!("partial-state rooms when killed: {partial_at_kill}");
    hearth.restart();
    let theirs = eventually(30, "Synapse lists dave", || {
        joined_members(&s, &owner_tok, &room).filter(|m| m.len() == 9)
    });
    eventually(
        90,
        "Hearth's member list equals Synapse's after the restart",
        || joined_members(&h, &dave_tok, &room).filter(|m| *m == theirs),
    );
    if partial_at_kill == 1 {
        // The first run never completed the room (its row goes in the completing write), so
        // the completion in the log is the restarted run's: the resync resumed.
        assert!(
            hearth.log().contains(&format!("{room} is fully stated")),
            "{}",
            hearth.log_tail()
        );
    }
    let rows: i64 = {
        hearth.kill9();
        rusqlite::Connection::open(hearth.db_path())
            .unwrap()
            .query_row("SELECT COUNT(*) FROM partial_state_rooms", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(rows, 0, "the room is fully stated for good");
}

/// Sends `body` as `token`'s user on `base`: the status.
fn say(base: &str, token: &str, room: &str, txn: &str, body: &str) -> u16 {
    curl(
        "PUT",
        &format!(
            "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            common::enc(room)
        ),
        Some(token),
        Some(&json!({ "msgtype": "m.text", "body": body })),
    )
    .0
}

#[test]
fn leaving_and_being_kicked_during_the_resync_then_rejoining_work() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let s = syn.url();
    let (owner, owner_tok) = register(&s, "owner_l");
    let (room, _) = populated_room(
        &s,
        &owner_tok,
        json!({ "preset": "public_chat", "name": "Leave while partial", "room_version": "10" }),
        "lmember",
        20,
    );
    let hearth = Hearth::start();
    let h = hearth.url();
    let (erin, erin_tok) = register(&h, "erin");
    let (frank, frank_tok) = register(&h, "frank");
    let join = |tok: &str| {
        curl(
            "POST",
            &format!(
                "{h}/_matrix/client/v3/join/{}?server_name={}",
                common::enc(&room),
                common::enc(&syn.server_name())
            ),
            Some(tok),
            Some(&json!({})),
        )
    };
    // erin joins (partially) and leaves at once, while the resync of 20 members' state runs
    // (it takes about a second); then frank joins, and Synapse's owner kicks him at once.
    let (st, v) = join(&erin_tok);
    assert_eq!(st, 200, "{v}");
    let (st, v) = curl(
        "POST",
        &format!("{h}/_matrix/client/v3/rooms/{}/leave", common::enc(&room)),
        Some(&erin_tok),
        Some(&json!({})),
    );
    assert_eq!(st, 200, "erin leaves: {v}");
    let (st, v) = join(&frank_tok);
    assert_eq!(st, 200, "{v}");
    let (st, v) = curl(
        "POST",
        &format!("{s}/_matrix/client/v3/rooms/{}/kick", common::enc(&room)),
        Some(&owner_tok),
        Some(&json!({ "user_id": frank })),
    );
    assert_eq!(st, 200, "the owner kicks frank: {v}");

    // Both are out on both sides, and Hearth refuses their messages.
    let left = |m: &BTreeMap<String, String>| {
        m.get(&erin).map(String::as_str) == Some("leave")
            && m.get(&frank).map(String::as_str) == Some("leave")
    };
    eventually(30, "Synapse has erin left and frank kicked", || {
        memberships(&s, &owner_tok, &room).filter(left)
    });
    eventually(30, "frank's server hears of the kick", || {
        (say(&h, &frank_tok, &room, "k1", "still here?") == 403).then_some(())
    });
    assert_eq!(say(&h, &erin_tok, &room, "l1", "still here?"), 403);

    // Both rejoin, talk both ways, and Hearth's member list ends equal to Synapse's.
    for tok in [&erin_tok, &frank_tok] {
        let (st, v) = join(tok);
        assert_eq!(st, 200, "rejoin: {v}");
    }
    assert_eq!(say(&h, &erin_tok, &room, "l2", "erin is back"), 200);
    assert_eq!(say(&h, &frank_tok, &room, "k2", "frank is back"), 200);
    eventually(30, "Synapse sees both back", || {
        let b = syn.bodies(&owner_tok, &room, 50);
        (b.contains(&"erin is back".to_owned()) && b.contains(&"frank is back".to_owned()))
            .then_some(())
    });
    let (st, v) = curl(
        "PUT",
        &format!(
            "{s}/_matrix/client/v3/rooms/{}/send/m.room.message/o1",
            common::enc(&room)
        ),
        Some(&owner_tok),
        Some(&json!({ "msgtype": "m.text", "body": "welcome back" })),
    );
    assert_eq!(st, 200, "{v}");
    eventually(30, "erin sees the owner's message", || {
        common::synapse::room_bodies(&h, &erin_tok, &room, 50)
            .contains(&"welcome back".to_owned())
            .then_some(())
    });
    let theirs = eventually(30, "Synapse lists both back", || {
        joined_members(&s, &owner_tok, &room)
            .filter(|m| m.contains_key(&erin) && m.contains_key(&frank))
    });
    eventually(90, "Hearth's member list equals Synapse's", || {
        joined_members(&h, &erin_tok, &room).filter(|m| *m == theirs)
    });
    eventually(30, "no room is left partial", || {
        (metric(&hearth, "hearth_partial_state_rooms") == "hearth_partial_state_rooms 0")
            .then_some(())
    });
    let _ = owner;
}
