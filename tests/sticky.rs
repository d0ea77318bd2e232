//! Sticky events (MSC4354), the client half: sending with
//! `org.matrix.msc4354.sticky_duration_ms`, expiry on an injected clock, the `/sync`
//! `msc4354_sticky` section (deduplicated against the timeline, at most 100 per response, each
//! once per `since` stream, all live ones after a join) and the ttl in `unsigned`.
mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;

const PARAM: &str = "org.matrix.msc4354.sticky_duration_ms";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn send_sticky(s: &TestServer, tok: &str, room: &str, txn: &str, ms: u64) -> String {
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/send/org.example.call.member/{txn}?{PARAM}={ms}",
            enc(room)
        ),
        Some(tok),
        Some(&json!({ "sticky_key": txn })),
    )["event_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn sticky_section(sync: &Value, room: &str) -> Vec<Value> {
    sync["rooms"]["join"][room]["msc4354_sticky"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

fn timeline_ids(sync: &Value, room: &str) -> Vec<String> {
    ids(sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]))
}

fn next(sync: &Value) -> String {
    sync["next_batch"].as_str().unwrap().to_owned()
}

/// A server on a manual clock; alice's public room with bob joined.
fn two_in_a_room() -> (
    TestServer,
    std::sync::Arc<ManualClock>,
    String,
    String,
    String,
) {
    let clock = ManualClock::new(now_ms());
    let s = TestServer::start_with_clock(|_| {}, clock.clone());
    let (_alice, a) = s.register("alice");
    let (_bob, b) = s.register("bob");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/join/{}", enc(&room)),
        Some(&b),
        Some(&json!({})),
    );
    (s, clock, a, b, room)
}

const LIMIT10: &str = "filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A10%7D%7D%7D";

#[test]
fn sending_puts_the_key_in_the_pdu_and_bad_durations_are_refused() {
    let clock = ManualClock::new(now_ms());
    let s = TestServer::start_with_clock(|_| {}, clock.clone());
    let (_alice, a) = s.register("alice");
    let room = s.create_room(&a, json!({}));
    let id = send_sticky(&s, &a, &room, "t1", 60_000);
    let ev = s.ok(
        "GET",
        &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&id)),
        Some(&a),
        None,
    );
    assert_eq!(ev["msc4354_sticky"]["duration_ms"], 60_000, "{ev}");
    assert_eq!(ev["unsigned"]["msc4354_sticky_duration_ttl_ms"], 60_000);
    clock.advance(15_000);
    let ev = s.ok(
        "GET",
        &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&id)),
        Some(&a),
        None,
    );
    assert_eq!(
        ev["unsigned"]["msc4354_sticky_duration_ttl_ms"], 45_000,
        "ttl decreases"
    );
    clock.advance(45_000);
    let ev = s.ok(
        "GET",
        &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&id)),
        Some(&a),
        None,
    );
    assert!(
        ev["unsigned"]
            .get("msc4354_sticky_duration_ttl_ms")
            .is_none(),
        "omitted once expired: {ev}"
    );
    for bad in ["3600001", "-1", "1.5", "soon"] {
        s.err(
            "PUT",
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/bad{bad}?{PARAM}={bad}",
                enc(&room)
            ),
            Some(&a),
            Some(&json!({ "body": "x", "msgtype": "m.text" })),
            400,
            "M_INVALID_PARAM",
        );
    }
    // The bounds themselves are fine.
    send_sticky(&s, &a, &room, "zero", 0);
    send_sticky(&s, &a, &room, "hour", 3_600_000);
    let v = s.ok("GET", "/_matrix/client/versions", None, None);
    assert_eq!(v["unstable_features"]["org.matrix.msc4354"], true);
}

