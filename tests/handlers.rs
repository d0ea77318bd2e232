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

/// Kick and unban check the target's membership in the write that sends the event: of
/// concurrent unbans of one banned user (or kicks of one member), exactly one succeeds. With
/// the check in a read before the write, several pass it and each sends a leave event.
#[test]
fn concurrent_kicks_and_unbans_act_once() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    let r = enc(&room);
    let mut bobs = Vec::new();
    for i in 0..2 {
        let (bob, b) = s.register(&format!("bob{i}"));
        s.ok(
            "POST",
            &format!("/_matrix/client/v3/rooms/{r}/join"),
            Some(&b),
            Some(&json!({})),
        );
        bobs.push(bob);
    }
    // bob0 is banned, then unbanned 8 times at once; bob1 is kicked 8 times at once.
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{r}/ban"),
        Some(&a),
        Some(&json!({ "user_id": bobs[0] })),
    );
    for (action, target) in [("unban", &bobs[0]), ("kick", &bobs[1])] {
        let path = format!("/_matrix/client/v3/rooms/{r}/{action}");
        let barrier = std::sync::Barrier::new(8);
        let statuses: Vec<u16> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    sc.spawn(|| {
                        barrier.wait();
                        s.req("POST", &path, Some(&a), Some(&json!({ "user_id": target })))
                            .0
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("request thread"))
                .collect()
        });
        let ok = statuses.iter().filter(|&&st| st == 200).count();
        assert_eq!(ok, 1, "{action}: {statuses:?}");
        assert!(
            statuses.iter().all(|&st| st == 200 || st == 403),
            "{action}: {statuses:?}"
        );
    }
    // One leave event each after the ban / the join.
    let members = s.ok(
        "GET",
        &format!("/_matrix/client/v3/rooms/{r}/messages?dir=b&limit=100"),
        Some(&a),
        None,
    );
    for bob in &bobs {
        let leaves = members["chunk"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| {
                e["type"] == "m.room.member"
                    && e["state_key"] == bob.as_str()
                    && e["content"]["membership"] == "leave"
            })
            .count();
        assert_eq!(leaves, 1, "leave events for {bob}");
    }
}
