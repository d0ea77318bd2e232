//! Forks in the room graph are resolved with state resolution v2 (ruma's): a ban on one branch
//! beats a state change by the banned user on the other.
mod common;
use std::sync::Arc;

use common::config_in;
use hearth::{
    room::build::{self, NewEvent},
    store::queries as q,
    App,
};
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use serde_json::json;

fn app() -> (App, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ex = Arc::new(async_executor::Executor::new());
    let app = App::open(
        config_in(dir.path()),
        Arc::new(hearth::SystemClock),
        hearth::cancel::Spawner::new(ex),
    )
    .unwrap();
    (app, dir)
}

fn send(
    app: &App,
    room: &OwnedRoomId,
    sender: &OwnedUserId,
    ev: NewEvent,
    prevs: Option<Vec<OwnedEventId>>,
) -> hearth::error::Result<OwnedEventId> {
    let (local, room, sender) = (app.local.clone(), room.clone(), sender.clone());
    smol::block_on(app.store.write(move |tx| {
        Ok(build::send_with_prevs(tx, &local, &room, &sender, ev, None, prevs)?.event_id)
    }))
}

fn current(
    app: &App,
    room: &OwnedRoomId,
    kind: &'static str,
    key: &str,
) -> Option<serde_json::Value> {
    let (r, k) = (room.to_string(), key.to_owned());
    smol::block_on(
        app.store
            .read(move |c| build::current_content(c, &r, kind, &k)),
    )
    .unwrap()
}

fn extremities(app: &App, room: &OwnedRoomId) -> i64 {
    let r = room.to_string();
    smol::block_on(app.store.read(move |c| {
        Ok(c.query_row(
            "SELECT count(*) FROM forward_extremities WHERE room_id = ?1",
            [r],
            |x| x.get(0),
        )?)
    }))
    .unwrap()
}

#[test]
fn ban_on_one_branch_beats_the_banned_users_topic_on_the_other() {
    let (app, _dir) = app();
    let alice: OwnedUserId = "@alice:hearth.test".try_into().unwrap();
    let bob: OwnedUserId = "@bob:hearth.test".try_into().unwrap();
    for u in ["alice", "bob"] {
        smol::block_on(hearth::ops::account::create_user(&app, u, None, false)).unwrap();
    }
    let room: OwnedRoomId = "!fork:hearth.test".try_into().unwrap();
    let r = room.to_string();
    smol::block_on(app.store.write(move |tx| {
        tx.execute("INSERT INTO rooms (room_id, room_version, creator, created_ts) VALUES (?1, '10', '@alice:hearth.test', 0)", [r])?;
        Ok(())
    }))
    .unwrap();
    send(
        &app,
        &room,
        &alice,
        NewEvent::state(
            "m.room.create",
            "",
            json!({ "creator": alice, "room_version": "10" }),
        ),
        None,
    )
    .unwrap();
    send(
        &app,
        &room,
        &alice,
        NewEvent::state(
            "m.room.member",
            alice.as_str(),
            json!({ "membership": "join" }),
        ),
        None,
    )
    .unwrap();
    send(
        &app,
        &room,
        &alice,
        NewEvent::state(
            "m.room.power_levels",
            "",
            json!({ "users": { alice.as_str(): 100, bob.as_str(): 50 } }),
        ),
        None,
    )
    .unwrap();
    send(
        &app,
        &room,
        &alice,
        NewEvent::state("m.room.join_rules", "", json!({ "join_rule": "public" })),
        None,
    )
    .unwrap();
    send(
        &app,
        &room,
        &alice,
        NewEvent::state("m.room.topic", "", json!({ "topic": "original" })),
        None,
    )
    .unwrap();
    let fork_point = send(
        &app,
        &room,
        &bob,
        NewEvent::state(
            "m.room.member",
            bob.as_str(),
            json!({ "membership": "join" }),
        ),
        None,
    )
    .unwrap();

    // Branch A: alice bans bob. Branch B, concurrently from the same point: bob sets the topic.
    send(
        &app,
        &room,
        &alice,
        NewEvent::state(
            "m.room.member",
            bob.as_str(),
            json!({ "membership": "ban" }),
        ),
        Some(vec![fork_point.clone()]),
    )
    .unwrap();
    let bobs = send(
        &app,
        &room,
        &bob,
        NewEvent::state("m.room.topic", "", json!({ "topic": "bob was here" })),
        Some(vec![fork_point]),
    )
    .unwrap();
    assert_eq!(extremities(&app, &room), 2, "the room has forked");

    // Resolution: the ban (a power event) is applied first; bob's topic then fails auth.
    assert_eq!(
        current(&app, &room, "m.room.member", bob.as_str()).unwrap()["membership"],
        "ban"
    );
    assert_eq!(
        current(&app, &room, "m.room.topic", "").unwrap()["topic"],
        "original"
    );
    let membership = {
        let r = room.to_string();
        smol::block_on(
            app.store
                .read(move |c| q::get_membership(c, &r, "@bob:hearth.test")),
        )
        .unwrap()
    };
    assert_eq!(
        membership.as_deref(),
        Some("ban"),
        "the membership index follows the resolved state"
    );

    // The next local event merges both branches; bob, banned, can no longer send.
    send(
        &app,
        &room,
        &alice,
        NewEvent::message("m.room.message", json!({ "body": "merge" })),
        None,
    )
    .unwrap();
    assert_eq!(
        extremities(&app, &room),
        1,
        "a new event references both extremities"
    );
    let err = send(
        &app,
        &room,
        &bob,
        NewEvent::state("m.room.topic", "", json!({ "topic": "again" })),
        None,
    )
    .unwrap_err();
    assert_eq!(err.errcode, "M_FORBIDDEN");
    // bob's forked topic event is still stored (it was accepted on its branch).
    let b = bobs.to_string();
    assert!(smol::block_on(app.store.read(move |c| q::get_event(c, &b)))
        .unwrap()
        .is_some());
    app.store.close().unwrap();
}

