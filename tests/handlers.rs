//! Handler behaviour that is about how an operation is carried out rather than its result:
//! one write (one commit) per operation, nothing half-done when part of it is refused.
mod common;
use common::*;
use serde_json::json;

/// A counter from `/_hearth/metrics`.
fn metric(s: &TestServer, name: &str) -> u64 {
    let text = ureq::get(&format!("{}/_hearth/metrics", s.base))
        .call()
        .expect("metrics")
        .into_string()
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in metrics"))
}

#[test]
fn read_markers_are_one_write() {
    let s = TestServer::start();
    let (alice, a) = s.register("alice");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    let ev = s.send(&a, &room, "t1", "hello");
    let path = format!("/_matrix/client/v3/rooms/{}/read_markers", enc(&room));
    let before = metric(&s, "hearth_db_writes_total");
    s.ok(
        "POST",
        &path,
        Some(&a),
        Some(&json!({ "m.fully_read": ev, "m.read": ev, "m.read.private": ev })),
    );
    let after = metric(&s, "hearth_db_writes_total");
    assert_eq!(
        after - before,
        1,
        "read markers took {} writes",
        after - before
    );
    let v = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/user/{}/rooms/{}/account_data/m.fully_read",
            enc(&alice),
            enc(&room)
        ),
        Some(&a),
        None,
    );
    assert_eq!(v["event_id"], ev.as_str());
}

#[test]
fn read_markers_refused_in_part_write_nothing() {
    let s = TestServer::start();
    let (alice, a) = s.register("alice");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    let other = s.create_room(&a, json!({ "preset": "public_chat" }));
    let ev = s.send(&a, &room, "t1", "hello");
    let elsewhere = s.send(&a, &other, "t2", "elsewhere");
    // m.fully_read is fine, m.read names an event of another room: the whole request fails
    // and the fully-read marker is not moved either.
    s.err(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/read_markers", enc(&room)),
        Some(&a),
        Some(&json!({ "m.fully_read": ev, "m.read": elsewhere })),
        404,
        "M_NOT_FOUND",
    );
    s.err(
        "GET",
        &format!(
            "/_matrix/client/v3/user/{}/rooms/{}/account_data/m.fully_read",
            enc(&alice),
            enc(&room)
        ),
        Some(&a),
        None,
        404,
        "M_NOT_FOUND",
    );
}