#[test]
fn in_the_timeline_without_a_gap_in_the_sticky_section_after_one() {
    let (s, clock, a, b, room) = two_in_a_room();
    let since = next(&s.sync(&b, LIMIT10));

    // No gap: the sticky event is in the timeline, and not repeated in the sticky section.
    let first = send_sticky(&s, &a, &room, "s1", 600_000);
    let r = s.sync(&b, &format!("since={since}&{LIMIT10}"));
    assert!(timeline_ids(&r, &room).contains(&first));
    assert!(sticky_section(&r, &room).is_empty(), "{r}");
    let since = next(&r);

    // 25 later messages and a limit of 10: the sticky event sent before them is outside the
    // timeline, so it comes in the sticky section, with its ttl.
    let second = send_sticky(&s, &a, &room, "s2", 600_000);
    for i in 0..25 {
        s.send(&a, &room, &format!("m{i}"), "chatter");
    }
    clock.advance(1_000);
    let r = s.sync(&b, &format!("since={since}&{LIMIT10}"));
    assert_eq!(r["rooms"]["join"][&room]["timeline"]["limited"], true);
    assert!(!timeline_ids(&r, &room).contains(&second));
    let st = sticky_section(&r, &room);
    assert_eq!(ids(&st), vec![second.clone()], "{r}");
    assert_eq!(st[0]["unsigned"]["msc4354_sticky_duration_ttl_ms"], 599_000);
    assert_eq!(st[0]["msc4354_sticky"]["duration_ms"], 600_000);
    let since2 = next(&r);

    // Once per since stream: not again from the next token, again from the old one.
    let again = s.sync(&b, &format!("since={since2}&{LIMIT10}&timeout=0"));
    assert!(sticky_section(&again, &room).is_empty(), "{again}");
    let retry = s.sync(&b, &format!("since={since}&{LIMIT10}"));
    assert_eq!(ids(&sticky_section(&retry, &room)), vec![second.clone()]);

    // An initial sync carries every live sticky event outside its timeline.
    let initial = s.sync(&b, LIMIT10);
    let got: HashSet<String> = ids(&sticky_section(&initial, &room)).into_iter().collect();
    assert_eq!(got, HashSet::from([first.clone(), second.clone()]));

    // Expired: gone from the section; a redacted one too.
    clock.advance(600_000);
    let initial = s.sync(&b, LIMIT10);
    assert!(sticky_section(&initial, &room).is_empty(), "{initial}");
    let third = send_sticky(&s, &a, &room, "s3", 600_000);
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/redact/{}/r1",
            enc(&room),
            enc(&third)
        ),
        Some(&a),
        Some(&json!({})),
    );
    for i in 0..12 {
        s.send(&a, &room, &format!("n{i}"), "more");
    }
    let initial = s.sync(&b, LIMIT10);
    assert!(
        sticky_section(&initial, &room).is_empty(),
        "redaction ends stickiness: {initial}"
    );
}

#[test]
fn a_user_joining_gets_earlier_sticky_events_whatever_the_history_visibility() {
    let clock = ManualClock::new(now_ms());
    let s = TestServer::start_with_clock(|_| {}, clock.clone());
    let (_alice, a) = s.register("alice");
    let (_bob, b) = s.register("bob");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.history_visibility/",
            enc(&room)
        ),
        Some(&a),
        Some(&json!({ "history_visibility": "joined" })),
    );
    let before = send_sticky(&s, &a, &room, "early", 600_000);
    let expired = send_sticky(&s, &a, &room, "short", 1_000);
    for i in 0..15 {
        s.send(&a, &room, &format!("m{i}"), "before bob");
    }
    clock.advance(2_000);
    let since = next(&s.sync(&b, ""));
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/join/{}", enc(&room)),
        Some(&b),
        Some(&json!({})),
    );
    let r = s.sync(&b, &format!("since={since}&{LIMIT10}"));
    let got = ids(&sticky_section(&r, &room));
    assert_eq!(got, vec![before.clone()], "{r}");
    assert!(!got.contains(&expired));
    // And only once: a display-name change (a join after a join) does not start over.
    let since = next(&r);
    s.ok(
        "PUT",
        &format!("/_matrix/client/v3/profile/{}/displayname", enc(&_bob)),
        Some(&b),
        Some(&json!({ "displayname": "Bob" })),
    );
    let r = s.sync(&b, &format!("since={since}&{LIMIT10}"));
    assert!(sticky_section(&r, &room).is_empty(), "{r}");
}

