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
