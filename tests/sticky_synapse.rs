//! Sticky events (MSC4354) between Hearth and a real Synapse 1.163 started with
//! `msc4354_enabled` (`../shared/synapse-peer/` turns it on): each side's sticky events reach
//! the other and appear in both servers' `/sync` `msc4354_sticky` sections with the same
//! fields. One Synapse for the file.

mod common;

use common::{
    fed::{curl, register, Hearth},
    synapse::{eventually, PerFile, Synapse},
};
use serde_json::{json, Value};

static SYNAPSE: PerFile = PerFile::new(TESTS, || {
    std::env::var("HEARTH_TEST_SYNAPSE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .map_or_else(Synapse::start, Synapse::shared)
});

/// Tests in this file that take a turn with the Synapse: bump it when adding one.
const TESTS: usize = 2;

const PARAM: &str = "org.matrix.msc4354.sticky_duration_ms";
const DURATION: u64 = 600_000;

fn send(
    base: &str,
    tok: &str,
    room: &str,
    kind: &str,
    txn: &str,
    query: &str,
    body: Value,
) -> String {
    let (s, v) = curl(
        "PUT",
        &format!(
            "{base}/_matrix/client/v3/rooms/{}/send/{kind}/{txn}{query}",
            common::enc(room)
        ),
        Some(tok),
        Some(&body),
    );
    assert_eq!(s, 200, "send {txn} at {base}: {v}");
    v["event_id"].as_str().unwrap().to_owned()
}

/// A sticky event followed by `later` plain messages, so a sync whose timeline holds the last
/// five carries it only in its sticky section. Returns the IDs of the sticky event and of the
/// last message.
fn sticky_then_messages(
    base: &str,
    tok: &str,
    room: &str,
    tag: &str,
    later: usize,
) -> (String, String) {
    let id = send(
        base,
        tok,
        room,
        "org.example.call.member",
        &format!("{tag}-sticky"),
        &format!("?{PARAM}={DURATION}"),
        json!({ "sticky_key": tag }),
    );
    let mut last = id.clone();
    for i in 0..later {
        last = send(
            base,
            tok,
            room,
            "m.room.message",
            &format!("{tag}-{i}"),
            "",
            json!({ "msgtype": "m.text", "body": format!("{tag} {i}") }),
        );
    }
    (id, last)
}

fn sync(base: &str, tok: &str, since: Option<&str>) -> Value {
    let filter = common::enc(r#"{"room":{"timeline":{"limit":5}}}"#);
    let q = since.map(|s| format!("&since={s}")).unwrap_or_default();
    let (s, v) = curl(
        "GET",
        &format!("{base}/_matrix/client/v3/sync?timeout=1000&filter={filter}{q}"),
        Some(tok),
        None,
    );
    assert_eq!(s, 200, "sync at {base}: {v}");
    v
}

/// Once the server at `base` holds `last`, one sync from `since`: the sticky event `id`,
/// which `last` follows by more than the timeline's limit, as that server's sticky section
/// shows it. `since` moves on to the response's `next_batch`.
fn sticky_in_sync(
    base: &str,
    tok: &str,
    room: &str,
    since: &mut String,
    id: &str,
    last: &str,
) -> Value {
    eventually(90, &format!("{last} reaches {base}"), || {
        let (s, _) = curl(
            "GET",
            &format!(
                "{base}/_matrix/client/v3/rooms/{}/event/{}",
                common::enc(room),
                common::enc(last)
            ),
            Some(tok),
            None,
        );
        (s == 200).then_some(())
    });
    let v = sync(base, tok, Some(since));
    *since = v["next_batch"].as_str().unwrap().to_owned();
    let r = &v["rooms"]["join"][room];
    r["msc4354_sticky"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["event_id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("{id} not in the sticky section at {base}: {r}"))
}

/// The same event as both servers show it: the same ID, type, sender, content and
/// stickiness, and a time left on each.
fn assert_same_sticky(hearth: &Value, synapse: &Value) {
    for field in ["event_id", "type", "sender", "content", "origin_server_ts"] {
        assert_eq!(
            hearth[field], synapse[field],
            "{field}: Hearth {hearth} Synapse {synapse}"
        );
    }
    assert_eq!(
        hearth["msc4354_sticky"]["duration_ms"], DURATION,
        "Hearth: {hearth}"
    );
    if synapse.get("msc4354_sticky").is_some() {
        assert_eq!(hearth["msc4354_sticky"], synapse["msc4354_sticky"]);
    }
    for (who, ev) in [("Hearth", hearth), ("Synapse", synapse)] {
        let ttl = ev["unsigned"]["msc4354_sticky_duration_ttl_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("{who}: no ttl in {ev}"));
        assert!(ttl > 0 && ttl <= DURATION, "{who}: {ev}");
    }
}

#[test]
fn sticky_events_flow_both_ways_and_show_the_same_in_both_sync_sections() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (_, alice_tok) = register(&hearth.url(), "alice");
    let (_, bob_tok) = register(&syn.url(), "bob");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", hearth.url()),
        Some(&alice_tok),
        Some(&json!({ "preset": "public_chat", "room_version": "10" })),
    );
    assert_eq!(s, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            syn.url(),
            common::enc(&room),
            common::enc(&hearth.server_name())
        ),
        Some(&bob_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "bob joins through Hearth: {v}");
    let next = |v: Value| v["next_batch"].as_str().unwrap().to_owned();
    let mut alice_since = next(sync(&hearth.url(), &alice_tok, None));
    let mut bob_since = next(sync(&syn.url(), &bob_tok, None));

    // Hearth → Synapse.
    let (id, last) = sticky_then_messages(&hearth.url(), &alice_tok, &room, "hearth", 8);
    let on_synapse = sticky_in_sync(&syn.url(), &bob_tok, &room, &mut bob_since, &id, &last);
    let on_hearth = sticky_in_sync(
        &hearth.url(),
        &alice_tok,
        &room,
        &mut alice_since,
        &id,
        &last,
    );
    assert_same_sticky(&on_hearth, &on_synapse);

    // Synapse → Hearth.
    let (id, last) = sticky_then_messages(&syn.url(), &bob_tok, &room, "synapse", 8);
    let on_hearth = sticky_in_sync(
        &hearth.url(),
        &alice_tok,
        &room,
        &mut alice_since,
        &id,
        &last,
    );
    let on_synapse = sticky_in_sync(&syn.url(), &bob_tok, &room, &mut bob_since, &id, &last);
    assert_same_sticky(&on_hearth, &on_synapse);
}

#[test]
fn hearth_pushes_its_earlier_sticky_events_to_synapse_when_it_joins() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (_, alice_tok) = register(&hearth.url(), "alice");
    // The file shares one Synapse: a user name of its own.
    let (_, bob_tok) = register(&syn.url(), "bob-joins-later");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", hearth.url()),
        Some(&alice_tok),
        Some(&json!({ "preset": "public_chat", "room_version": "10" })),
    );
    assert_eq!(s, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    // Before Synapse is in the room: a sticky event, and more messages than a timeline of
    // five after it, so nothing Synapse gets with its join leads to it.
    let (early, _) = sticky_then_messages(&hearth.url(), &alice_tok, &room, "early", 8);
    let mut bob_since = sync(&syn.url(), &bob_tok, None)["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            syn.url(),
            common::enc(&room),
            common::enc(&hearth.server_name())
        ),
        Some(&bob_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "bob joins through Hearth: {v}");
    // Bob's syncs from before his join until the early sticky event shows up, in the sticky
    // section or the timeline (bounded).
    let ev = eventually(
        90,
        "Synapse delivers Hearth's earlier sticky event to bob",
        || {
            let v = sync(&syn.url(), &bob_tok, Some(&bob_since));
            bob_since = v["next_batch"].as_str().unwrap().to_owned();
            let r = &v["rooms"]["join"][room.as_str()];
            let found = [&r["msc4354_sticky"]["events"], &r["timeline"]["events"]]
                .into_iter()
                .flat_map(|a| a.as_array().cloned().unwrap_or_default())
                .find(|e| e["event_id"] == early.as_str());
            found
        },
    );
    assert_eq!(ev["content"]["sticky_key"], "early", "{ev}");
    assert!(
        ev["unsigned"]["msc4354_sticky_duration_ttl_ms"].is_u64(),
        "{ev}"
    );
}