/// Sends a state event through the app (test helper for forks).
fn state(
    app: &App,
    room: &OwnedRoomId,
    sender: &OwnedUserId,
    kind: &'static str,
    key: &str,
    content: serde_json::Value,
    prevs: Option<Vec<OwnedEventId>>,
) -> OwnedEventId {
    send(
        app,
        room,
        sender,
        NewEvent::state(kind, key, content),
        prevs,
    )
    .unwrap()
}

#[test]
fn a_state_reset_reaches_clients_and_a_fork_writes_a_delta() {
    let s = common::TestServer::start();
    let app = s.hs().app().clone();
    let (alice_id, alice) = s.register("alice");
    let (bob_id, bob) = s.register("bob");
    let room_s = s.create_room(
        &alice,
        json!({ "preset": "public_chat", "initial_state": [
            { "type": "m.room.topic", "state_key": "", "content": { "topic": "original" } }
        ], "power_level_content_override": { "events": { "m.room.topic": 0 } } }),
    );
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", common::enc(&room_s)),
        Some(&bob),
        Some(&json!({})),
    );
    let room: OwnedRoomId = room_s.as_str().try_into().unwrap();
    let alice_uid: OwnedUserId = alice_id.as_str().try_into().unwrap();
    let bob_uid: OwnedUserId = bob_id.as_str().try_into().unwrap();
    let fork_point = {
        let r = room_s.clone();
        smol::block_on(app.store.read(move |c| q::list_forward_extremities(c, &r))).unwrap()[0]
            .0
            .clone()
    };
    let fork_point: OwnedEventId = fork_point.as_str().try_into().unwrap();

    // Branch A (the main line, what clients see first): bob sets the topic.
    state(
        &app,
        &room,
        &bob_uid,
        "m.room.topic",
        "",
        json!({ "topic": "bob's" }),
        None,
    );
    let v = s.sync(&alice, "timeout=0");
    let since = v["next_batch"].as_str().unwrap().to_owned();
    assert_eq!(
        current(&app, &room, "m.room.topic", "").unwrap()["topic"],
        "bob's"
    );

    // Branch B, from before bob's topic: alice bans bob. Resolution applies the ban first,
    // and bob's topic no longer passes auth: the topic goes back to "original" without any
    // new topic event. That reset must reach alice's client.
    let ban = state(
        &app,
        &room,
        &alice_uid,
        "m.room.member",
        bob_id.as_str(),
        json!({ "membership": "ban" }),
        Some(vec![fork_point]),
    );
    assert_eq!(
        current(&app, &room, "m.room.topic", "").unwrap()["topic"],
        "original"
    );
    let v = s.sync(&alice, &format!("since={since}&timeout=0"));
    let r = &v["rooms"]["join"][&room_s];
    let timeline_ids: Vec<&str> = r["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(timeline_ids, vec![ban.as_str()], "{v}");
    let topic_in_state: Vec<&str> = r["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.topic")
        .map(|e| e["content"]["topic"].as_str().unwrap())
        .collect();
    assert_eq!(
        topic_in_state,
        vec!["original"],
        "the reset is in the state section: {v}"
    );

    // The fork stored the ban's state as a delta against its prev event's group, not whole.
    let b = ban.to_string();
    let (entries, prev_group): (i64, Option<i64>) = smol::block_on(app.store.read(move |c| {
        let g = q::get_event(c, &b)?.unwrap().state_group.unwrap();
        Ok(c.query_row(
            "SELECT (SELECT count(*) FROM state_group_entries WHERE group_id = ?1),
                    (SELECT prev_group FROM state_groups WHERE id = ?1)",
            [g],
            |x| Ok((x.get(0)?, x.get(1)?)),
        )?)
    }))
    .unwrap();
    assert!(prev_group.is_some(), "the fork's group is a delta");
    assert_eq!(entries, 1, "only the ban's own key differs from its base");
}