#[test]
fn many_sticky_events_arrive_across_syncs_none_lost_or_repeated() {
    let (s, _clock, a, b, room) = two_in_a_room();
    let mut since = next(&s.sync(&b, LIMIT10));
    let mut sent = Vec::new();
    for i in 0..250 {
        sent.push(send_sticky(&s, &a, &room, &format!("k{i}"), 600_000));
    }
    let mut seen: Vec<String> = Vec::new();
    let mut responses = 0;
    loop {
        let r = s.sync(&b, &format!("since={since}&{LIMIT10}&timeout=0"));
        responses += 1;
        let st = ids(&sticky_section(&r, &room));
        let tl = timeline_ids(&r, &room);
        assert!(st.len() <= 100, "at most 100 per response");
        let got: Vec<String> = st.into_iter().chain(tl).collect();
        since = next(&r);
        if got.is_empty() {
            break;
        }
        seen.extend(got);
        assert!(responses < 10, "delivery must finish");
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no event delivered twice");
    let want: HashSet<&String> = sent.iter().collect();
    assert_eq!(unique, want, "every sticky event delivered");
    assert!(
        responses >= 3,
        "250 events take three responses: {responses}"
    );
}

#[test]
fn history_visibility_hides_no_live_sticky_event_from_event_context_or_messages() {
    let clock = ManualClock::new(now_ms());
    let s = TestServer::start_with_clock(|_| {}, clock.clone());
    let (_alice, a) = s.register("alice");
    let (_bob, b) = s.register("bob");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.history_visibility/",
            enc(&room)
        ),
        Some(&a),
        Some(&json!({ "history_visibility": "joined" })),
    );
    let hidden = s.send(&a, &room, "plain", "before bob");
    let sticky = send_sticky(&s, &a, &room, "early", 600_000);
    let short = send_sticky(&s, &a, &room, "short", 1_000);
    s.send(&a, &room, "after", "also before bob");
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/join/{}", enc(&room)),
        Some(&b),
        Some(&json!({})),
    );
    clock.advance(2_000);
    let event = |id: &str| {
        s.req(
            "GET",
            &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(id)),
            Some(&b),
            None,
        )
    };
    assert_eq!(event(&hidden).0, 404, "plain history stays hidden");
    assert_eq!(
        event(&short).0,
        404,
        "an expired sticky event is history again"
    );
    let (status, ev) = event(&sticky);
    assert_eq!(status, 200, "{ev}");
    assert!(
        ev["unsigned"]["msc4354_sticky_duration_ttl_ms"].is_u64(),
        "{ev}"
    );
    let ctx = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/context/{}?limit=10",
            enc(&room),
            enc(&sticky)
        ),
        Some(&b),
        None,
    );
    assert_eq!(ctx["event"]["event_id"], sticky.as_str(), "{ctx}");
    // /messages backwards: the visible history (bob's join onwards), then the live sticky
    // event below it, paged one event at a time so the page boundary falls among them.
    let mut seen = Vec::new();
    let mut from = String::new();
    for _ in 0..20 {
        let page = s.ok(
            "GET",
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1{from}",
                enc(&room)
            ),
            Some(&b),
            None,
        );
        seen.extend(ids(page["chunk"].as_array().unwrap()));
        match page["end"].as_str() {
            Some(end) => from = format!("&from={end}"),
            None => break,
        }
    }
    assert!(seen.contains(&sticky), "{seen:?}");
    assert!(
        !seen.contains(&hidden) && !seen.contains(&short),
        "{seen:?}"
    );
    assert_eq!(seen.iter().filter(|e| **e == sticky).count(), 1, "{seen:?}");
    // /messages forwards from the room's beginning (a topological token below everything):
    // the live sticky event below the visible history first, then the visible history, one
    // event per page.
    let mut forward = Vec::new();
    let mut from = "t0-0".to_owned();
    for _ in 0..20 {
        let page = s.ok(
            "GET",
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=f&limit=1&from={from}",
                enc(&room)
            ),
            Some(&b),
            None,
        );
        let chunk = ids(page["chunk"].as_array().unwrap());
        if chunk.is_empty() {
            break;
        }
        forward.extend(chunk);
        match page["end"].as_str() {
            Some(end) => from = end.to_owned(),
            None => break,
        }
    }
    assert_eq!(forward.first(), Some(&sticky), "{forward:?}");
    assert_eq!(
        forward.iter().filter(|e| **e == sticky).count(),
        1,
        "{forward:?}"
    );
    assert!(
        !forward.contains(&hidden) && !forward.contains(&short),
        "{forward:?}"
    );
    let mut backward_visible: Vec<&String> = seen.iter().filter(|e| **e != sticky).collect();
    backward_visible.reverse();
    assert_eq!(
        forward[1..].iter().collect::<Vec<_>>(),
        backward_visible,
        "forwards shows the visible history backwards showed"
    );
}
