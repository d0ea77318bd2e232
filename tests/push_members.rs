//! Whom the push evaluator counts for an event: the members joined at the event's position,
//! however late it gets to the event. A member event that keeps a user joined (a display-name
//! change) moves their row of the current state to a later position, and an evaluator that
//! trails the stream (a burst, a restart) must still count them for the events before it.

mod common;

use std::sync::Arc;

use common::{enc, TestServer};
use hearth::{
    ops::push::{evaluate, RulesCache},
    store::queries as q,
};
use serde_json::json;

/// The users `evaluate` notifies for the event `event_id`, evaluated at its own position now.
fn notified_now(s: &TestServer, event_id: &str) -> Vec<String> {
    let app = s.hs().app().clone();
    let server = s.hs().server_name().to_owned();
    let id = event_id.to_owned();
    let pos = smol::block_on(
        app.store
            .read(move |c| Ok(q::get_event(c, &id)?.unwrap().pos)),
    )
    .unwrap();
    let cache = Arc::new(RulesCache::default());
    let batch = smol::block_on(
        app.store
            .read(move |c| evaluate(c, &server, &cache, pos - 1, pos - 1)),
    )
    .unwrap();
    let mut users: Vec<String> = batch
        .found
        .into_iter()
        .filter(|n| n.event_id == event_id)
        .map(|n| n.user)
        .collect();
    users.sort();
    users
}

#[test]
fn members_are_counted_for_events_before_their_later_member_events() {
    let s = TestServer::start();
    let (_, alice) = s.register("alice");
    let (bob_id, bob) = s.register("bob");
    let (carol_id, carol) = s.register("carol");
    let room = s.create_room(&alice, json!({ "preset": "public_chat" }));
    for tok in [&bob, &carol] {
        s.ok(
            "POST",
            &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
            Some(tok),
            Some(&json!({})),
        );
    }
    let msg = s.send(&alice, &room, "m1", "hello both");
    assert_eq!(
        notified_now(&s, &msg),
        vec![bob_id.clone(), carol_id.clone()]
    );

    // bob changes his display name after the message: he stays joined, and the message,
    // evaluated now (as a trailing evaluator would), still notifies him.
    s.ok(
        "PUT",
        &format!("/_matrix/client/v3/profile/{bob_id}/displayname"),
        Some(&bob),
        Some(&json!({ "displayname": "Bob Renamed" })),
    );
    assert_eq!(
        notified_now(&s, &msg),
        vec![bob_id.clone(), carol_id.clone()],
        "a display-name change after the message must not drop bob from it"
    );

    // A member who joined after the message is not counted for it.
    let (dan_id, dan) = s.register("dan");
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
        Some(&dan),
        Some(&json!({})),
    );
    assert!(!notified_now(&s, &msg).contains(&dan_id));
    let later = s.send(&alice, &room, "m2", "hello all three");
    assert_eq!(notified_now(&s, &later), vec![bob_id, carol_id, dan_id]);
}
