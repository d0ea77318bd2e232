//! What Hearth serves and asks beyond events, against a real Synapse 1.163 (its own Synapse,
//! see `common::synapse`): aliases both ways through `/query/directory`, Hearth's public room
//! directory read by Synapse over federation, and signing keys through notaries both ways
//! (Hearth notarising Synapse's key document; Synapse as Hearth's trusted notary for a
//! server that is gone).

mod common;

use common::{
    fed::{curl, register, Hearth},
    synapse::{PerFile, Synapse},
};
use hearth::config::TrustedKeyServer;
use serde_json::json;

/// Tests in this file that take a turn with the Synapse: bump it when adding one.
const TESTS: usize = 3;

/// This file's Synapse, stopped after the last of its tests.
static SYNAPSE: PerFile = PerFile::new(TESTS, Synapse::start);

#[test]
fn aliases_and_public_rooms_with_synapse_both_ways() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (_, alice) = register(&hearth.url(), "alice");
    let (_, carol) = register(&syn.url(), "carol_dir");
    let create = |base: &str, tok: &str, alias: &str, name: &str| {
        let (s, v) = curl(
            "POST",
            &format!("{base}/_matrix/client/v3/createRoom"),
            Some(tok),
            Some(
                &json!({ "preset": "public_chat", "visibility": "public", "name": name,
                          "room_alias_name": alias, "room_version": "10" }),
            ),
        );
        assert_eq!(s, 200, "{v}");
        v["room_id"].as_str().unwrap().to_owned()
    };
    let syn_room = create(&syn.url(), &carol, "synroom", "On Synapse");
    let hearth_room = create(&hearth.url(), &alice, "hroom", "On Hearth");
    let lookup = |base: &str, tok: &str, alias: String| {
        curl(
            "GET",
            &format!(
                "{base}/_matrix/client/v3/directory/room/{}",
                common::enc(&alias)
            ),
            Some(tok),
            None,
        )
    };

    // Hearth asks Synapse's /query/directory.
    let (s, v) = lookup(
        &hearth.url(),
        &alice,
        format!("#synroom:{}", syn.server_name()),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["room_id"], syn_room.as_str());
    assert_eq!(v["servers"][0], syn.server_name().as_str(), "{v}");
    let (s, v) = lookup(
        &hearth.url(),
        &alice,
        format!("#nope:{}", syn.server_name()),
    );
    assert_eq!(
        (s, v["errcode"].as_str()),
        (404, Some("M_NOT_FOUND")),
        "{v}"
    );

    // Synapse asks ours.
    let (s, v) = lookup(
        &syn.url(),
        &carol,
        format!("#hroom:{}", hearth.server_name()),
    );
    assert_eq!(s, 200, "Synapse could not resolve our alias: {v}");
    assert_eq!(v["room_id"], hearth_room.as_str());
    assert_eq!(v["servers"], json!([hearth.server_name()]));

    // Synapse reads our public room directory over federation, filtered or not.
    for body in [
        None,
        Some(json!({ "filter": { "generic_search_term": "on hearth" } })),
    ] {
        let (s, v) = curl(
            if body.is_some() { "POST" } else { "GET" },
            &format!(
                "{}/_matrix/client/v3/publicRooms?server={}",
                syn.url(),
                hearth.server_name()
            ),
            Some(&carol),
            body.as_ref(),
        );
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["chunk"][0]["room_id"], hearth_room.as_str(), "{v}");
        assert_eq!(v["chunk"][0]["name"], "On Hearth", "{v}");
    }
}

#[test]
fn keys_are_notarised_both_ways_with_synapse() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();

    // Hearth as notary for Synapse's keys: Synapse's own document, re-signed by Hearth.
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/key/v2/query", hearth.url()),
        None,
        Some(&json!({ "server_keys": { syn.server_name(): {} } })),
    );
    assert_eq!(s, 200, "{v}");
    let doc = &v["server_keys"][0];
    let syn_name: ruma::OwnedServerName = syn.server_name().try_into().unwrap();
    hearth::fed::keys::check_server_keys(&syn_name, &doc.to_string())
        .unwrap_or_else(|e| panic!("Synapse's self-signature kept: {e:?}: {doc}"));
    let obj: ruma::CanonicalJsonObject = serde_json::from_value(doc.clone()).unwrap();
    let pair = &hearth.hs.app().local.key.pair;
    let ours = ruma::signatures::PublicKeySet::from([(
        format!("ed25519:{}", pair.version()),
        ruma::serde::Base64::new(pair.public_key().to_vec()),
    )]);
    let hearth_name: ruma::OwnedServerName = hearth.server_name().try_into().unwrap();
    hearth::fed::keys::signed_by(&obj, &hearth_name, &ours).expect("signed by us as notary");

    // Synapse as our notary: it learns a Hearth's keys, the Hearth goes away, and another
    // Hearth trusting Synapse still gets them (through Synapse, checked).
    let gone = Hearth::start();
    let (s, v) = curl(
        "GET",
        &format!("{}/_matrix/key/v2/server", gone.url()),
        None,
        None,
    );
    assert_eq!(s, 200);
    let gone_key = v["verify_keys"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    // A signed request from that Hearth makes Synapse fetch and keep its keys.
    let (dave, _) = register(&syn.url(), "dave_keys");
    let req = ruma::api::federation::query::get_profile_information::v1::Request::new(
        dave.as_str().try_into().unwrap(),
    );
    smol::block_on(gone.hs.app().fed.client.send(&syn_name, req)).expect("Synapse answers");
    let (s, v) = curl(
        "GET",
        &format!("{}/_matrix/key/v2/query/{}", syn.url(), gone.server_name()),
        None,
        None,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["server_keys"][0]["server_name"],
        gone.server_name().as_str(),
        "{v}"
    );
    let gone_name: ruma::OwnedServerName = gone.server_name().try_into().unwrap();
    gone.hs.stop().unwrap();
    let sn = syn.server_name();
    let trusting = Hearth::start_with("127.0.0.1", move |c| {
        c.federation.trusted_key_servers = vec![TrustedKeyServer {
            server_name: sn,
            verify_keys: Default::default(),
        }]
    });
    let app = trusting.hs.app();
    let ctx = hearth::ops::federation::key_context(app);
    let now = app.clock.now_ms() as i64;
    smol::block_on(
        app.fed
            .keys
            .for_request(&ctx, &gone_name, &[gone_key.as_str()], now),
    )
    .expect("the gone server's key, through Synapse");
}