#[test]
fn the_event_graph_is_in_tables_auth_chains_and_missing_events_are_queries() {
    let s = common::TestServer::start();
    let app = s.hs().app().clone();
    let (_, alice) = s.register("alice");
    let room = s.create_room(&alice, json!({ "name": "graph" }));
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(common::TestServer::send(
            &s,
            &alice,
            &room,
            &format!("g{i}"),
            "x",
        ));
    }
    let (r, last, first) = (room.clone(), sent[4].clone(), sent[0].clone());
    let (chain, json_chain, missing) = smol::block_on(app.store.read(move |c| {
        let chain = q::list_auth_chain(c, [last.as_str()])?;
        // The same chain by walking the PDUs' JSON.
        let mut json_chain = std::collections::BTreeSet::new();
        let mut todo = vec![last.clone()];
        while let Some(id) = todo.pop() {
            let row = q::get_event(c, &id)?.unwrap();
            let v: serde_json::Value = serde_json::from_str(&row.json)?;
            for a in v["auth_events"].as_array().unwrap() {
                let a = a.as_str().unwrap().to_owned();
                if json_chain.insert(a.clone()) {
                    todo.push(a);
                }
            }
        }
        let missing: Vec<String> =
            q::list_missing_events(c, &r, &[first.as_str()], &[last.as_str()], 10)?
                .into_iter()
                .map(|e| e.event_id)
                .collect();
        Ok((chain, json_chain, missing))
    }))
    .unwrap();
    let chain: std::collections::BTreeSet<String> = chain.into_iter().collect();
    assert_eq!(chain, json_chain);
    assert!(chain.len() >= 3, "create, power levels, member: {chain:?}");
    // Between the first and the last message: the three in between, newest first.
    assert_eq!(
        missing,
        vec![sent[3].clone(), sent[2].clone(), sent[1].clone()]
    );
}

#[test]
fn a_version_1_database_is_upgraded_with_its_event_graph() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hearth.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(include_str!("fixtures/schema-v1.sql"))
            .unwrap();
        conn.execute_batch(
            "INSERT INTO meta (key, value) VALUES ('schema_version', '1'), ('server_name', 'hearth.test');
             INSERT INTO rooms (room_id, room_version, creator, created_ts) VALUES ('!r:hearth.test', '10', '@a:hearth.test', 0);
             INSERT INTO events (pos, event_id, room_id, type, sender, origin_server_ts, depth, json, state_group, rejected)
             VALUES (7, '$e', '!r:hearth.test', 'm.room.message', '@a:hearth.test', 1234, 3,
                     '{\"prev_events\":[\"$p1\",\"$p2\"],\"auth_events\":[\"$a1\"]}', 1, 1);",
        )
        .unwrap();
    }
    let mut config = common::config_in(dir.path());
    config.database = path.clone();
    let ex = Arc::new(async_executor::Executor::new());
    let app = App::open(
        config,
        Arc::new(hearth::SystemClock),
        hearth::cancel::Spawner::new(ex),
    )
    .unwrap();
    let (edges, auth, row) = smol::block_on(app.store.read(|c| {
        let edges: Vec<String> = c
            .prepare("SELECT prev_event_id FROM event_edges WHERE event_id = '$e' ORDER BY 1")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let auth = q::list_auth_chain(c, ["$e"])?;
        let row: (i64, Option<String>, i64) = c.query_row(
            "SELECT received_ts, rejected_reason, soft_failed FROM events WHERE event_id = '$e'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        Ok((edges, auth, row))
    }))
    .unwrap();
    assert_eq!(edges, vec!["$p1", "$p2"]);
    assert_eq!(auth, vec!["$a1"]);
    assert_eq!(row, (1234, Some("rejected".to_owned()), 0));
    app.store.close().unwrap();
}

/// A database error while reading the create event is an error, not a room without a creator
/// (which would give its creator power 0 and turn their requests into 403s).
#[test]
fn a_failed_read_is_not_a_missing_creator() {
    let mut conn = rusqlite::Connection::open_in_memory().expect("in-memory database");
    hearth::store::migrate::migrate(&mut conn).expect("schema");
    conn.execute(
        "INSERT INTO current_state (room_id, type, state_key, event_id, membership, pos)
         VALUES ('!r:x', 'm.room.create', '', '$c', NULL, 1)",
        [],
    )
    .expect("insert");
    // Readable: the create event is simply not there.
    assert_eq!(
        build::power_levels(&conn, "!r:x")
            .expect("levels")
            .user("@a:x"),
        0
    );
    // Unreadable: the error comes back.
    conn.execute_batch("ALTER TABLE events RENAME TO events_unreadable")
        .expect("rename");
    assert!(build::power_levels(&conn, "!r:x").is_err());
}
