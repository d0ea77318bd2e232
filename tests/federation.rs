//! Federation behaviour that needs no remote server: what a local operation queues for other
//! servers, and how inbound federation refuses what it must.

mod common;

use common::TestServer;
use serde_json::json;

fn outbox(s: &TestServer) -> Vec<(String, String)> {
    let app = s.hs().app().clone();
    smol::block_on(app.store.read(|c| {
        let rows = c
            .prepare("SELECT destination, kind FROM outbox ORDER BY id")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }))
    .unwrap()
}

#[test]
fn a_local_event_is_queued_for_every_other_server_in_the_room_in_its_own_write() {
    let s = TestServer::start();
    let (_, alice) = s.register("alice");
    let room = s.create_room(&alice, json!({ "preset": "public_chat" }));
    assert!(outbox(&s).is_empty(), "nobody else is in the room");
    // Pretend two remote users joined (their join events would come over federation).
    let app = s.hs().app().clone();
    let r = room.clone();
    smol::block_on(app.store.write(move |tx| {
        for u in [
            "@bob:remote.example",
            "@carol:remote.example",
            "@dan:other.example:8448",
        ] {
            tx.execute(
                "INSERT INTO current_state (room_id, type, state_key, event_id, membership, pos)
                 VALUES (?1, 'm.room.member', ?2, '$fake' || ?2, 'join', 0)",
                [r.as_str(), u],
            )?;
        }
        Ok(())
    }))
    .unwrap();
    s.send(&alice, &room, "t1", "hello federation");
    let mut rows = outbox(&s);
    rows.sort();
    assert_eq!(
        rows,
        vec![
            ("other.example:8448".to_owned(), "pdu".to_owned()),
            ("remote.example".to_owned(), "pdu".to_owned())
        ]
    );
}

/// A well-formed room version 10 message PDU (signatures are not `parse`'s business).
fn v10_pdu() -> serde_json::Value {
    let id = |c: char| format!("${}", c.to_string().repeat(43));
    json!({
        "type": "m.room.message",
        "room_id": "!room:remote.example",
        "sender": "@bob:remote.example",
        "origin": "remote.example",
        "origin_server_ts": 1_700_000_000_000u64,
        "content": { "msgtype": "m.text", "body": "hi" },
        "prev_events": [id('p')],
        "auth_events": [id('a'), id('b'), id('c')],
        "depth": 7,
        "hashes": { "sha256": "x".repeat(43) },
        "signatures": {},
    })
}

/// A change that makes the well-formed PDU malformed.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

fn parse(v: &serde_json::Value) -> Result<(), String> {
    let raw = serde_json::value::to_raw_value(v).unwrap();
    hearth::room::receive::parse(&raw, &ruma::RoomVersionId::V10)
        .map(|_| ())
        .map_err(|e| e.message)
}

/// Every malformed PDU the spec's first check ("is a valid event, otherwise it is dropped")
/// must drop: the wrong shape for the room version, out-of-range integers, too many prev or
/// auth events, over-long IDs, too large. Each is refused before anything is looked up.
#[test]
fn malformed_pdus_are_refused_by_the_format_check() {
    assert_eq!(parse(&v10_pdu()), Ok(()), "the well-formed one passes");
    let long = "x".repeat(300);
    let cases: Vec<(&str, Edit)> = vec![
        (
            "no prev_events",
            Box::new(|v| drop(v.as_object_mut().unwrap().remove("prev_events"))),
        ),
        (
            "empty prev_events",
            Box::new(|v| v["prev_events"] = json!([])),
        ),
        (
            "no auth_events",
            Box::new(|v| drop(v.as_object_mut().unwrap().remove("auth_events"))),
        ),
        (
            "no depth",
            Box::new(|v| drop(v.as_object_mut().unwrap().remove("depth"))),
        ),
        (
            "no sender",
            Box::new(|v| drop(v.as_object_mut().unwrap().remove("sender"))),
        ),
        (
            "no room_id",
            Box::new(|v| drop(v.as_object_mut().unwrap().remove("room_id"))),
        ),
        ("negative depth", Box::new(|v| v["depth"] = json!(-1))),
        (
            "depth past 2^53-1",
            Box::new(|v| v["depth"] = json!(1u64 << 53)),
        ),
        ("fractional depth", Box::new(|v| v["depth"] = json!(7.5))),
        ("depth as a string", Box::new(|v| v["depth"] = json!("7"))),
        (
            "negative timestamp",
            Box::new(|v| v["origin_server_ts"] = json!(-5)),
        ),
        (
            "timestamp past 2^53-1",
            Box::new(|v| v["origin_server_ts"] = json!(u64::MAX)),
        ),
        (
            "timestamp as a string",
            Box::new(|v| v["origin_server_ts"] = json!("1700000000000")),
        ),
        // Room versions 1 and 2 list [event ID, hashes] pairs; version 10 lists IDs.
        (
            "v1-shaped prev_events",
            Box::new(|v| v["prev_events"] = json!([["$p:remote.example", { "sha256": "abc" }]])),
        ),
        (
            "21 prev events",
            Box::new(|v| {
                v["prev_events"] = json!((0..21).map(|i| format!("${i:0>43}")).collect::<Vec<_>>())
            }),
        ),
        (
            "11 auth events",
            Box::new(|v| {
                v["auth_events"] = json!((0..11).map(|i| format!("${i:0>43}")).collect::<Vec<_>>())
            }),
        ),
        (
            "a 300-byte sender",
            Box::new(move |v| v["sender"] = json!(format!("@{long}:remote.example"))),
        ),
        (
            "a 300-byte type",
            Box::new(|v| v["type"] = json!("t".repeat(300))),
        ),
        (
            "a sender that is not a user ID",
            Box::new(|v| v["sender"] = json!("bob")),
        ),
        (
            "over 65,536 bytes",
            Box::new(|v| v["content"]["pad"] = json!("x".repeat(66_000))),
        ),
    ];
    for (what, edit) in cases {
        let mut v = v10_pdu();
        edit(&mut v);
        assert!(parse(&v).is_err(), "{what}: accepted");
    }
    for not_an_object in [json!([1, 2]), json!(5), json!("pdu"), json!(null)] {
        assert!(parse(&not_an_object).is_err(), "{not_an_object} accepted");
    }
    let unknown = serde_json::value::to_raw_value(&v10_pdu()).unwrap();
    let version = ruma::RoomVersionId::try_from("999").unwrap();
    assert!(hearth::room::receive::parse(&unknown, &version).is_err());
}