/// Room summaries of rooms on the other server, both ways, over federation `/hierarchy`: a
/// Hearth user previews a public Synapse room (by ID with `via`, and by alias), Synapse users
/// preview a Hearth room and browse a Hearth space with a child room; a Hearth invite-only room
/// stays hidden from Synapse.
#[test]
fn room_summaries_and_space_hierarchy_with_synapse_both_ways() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (_, alice) = register(&hearth.url(), "alice");
    let (_, carol) = register(&syn.url(), "carol_sum");
    let create = |base: &str, tok: &str, body: serde_json::Value| {
        let (s, v) = curl(
            "POST",
            &format!("{base}/_matrix/client/v3/createRoom"),
            Some(tok),
            Some(&body),
        );
        assert_eq!(s, 200, "{v}");
        v["room_id"].as_str().unwrap().to_owned()
    };
    let summary = |base: &str, tok: &str, room: &str, via: &str| {
        curl(
            "GET",
            &format!(
                "{base}/_matrix/client/v1/room_summary/{}{}",
                common::enc(room),
                if via.is_empty() {
                    String::new()
                } else {
                    format!("?via={via}")
                }
            ),
            Some(tok),
            None,
        )
    };
    let syn_room = create(
        &syn.url(),
        &carol,
        json!({ "preset": "public_chat", "name": "Synapse lounge", "topic": "tea",
                "room_alias_name": "lounge", "room_version": "10" }),
    );
    let (s, v) = summary(&hearth.url(), &alice, &syn_room, &syn.server_name());
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["room_id"], syn_room.as_str(), "{v}");
    assert_eq!(v["name"], "Synapse lounge", "{v}");
    assert_eq!(v["topic"], "tea", "{v}");
    assert_eq!(v["num_joined_members"], 1, "{v}");
    assert_eq!(v["join_rule"], "public", "{v}");
    assert!(v.get("membership").is_none(), "{v}");
    let (s, v) = summary(
        &hearth.url(),
        &alice,
        &format!("#lounge:{}", syn.server_name()),
        "",
    );
    assert_eq!(
        (s, v["room_id"].as_str()),
        (200, Some(syn_room.as_str())),
        "{v}"
    );

    let child = create(
        &hearth.url(),
        &alice,
        json!({ "preset": "public_chat", "name": "Hearth kitchen", "room_version": "10" }),
    );
    let space = create(
        &hearth.url(),
        &alice,
        json!({ "preset": "public_chat", "name": "Hearth space", "room_version": "10",
                "creation_content": { "type": "m.space" },
                "initial_state": [{ "type": "m.space.child", "state_key": child,
                                    "content": { "via": [hearth.server_name()] } }] }),
    );
    let hidden = create(
        &hearth.url(),
        &alice,
        json!({ "preset": "private_chat", "name": "Hearth attic", "room_version": "10" }),
    );
    let (s, v) = summary(&syn.url(), &carol, &child, &hearth.server_name());
    assert_eq!(s, 200, "Synapse's summary of a Hearth room: {v}");
    assert_eq!(v["name"], "Hearth kitchen", "{v}");
    assert_eq!(v["num_joined_members"], 1, "{v}");
    let (s, v) = summary(&syn.url(), &carol, &hidden, &hearth.server_name());
    assert_eq!(s, 404, "an invite-only Hearth room is hidden: {v}");
    // Synapse browses only spaces it is in (else "room previews are disabled"): Carol joins
    // the space; its child, which Synapse does not hold, comes from our `/hierarchy`.
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            syn.url(),
            common::enc(&space),
            hearth.server_name()
        ),
        Some(&carol),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v1/rooms/{}/hierarchy?via={}",
            syn.url(),
            common::enc(&space),
            hearth.server_name()
        ),
        Some(&carol),
        None,
    );
    assert_eq!(s, 200, "Synapse browsing a Hearth space: {v}");
    let names: Vec<&str> = v["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["Hearth space", "Hearth kitchen"], "{v}");
    assert_eq!(v["rooms"][0]["room_type"], "m.space", "{v}");
    assert_eq!(
        v["rooms"][0]["children_state"][0]["state_key"],
        child.as_str(),
        "{v}"
    );
}
