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
        smol::block_on(hearth::http::account::create_user(&app, u, None, false)).unwrap();
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
