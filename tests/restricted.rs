//! Restricted joins (join rule `restricted`, room version 10) between two Hearths: the
//! resident vouches for a member of an allowed room (`join_authorised_via_users_server` in the
//! `/make_join` template), signs the join at `/send_join` and returns it in the answer's
//! `event` (server-server API, send_join v2), which the joiner keeps; locally the same rule
//! lets a member of the allowed room in.

mod common;

use common::{
    enc,
    fed::{curl, register, Hearth},
};
use serde_json::{json, Value};

/// The stored JSON (with signatures) of `user`'s current member event in `room` on `h`.
fn member_event(h: &Hearth, room: &str, user: &str) -> Value {
    let (r, u) = (room.to_owned(), user.to_owned());
    smol::block_on(h.hs.app().store.read(move |c| {
        use hearth::store::queries as q;
        let id = q::get_current_state(c, &r, "m.room.member", &u)?.expect("a member event");
        Ok(q::get_event(c, &id)?.expect("the event").json)
    }))
    .map(|j| serde_json::from_str(&j).unwrap())
    .unwrap()
}

fn join(h: &Hearth, tok: &str, room: &str, via: &str) -> (u16, Value) {
    curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            h.url(),
            enc(room),
            enc(via)
        ),
        Some(tok),
        Some(&json!({})),
    )
}

#[test]
fn a_restricted_join_is_vouched_for_signed_and_returned_in_the_send_join_event() {
    let a = Hearth::start();
    let b = Hearth::start();
    let (alice, alice_tok) = register(&a.url(), "alice");
    let (carol, carol_tok) = register(&a.url(), "carol");
    let (bob, bob_tok) = register(&b.url(), "bob");
    let create = |body: Value| {
        let (s, v) = curl(
            "POST",
            &format!("{}/_matrix/client/v3/createRoom", a.url()),
            Some(&alice_tok),
            Some(&body),
        );
        assert_eq!(s, 200, "{v}");
        v["room_id"].as_str().unwrap().to_owned()
    };
    let lobby = create(json!({ "preset": "public_chat", "room_version": "10" }));
    let inner = create(json!({
        "preset": "private_chat",
        "room_version": "10",
        "initial_state": [{
            "type": "m.room.join_rules", "state_key": "",
            "content": { "join_rule": "restricted", "allow": [{ "type": "m.room_membership", "room_id": lobby }] },
        }],
    }));
    let (an, bn) = (a.server_name(), b.server_name());

    // Not in the allowed room: refused, on either server.
    let (s, v) = join(&b, &bob_tok, &inner, &an);
    assert_eq!(
        (s, v["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{v}"
    );
    let (s, v) = join(&a, &carol_tok, &inner, &an);
    assert_eq!(
        (s, v["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{v}"
    );

    // Bob joins the lobby (an ordinary join: no `event` in the answer, so b keeps its own
    // copy, signed by b alone), then the restricted room.
    let (s, v) = join(&b, &bob_tok, &lobby, &an);
    assert_eq!(s, 200, "{v}");
    let plain = member_event(&b, &lobby, &bob);
    assert!(plain["signatures"].get(&an).is_none(), "{plain}");
    let (s, v) = join(&b, &bob_tok, &inner, &an);
    assert_eq!(s, 200, "{v}");
    let on_a = member_event(&a, &inner, &bob);
    assert_eq!(on_a["content"]["membership"], "join", "{on_a}");
    assert_eq!(
        on_a["content"]["join_authorised_via_users_server"],
        alice.as_str(),
        "{on_a}"
    );
    // Both servers signed it, and b keeps the copy a returned in `event`.
    let on_b = member_event(&b, &inner, &bob);
    for server in [&an, &bn] {
        assert!(on_a["signatures"].get(server).is_some(), "{on_a}");
        assert!(on_b["signatures"].get(server).is_some(), "{on_b}");
    }

    // Locally: carol joins the lobby, then the restricted room, vouched for by alice.
    let (s, v) = join(&a, &carol_tok, &lobby, &an);
    assert_eq!(s, 200, "{v}");
    let (s, v) = join(&a, &carol_tok, &inner, &an);
    assert_eq!(s, 200, "{v}");
    let ev = member_event(&a, &inner, &carol);
    assert_eq!(
        ev["content"]["join_authorised_via_users_server"],
        alice.as_str(),
        "{ev}"
    );
}
